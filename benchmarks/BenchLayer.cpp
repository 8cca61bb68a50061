// flashipa-bench-layer: times one FlashIPA layer forward (and forward+backward) for the math and SDPA
// backends over a range of lengths, on CPU or CUDA, and prints one table. A benchmark, not a test.
//   flashipa-bench-layer [--device cpu|cuda] [--dtype float32|float16] [--published-defaults] [--lengths 128,512,...]
//                        [--backends fused,fused-mma,sdpa,math] [--max-backward L]
// fused-mma is the fused backend held to the mma.sync kernels, forward and backward (what other sm_80+
// GPUs run; the wgmma ones are the default on an H100), to time the two side by side.
#include "flashipa/EnergyModel.h"
#include "flashipa/FusedAttention.h"
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <chrono>
#include <cstring>
#include <iostream>
#include <sstream>

using namespace FlashIPAPlugin;

namespace {
double timeIt(const std::function<void()>& run, bool cuda, int repeats, bool warmUp = true) {
    if (warmUp)
        run();
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

/** Attention FLOPs of one forward (per head and key-query pair: logits, point distances, weighted values). */
double attentionFlops(const ModelConfig& c, int64_t L) {
    const double perPair = 2.0 * (c.headDim + c.biasRank()) + 2.0 * 3 * c.queryPoints +
                           2.0 * (c.headDim + 3 * c.valuePoints + c.pairRank * c.pairValueDim());
    return perPair * c.numHeads * (double) L * (double) L;
}

/**
 * Mean time of run() replayed from a CUDA graph (launch overhead removed; what a simulation step
 * with CUDA graphs sees). Captured on a side stream after an eager warm-up.
 */
double timeGraphed(const std::function<void()>& run, int repeats) {
    at::cuda::CUDAGraph graph;
    c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool();
    {
        c10::cuda::CUDAStreamGuard guard(stream);
        run();
        torch::cuda::synchronize();
        graph.capture_begin();
        run();
        graph.capture_end();
    }
    return timeIt([&] { graph.replay(); }, true, repeats);
}

/** Peak bytes allocated by run() beyond what was allocated before it (CUDA only). */
double peakMiB(const std::function<void()>& run) {
    const int device = c10::cuda::current_device();
    auto* allocator = c10::cuda::CUDACachingAllocator::get();
    torch::cuda::synchronize();
    const int64_t before = allocator->getDeviceStats(device).allocated_bytes[0].current;
    allocator->resetPeakStats(device);
    run();
    torch::cuda::synchronize();
    return (allocator->getDeviceStats(device).allocated_bytes[0].peak - before) / (1024.0 * 1024.0);
}

int main(int argc, char** argv) {
    std::string device = "cpu", dtypeName = "float32";
    std::vector<int64_t> lengths = {64, 128, 256, 512, 1024};
    struct Backend {
        AttentionBackend backend;
        FusedKernelLimit kernelLimit;
        std::string name;
    };
    std::vector<Backend> backends = {{AttentionBackend::Math, FusedKernelLimit::Fastest, "math"},
                                     {AttentionBackend::SDPA, FusedKernelLimit::Fastest, "sdpa"}};
    int64_t maxBackward = 1 << 30, maxMath = 4096, maxGraph = 16384; // math: [L, L, H, P, 3] materialised
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
        } else if (!std::strcmp(argv[i], "--backends") && i + 1 < argc) {
            backends.clear();
            std::stringstream list(argv[++i]);
            for (std::string item; std::getline(list, item, ',');)
                if (item == "fused-mma")
                    backends.push_back({AttentionBackend::Fused, FusedKernelLimit::MmaSync, item});
                else
                    backends.push_back({parseAttentionBackend(item), FusedKernelLimit::Fastest, item});
        } else if (!std::strcmp(argv[i], "--max-backward") && i + 1 < argc) {
            maxBackward = std::stoll(argv[++i]);
        } else {
            std::cerr << "usage: flashipa-bench-layer [--device cpu|cuda] [--dtype float32|float16] [--published-defaults]\n"
                         "       [--lengths a,b,c] [--backends fused,fused-mma,sdpa,math] [--max-backward L]\n";
            return 2;
        }
    }
    const bool cuda = device == "cuda";
    const torch::Device dev = cuda ? torch::kCUDA : torch::kCPU;
    const torch::Dtype dtype = dtypeName == "float16" ? torch::kHalf : torch::kFloat32;
    FlashIPALayer layer(config);
    randomizeParameters(*layer, 1, 1.0);
    layer->to(dev, dtype);
    std::cout << "device: " << (cuda ? at::cuda::getDeviceProperties(0)->name : std::string("cpu")) << ", dtype " << dtypeName
              << ", c_s " << config.nodeDim << " c " << config.headDim << " H " << config.numHeads << " P_q " << config.queryPoints
              << " P_v " << config.valuePoints << " r " << config.pairRank << " c_z " << config.pairDim << ", batch 1\n"
              << "time: mean of repeats after a warm-up; memory: peak allocated beyond the inputs (MiB); TFLOP/s: attention FLOPs "
                 "(2(c+Rb) + 6P_q + 2(c+3P_v+r c_z/4) per head and pair) / forward time\n";
    std::cout << "| L | backend | fwd (ms) | fwd in a CUDA graph (ms) | fwd peak (MiB) | fwd TFLOP/s | fwd+bwd (ms) | fwd+bwd peak (MiB) |\n"
                 "|---|---|---|---|---|---|---|---|\n";
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
        in.positions = torch::arange(L, opts.dtype(dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32)).unsqueeze(0);
        const int repeats = L <= 4096 ? 20 : (L <= 65536 ? 3 : 1);
        const bool warmUp = L <= 131072; // beyond, one run of minutes: the first call is the measurement
        for (const Backend& choice : backends) {
            const AttentionBackend backend = choice.backend;
            setFusedKernelLimit(choice.kernelLimit);
            if (backend == AttentionBackend::Math && L > maxMath)
                continue; // materialises [L, L, H, P, 3]
            auto forward = [&] {
                torch::NoGradGuard noGrad;
                layer->forward(in, backend);
            };
            auto forwardBackward = [&] { layer->forward(in, backend).sum().backward(); };
            std::cout << "| " << L << " | " << choice.name;
            try {
                double ms = 0.0, mib = 0.0;
                if (warmUp) {
                    ms = timeIt(forward, cuda, repeats);
                    mib = cuda ? peakMiB(forward) : 0.0;
                } else if (cuda) { // one cold run, timed and measured at once
                    mib = peakMiB([&] { ms = timeIt(forward, cuda, 1, false); });
                } else {
                    ms = timeIt(forward, cuda, 1, false);
                }
                std::cout << " | " << ms << " | ";
                if (cuda && L <= maxGraph)
                    std::cout << timeGraphed(forward, repeats);
                else
                    std::cout << "-";
                std::cout << " | " << mib << " | " << attentionFlops(config, L) / (ms * 1e9);
            } catch (const std::exception& e) {
                std::cout << " | failed: " << std::string(e.what()).substr(0, 60) << " | | | ";
            }
            if (L <= maxBackward) {
                try {
                    const double ms = timeIt(forwardBackward, cuda, repeats);
                    std::cout << " | " << ms << " | " << (cuda ? peakMiB(forwardBackward) : 0.0);
                } catch (const std::exception& e) {
                    std::cout << " | failed: " << std::string(e.what()).substr(0, 60) << " | ";
                }
            } else {
                std::cout << " | - | -";
            }
            std::cout << " |\n" << std::flush;
        }
    }
    return 0;
}
