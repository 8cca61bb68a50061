#ifndef CUDA_CALC_FLASHIPA_FORCE_KERNEL_H_
#define CUDA_CALC_FLASHIPA_FORCE_KERNEL_H_

#include "FlashIPAKernels.h"
#include "FrameAtomTransfer.h"
#include "flashipa/ForceEvaluator.h"
#include "openmm/cuda/CudaContext.h"
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#include <memory>

namespace FlashIPAPlugin {

/**
 * FlashIPAForce on the CUDA platform, resident on the GPU: frame atoms are gathered from OpenMM's posq,
 * the model runs in LibTorch on the same device, and forces, energy and parameter derivatives are added
 * to OpenMM's buffers by kernels. The host never waits for the GPU: OpenMM's stream and LibTorch's stream
 * are ordered with events, the energy goes into OpenMM's energy buffer (OpenMM reduces it only when asked),
 * and degenerate frames are reported through a host-mapped flag read one evaluation later (or at once
 * when OpenMM synchronises for the energy anyway).
 *
 * LibTorch always works in the device's primary CUDA context, OpenMM in its own; each call pushes the
 * primary context around LibTorch work and pops it after, and both read each other's memory through
 * unified addressing.
 */
class CudaCalcFlashIPAForceKernel : public CalcFlashIPAForceKernel {
public:
    CudaCalcFlashIPAForceKernel(std::string name, const OpenMM::Platform& platform, OpenMM::CudaContext& cu);
    ~CudaCalcFlashIPAForceKernel();
    void initialize(const OpenMM::System& system, const FlashIPAForce& force) override;
    double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy) override;
    void copyParametersToContext(OpenMM::ContextImpl& context, const FlashIPAForce& force) override;
    long long getNumSkippedResidues() const override;

private:
    void setResidues(const FlashIPAForce& force);
    /** Runs the model on the static tensors (eagerly, or captured once and replayed). */
    void evaluateModel();
    void throwIfInvalid();
    OpenMM::CudaContext& cu;
    std::unique_ptr<ForceEvaluator> evaluator;
    torch::Device device;
    torch::Dtype dtype;
    bool useGraphs = true;
    int numFrameAtoms = 0;
    // Static tensors: the graph reads and writes these addresses on every replay.
    torch::Tensor frameAtomIndices, sortedIndex, atoms, parameters;
    torch::Tensor skippedTotal; // [] int64 on the device: residue evaluations skipped (degenerate-frame policy "skip")
    bool skipDegenerate = false;
    DeviceForceEvaluation outputs;
    std::unique_ptr<at::cuda::CUDAGraph> graph;
    int warmupEvaluations = 0;
    std::unique_ptr<c10::cuda::CUDAStream> stream;
    CUcontext primaryContext = nullptr;
    CUevent openmmReady = nullptr, modelDone = nullptr; // created in OpenMM's / the primary context
    int* invalidFlagHost = nullptr;                      // host-mapped, written by the scatter kernel
    int* invalidFlagDevice = nullptr;
    int derivativeIndex[3] = {-1, -1, -1};
    bool derivativeIndicesKnown = false;
};

} // namespace FlashIPAPlugin

#endif
