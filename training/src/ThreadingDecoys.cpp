#include "flashipa/ThreadingDecoys.h"
#include "flashipa/ResidueTypes.h"
#include <vector>

namespace FlashIPAPlugin {

ThreadingDecoys threadingDecoys(const StructureBatch& batch, const torch::Tensor& clean, const torch::Tensor& sigma,
                                const torch::Tensor& eps, at::Generator& generator) {
    const int64_t B = clean.size(0);
    torch::Tensor lengths = batch.mask.to(torch::kCPU).sum(1).to(torch::kLong);
    torch::Tensor firstTypes = batch.types.to(torch::kCPU).select(1, 0);
    std::vector<int64_t> length(B);
    std::vector<bool> rna(B);
    for (int64_t b = 0; b < B; b++) {
        length[b] = lengths[b].item<int64_t>();
        rna[b] = firstTypes[b].item<int64_t>() >= ResidueType::FirstNucleotide; // a crop is of one chain
    }
    torch::Tensor x = clean.to(torch::kCPU, torch::kFloat64), noise = eps.to(torch::kCPU, torch::kFloat64);
    torch::Tensor s = sigma.to(torch::kCPU, torch::kFloat64), chainIds = batch.chains.to(torch::kCPU);
    ThreadingDecoys out{torch::zeros_like(x), chainIds.clone(), torch::zeros({B}, torch::kFloat64)};
    for (int64_t b = 0; b < B; b++) {
        std::vector<int64_t> donors;
        for (int64_t d = 0; d < B; d++)
            if (d != b && length[b] > 0 && rna[d] == rna[b] && length[d] >= length[b])
                donors.push_back(d);
        if (donors.empty())
            continue;
        const int64_t d = donors[torch::randint((int64_t) donors.size(), {1}, generator, torch::kLong).item<int64_t>()];
        const int64_t start = torch::randint(length[d] - length[b] + 1, {1}, generator, torch::kLong).item<int64_t>();
        torch::Tensor window = x[d].narrow(0, start, length[b]);
        window = window - window.mean(std::vector<int64_t>{0, 1}, true);
        out.atoms[b].narrow(0, 0, length[b]).copy_(window + s[b] * noise[b].narrow(0, 0, length[b]));
        out.chains[b].narrow(0, 0, length[b]).copy_(chainIds[d].narrow(0, start, length[b]));
        out.use[b] = 1.0;
    }
    return out;
}

} // namespace FlashIPAPlugin
