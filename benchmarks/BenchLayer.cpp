// flashipa-bench-layer: times one FlashIPA layer forward (and forward+backward) for the math and SDPA
// backends over a range of lengths, on CPU or CUDA, and prints one table. A benchmark, not a test.
//   flashipa-bench-layer [--device cpu|cuda] [--dtype float32|bfloat16] [--published-defaults] [--lengths 128,512,...]
#include "flashipa/EnergyModel.h"
#include <chrono>
#include <cstring>
#include <iostream>
#include <sstream>

using namespace FlashIPAPlugin;

namespace {
double timeIt(const std::function<void()>& run, bool cuda, int repeats) {
    run(); // warm-up
    if (cuda)
        torch::cuda::synchronize();
    auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; i++)
        run();
    if (cuda)
        torch::cuda::synchronize();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / repeats;
}
} // namespace

int main(int argc, char** argv) {
    std::string device = "cpu", dtypeName = "float32";
    std::vector<int64_t> lengths = {64, 128, 256, 512, 1024};
    ModelConfig config;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--device") && i + 1 < argc)
            device = argv[++i];
        else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc)
            dtypeName = argv[++i];
        else if (!std::strcmp(argv[i], "--published-defaults")) {
            // c_s 256, c 128, H 8, P_q 8, P_v 12, r 2, c_z 128 (the published FlashIPA layer)
            config.nodeDim = 256, config.headDim = 128, config.numHeads = 8, config.queryPoints = 8;
            config.valuePoints = 12, config.pairRank = 2, config.pairDim = 128, config.relPosFrequencies = 0;
        } else if (!std::strcmp(argv[i], "--lengths") && i + 1 < argc) {
            lengths.clear();
            std::stringstream list(argv[++i]);
            for (std::string item; std::getline(list, item, ',');)
                lengths.push_back(std::stoll(item));
        } else {
            std::cerr << "usage: flashipa-bench-layer [--device cpu|cuda] [--dtype float32|bfloat16] [--published-defaults] [--lengths a,b,c]\n";
            return 2;
        }
    }
    const bool cuda = device == "cuda";
    const torch::Device dev = cuda ? torch::kCUDA : torch::kCPU;
    const torch::Dtype dtype = dtypeName == "bfloat16" ? torch::kBFloat16 : torch::kFloat32;
    FlashIPALayer layer(config);
    randomizeParameters(*layer, 1, 1.0);
    layer->to(dev, dtype);
    std::cout << "device: " << (cuda ? "cuda" : "cpu") << ", dtype " << dtypeName << ", threads " << at::get_num_threads()
              << ", c_s " << config.nodeDim << " c " << config.headDim << " H " << config.numHeads << " P_q "
              << config.queryPoints << " P_v " << config.valuePoints << " r " << config.pairRank << " c_z " << config.pairDim << "\n";
    std::cout << "| L | math fwd (ms) | sdpa fwd (ms) | math fwd+bwd (ms) | sdpa fwd+bwd (ms) |\n|---|---|---|---|---|\n";
    for (int64_t L : lengths) {
        auto opts = torch::TensorOptions().device(dev).dtype(dtype);
        IPAInputs in;
        in.nodes = torch::randn({1, L, config.nodeDim}, opts).requires_grad_(true);
        in.pairLeft = torch::randn({1, L, config.pairRank, config.pairDim}, opts);
        in.pairRight = torch::randn({1, L, config.pairRank, config.pairDim}, opts);
        torch::Tensor atoms = torch::randn({1, L, 3, 3}, torch::TensorOptions().device(dev).dtype(torch::kFloat32)) * 3.0;
        in.frames = FrameBuilder::build(atoms, false);
        in.frames.rotations = in.frames.rotations.to(dtype);
        in.frames.translations = in.frames.translations.to(dtype);
        in.positions = torch::arange(L, opts).unsqueeze(0);
        const int repeats = L <= 1024 ? 10 : 3;
        std::cout << "| " << L;
        // The math path materialises [L, L, H, P, 3]; skip it where that would not fit comfortably.
        const bool mathFits = L * L * config.numHeads * config.queryPoints * 3 * 4 < (int64_t) 8e9;
        for (bool backward : {false, true})
            for (AttentionBackend backend : {AttentionBackend::Math, AttentionBackend::SDPA}) {
                if (backend == AttentionBackend::Math && !mathFits) {
                    std::cout << " | -";
                    continue;
                }
                double ms = timeIt([&] {
                    if (backward) {
                        layer->forward(in, backend).sum().backward();
                    } else {
                        torch::NoGradGuard noGrad;
                        layer->forward(in, backend);
                    }
                }, cuda, repeats);
                std::cout << " | " << ms;
            }
        std::cout << " |\n";
    }
    return 0;
}
