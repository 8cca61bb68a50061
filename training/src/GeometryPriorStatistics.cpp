#include "flashipa/GeometryPriorStatistics.h"
#include "flashipa/Dataset.h"
#include "flashipa/ResidueTypes.h"
#include <algorithm>
#include <stdexcept>
#include <vector>

namespace FlashIPAPlugin {

using torch::indexing::None;
using torch::indexing::Slice;

namespace {
// Per residue of a data set [N]: the training chain it belongs to, or -1 outside the training split (so the
// statistics come from training chains only and links never cross chains).
torch::Tensor trainingChainOfResidue(const Dataset& data) {
    std::vector<int64_t> chainOf(data.atoms().size(0), -1);
    for (int64_t c : data.chains(DatasetSplit::Train))
        for (int64_t n = data.chainOffset(c); n < data.chainOffset(c + 1); n++)
            chainOf[n] = c;
    return torch::tensor(chainOf, torch::kInt64);
}
} // namespace

torch::Tensor GeometryPrior::measure(const Dataset& data) {
    const torch::Tensor& atoms = data.atoms();     // [N, 3, 3]
    const torch::Tensor& types = data.types();     // [N]
    const torch::Tensor& segment = data.segments(); // [N]
    torch::Tensor chain = trainingChainOfResidue(data);
    torch::Tensor train = chain >= 0;
    torch::Tensor rna = types >= ResidueType::FirstNucleotide;
    torch::Tensor x = atoms.to(torch::kFloat64);
    const std::vector<GeometryPairKind>& kinds = GeometryPrior::pairKinds();
    torch::Tensor stats = torch::zeros({(int64_t) kinds.size(), 2}, torch::kFloat64);
    for (size_t k = 0; k < kinds.size(); k++) {
        const GeometryPairKind& kind = kinds[k];
        torch::Tensor use, d;
        if (kind.offset == 0) {
            use = train & (rna == kind.rna);
            d = (x.index({Slice(), kind.atomI}) - x.index({Slice(), kind.atomJ})).norm(2, -1);
        } else {
            auto head = Slice(None, -1), tail = Slice(1, None);
            use = train.index({head}) & (chain.index({head}) == chain.index({tail})) &
                  (segment.index({head}) == segment.index({tail})) & (rna.index({head}) == kind.rna) & (rna.index({tail}) == kind.rna);
            d = (x.index({head, kind.atomI}) - x.index({tail, kind.atomJ})).norm(2, -1);
        }
        torch::Tensor values = d.index({use});
        if (values.numel() < 10)
            throw std::runtime_error("geometry prior: the training split of '" + data.path() + "' holds fewer than 10 " +
                                     kind.name + " pairs");
        const double median = values.median().item<double>();
        const double mad = (values - median).abs().median().item<double>();
        stats[k][0] = median;
        stats[k][1] = std::max(1.4826 * mad, 1e-4); // a floor: a spread of zero would make the prior infinitely stiff
    }
    return stats;
}

torch::Tensor GeometryPrior::measureBondCovariance(const Dataset& data) {
    const torch::Tensor& atoms = data.atoms();      // [N, 3, 3]
    const torch::Tensor& types = data.types();      // [N]
    const torch::Tensor& segment = data.segments(); // [N]
    const int64_t N = atoms.size(0);
    torch::Tensor chain = trainingChainOfResidue(data);
    // The path N0 CA0 C0 N1 ... over the whole file as one batch row; slot j joins flattened atoms j and j + 1.
    // The model's slot rule (GeometryPrior::backboneBondSlots) with training residues as the real ones and one
    // id per chain and segment, so links stay inside a segment as the trainer's batches link them.
    torch::Tensor segmentId = chain * (segment.max().item<int64_t>() + 1) + segment;
    torch::Tensor present = GeometryPrior::backboneBondSlots(types.view({1, N}), segmentId.view({1, N}), (chain >= 0).view({1, N}))
                                .view({3 * N})
                                .narrow(0, 0, 3 * N - 1);
    torch::Tensor path = atoms.to(torch::kFloat64).reshape({3 * N, 3});
    torch::Tensor bonds = path.index({Slice(1, None)}) - path.index({Slice(None, -1)}); // [3N-1, 3]
    double c[3];
    for (int lag = 0; lag < 3; lag++) {
        const int64_t M = 3 * N - 1 - lag;
        torch::Tensor use = present.narrow(0, 0, M).clone();
        for (int k = 1; k <= lag; k++)
            use &= present.narrow(0, k, M); // every slot between the two present: one unbroken segment
        torch::Tensor products = (bonds.narrow(0, 0, M) * bonds.narrow(0, lag, M)).sum(1).index({use});
        if (products.numel() < 10)
            throw std::runtime_error("geometry prior: the training split of '" + data.path() +
                                     "' holds fewer than 10 protein backbone bonds for the bond covariance");
        c[lag] = products.mean().item<double>() / 3.0;
    }
    // Shrink the correlations together until the symbol's minimum reaches the floor (bisection on a factor in
    // [0, 1]: the minimum of functions linear in the factor is concave in it, positive at 0).
    if (GeometryPrior::bondSpectrumMinimum(c[0], c[1], c[2]) < GeometryPrior::MinimumBondSpectrum * c[0]) {
        double low = 0.0, high = 1.0;
        for (int i = 0; i < 60; i++) {
            const double mid = 0.5 * (low + high);
            (GeometryPrior::bondSpectrumMinimum(c[0], mid * c[1], mid * c[2]) >= GeometryPrior::MinimumBondSpectrum * c[0] ? low : high) = mid;
        }
        c[1] *= low, c[2] *= low;
    }
    return torch::tensor({c[0], c[1], c[2]}, torch::kFloat64);
}

} // namespace FlashIPAPlugin
