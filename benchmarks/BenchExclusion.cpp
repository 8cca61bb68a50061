// flashipa-bench-exclusion: the geometry prior's exclusion term (GeometryPrior::exclusionEnergy) evaluated pair by
// pair against the tensor evaluation, side by side in one run: energy and first derivatives (what a force
// evaluation needs), and for training batches the same with create_graph (what the trainer's loss builds).
// Random compact chains (a random walk of 0.38 nm steps, frame atoms 0.1-0.15 nm around it), float32.
//   flashipa-bench-exclusion [--device cuda|cpu] [--repeats N]   (on a CPU without the 8,208-residue cases)
#include "flashipa/GeometryPrior.h"
#include <c10/cuda/CUDACachingAllocator.h>
#include <chrono>
#include <cstring>
#include <iomanip>
#include <iostream>

using namespace FlashIPAPlugin;

namespace {

struct Case {
    int64_t structures, residues;
    double sigmaLow, sigmaHigh; ///< sigma per structure, log-spaced between these (nm)
    bool createGraph;
    const char* what;
};

/** Frame atoms [B, L, 3, 3] of random compact chains. */
torch::Tensor randomChains(int64_t B, int64_t L, const torch::Device& device) {
    torch::manual_seed(1);
    torch::Tensor steps = torch::randn({B, L, 1, 3});
    steps = 0.38 * steps / steps.norm(2, -1, true);
    torch::Tensor offsets = torch::tensor({-0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.0}).view({1, 1, 3, 3});
    return (torch::cumsum(steps, 1) + offsets + 0.02 * torch::randn({B, L, 3, 3})).to(device);
}

} // namespace

int main(int argc, char** argv) {
    torch::Device device(torch::kCUDA, 0);
    int repeats = 20;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--device") && i + 1 < argc)
            device = torch::Device(argv[++i]);
        else if (!std::strcmp(argv[i], "--repeats") && i + 1 < argc)
            repeats = std::stoi(argv[++i]);
        else {
            std::cerr << "usage: flashipa-bench-exclusion [--device cuda|cpu] [--repeats N]\n";
            return 2;
        }
    }
    const bool cuda = device.is_cuda();
    if (cuda && !torch::cuda::is_available()) {
        std::cout << "flashipa-bench-exclusion: no CUDA device here; nothing to measure\n";
        return 0;
    }
    const std::vector<Case> cases = {
        {1, 114, 0.05, 0.05, false, "force, sigma 0.05 nm"},
        {1, 2052, 0.05, 0.05, false, "force, sigma 0.05 nm"},
        {1, 8208, 0.05, 0.05, false, "force, sigma 0.05 nm"},
        {1, 8208, 1.0, 1.0, false, "force, sigma 1 nm (nothing skipped)"},
        {64, 256, 0.01, 1.5, false, "training batch, first derivatives"},
        {64, 256, 0.01, 1.5, true, "training batch, create_graph"},
    };
    std::cout << "device: " << (cuda ? std::string("CUDA ") + std::to_string(device.index() < 0 ? 0 : device.index()) : std::string("CPU"))
              << ", float32, " << repeats << " repeats after 3 warm-up\n\n"
              << "| B x L | what | tensors: ms | pairwise: ms | speed-up | tensors: peak MiB | pairwise: peak MiB |\n"
              << "|---|---|---:|---:|---:|---:|---:|\n";
    using Evaluation = GeometryPrior::ExclusionEvaluation;
    for (const Case& c : cases) {
        if (!cuda && c.residues > 2052)
            continue; // the tensor evaluation of 8,208 residues takes minutes on a CPU
        torch::Tensor atoms = randomChains(c.structures, c.residues, device);
        torch::Tensor chains = torch::zeros({c.structures, c.residues}, torch::kInt64).to(device);
        torch::Tensor real = torch::ones({c.structures, c.residues}, torch::kBool).to(device);
        torch::Tensor sigma = torch::exp(torch::linspace(std::log(c.sigmaLow), std::log(c.sigmaHigh), c.structures)).to(device);
        double ms[2], peak[2];
        for (int e = 0; e < 2; e++) {
            const Evaluation evaluation = e == 0 ? Evaluation::Tensors : Evaluation::Pairwise;
            auto once = [&] {
                torch::Tensor x = atoms.clone().requires_grad_(true), sg = sigma.clone().requires_grad_(true);
                torch::Tensor energy = GeometryPrior::exclusionEnergy(x, chains, real, sg, 3, evaluation);
                auto g = torch::autograd::grad({energy.sum()}, {x, sg}, {}, c.createGraph, c.createGraph);
                return g[0].sum();
            };
            for (int k = 0; k < 3; k++)
                once();
            if (cuda) {
                torch::cuda::synchronize();
                c10::cuda::CUDACachingAllocator::emptyCache();
                c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
            }
            auto start = std::chrono::steady_clock::now();
            for (int k = 0; k < repeats; k++)
                once();
            if (cuda)
                torch::cuda::synchronize();
            ms[e] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / repeats;
            peak[e] = 0;
            if (cuda) {
                auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
                peak[e] = stats.allocated_bytes[0].peak / 1048576.0;
            }
        }
        std::cout << std::fixed << "| " << c.structures << " x " << c.residues << " | " << c.what << " | " << std::setprecision(3)
                  << ms[0] << " | " << ms[1] << " | " << std::setprecision(1) << ms[0] / ms[1] << " | " << std::setprecision(0)
                  << peak[0] << " | " << peak[1] << " |\n";
    }
    return 0;
}
