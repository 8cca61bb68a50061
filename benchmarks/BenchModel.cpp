// flashipa-bench-model: GPU time of the energy model alone (energy + forces + parameter derivatives, the
// exact work the CUDA platform does per step), replayed from a CUDA graph as the plugin does. Subtracting
// it from the learned force's per-step cost in md_benchmark.py gives the plugin's own overhead. The peak column
// is the caching allocator's peak of the capture and replays (the exclusion term of prior versions 5 and 6 is
// evaluated pair by pair, GeometryPrior::ExclusionEvaluation, in memory linear in the atoms).
//   flashipa-bench-model [--lengths 114,513,2052,8208] [--replays 200] [--model PATH]
#include "flashipa/DefaultModel.h"
#include "flashipa/ForceEvaluator.h"
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cstring>
#include <cuda_runtime.h>
#include <iostream>
#include <sstream>

using namespace FlashIPAPlugin;

int main(int argc, char** argv) {
    AttentionBackend backend = AttentionBackend::SDPA;
    std::vector<int64_t> lengths = {114, 513, 2052, 8208};
    int replays = 200;
    std::string modelPath = defaultModelPath();
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--lengths") && i + 1 < argc) {
            lengths.clear();
            std::stringstream list(argv[++i]);
            for (std::string item; std::getline(list, item, ',');)
                lengths.push_back(std::stoll(item));
        } else if (!std::strcmp(argv[i], "--replays") && i + 1 < argc)
            replays = std::stoi(argv[++i]);
        else if (!std::strcmp(argv[i], "--backend") && i + 1 < argc)
            backend = parseAttentionBackend(argv[++i]);
        else if (!std::strcmp(argv[i], "--model") && i + 1 < argc)
            modelPath = argv[++i];
        else {
            std::cerr << "usage: flashipa-bench-model [--lengths a,b,c] [--replays N] [--backend auto|fused|fused-fp32|sdpa|math] [--model PATH]\n";
            return 2;
        }
    }
    if (!torch::cuda::is_available()) {
        std::cout << "flashipa-bench-model: no CUDA device here; nothing to measure\n";
        return 0;
    }
    cudaDeviceProp properties;
    cudaGetDeviceProperties(&properties, 0);
    EnergyModel model = loadEnergyModel(modelPath);
    std::cout << "GPU: " << properties.name << "; model " << modelPath << " (geometry prior version "
              << model->config().geometryPrior << "), float32, " << attentionBackendName(backend) << " backend, graph replay\n\n"
              << "| L | model ms per evaluation (graph) | peak GPU memory (MiB) |\n|---:|---:|---:|\n";
    for (int64_t L : lengths) {
        ForceEvaluator evaluator(loadEnergyModel(modelPath), torch::Device(torch::kCUDA, 0), torch::kFloat32, backend);
        c10::cuda::CUDACachingAllocator::emptyCache();
        c10::cuda::CUDACachingAllocator::resetPeakStats(0);
        std::vector<int64_t> atoms(3 * L), types(L), chains(L);
        for (int64_t i = 0; i < 3 * L; i++)
            atoms[i] = i;
        for (int64_t i = 0; i < L; i++)
            types[i] = i % 20, chains[i] = i / 57;
        c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(false, 0);
        c10::cuda::CUDAStreamGuard guard(stream);
        evaluator.setResidues(atoms, types, chains);
        // A helix-like chain: residues 0.38 nm apart along a spiral, atoms offset so frames are well defined.
        torch::Tensor index = torch::arange(L, torch::kFloat32).view({L, 1, 1});
        torch::Tensor offsets = torch::tensor({-0.1f, 0.05f, 0.0f, 0.0f, 0.0f, 0.0f, 0.12f, 0.06f, 0.03f}).view({1, 3, 3});
        torch::Tensor axis = torch::cat({torch::cos(index * 1.745f) * 0.23f, torch::sin(index * 1.745f) * 0.23f, index * 0.15f}, -1);
        torch::Tensor x = (axis + offsets).to(torch::kCUDA).contiguous();
        torch::Tensor parameters = torch::tensor({1.0f, 0.05f, 300.0f}).to(torch::kCUDA);
        DeviceForceEvaluation out;
        for (int i = 0; i < 3; i++)
            out = evaluator.evaluateOnDevice(x, parameters);
        at::cuda::CUDAGraph graph;
        graph.capture_begin();
        out = evaluator.evaluateOnDevice(x, parameters);
        graph.capture_end();
        graph.replay();
        stream.synchronize();
        cudaEvent_t start, stop;
        cudaEventCreate(&start);
        cudaEventCreate(&stop);
        cudaEventRecord(start, stream.stream());
        for (int i = 0; i < replays; i++)
            graph.replay();
        cudaEventRecord(stop, stream.stream());
        cudaEventSynchronize(stop);
        float ms = 0;
        cudaEventElapsedTime(&ms, start, stop);
        const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
        const double peak = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak / 1048576.0;
        std::cout << "| " << L << " | " << ms / replays << " | " << peak << " |\n";
    }
    return 0;
}
