#ifndef FLASHIPA_OPERAND_PACKING_H_
#define FLASHIPA_OPERAND_PACKING_H_

// The fused attention's call description and the tensor-core kernels' packed operands, built from the
// operator's tensors: on the GPU by the packing kernels (models/kernels/OperandPacking.cu), the path the
// operator takes, and with LibTorch ops, the reference the tests compare them with. Internal to the model
// library and only built with the CUDA kernels (it needs their headers).
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
#include "../kernels/FusedAttentionProblem.h"
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {
namespace packing {

/**
 * The call's description; t holds, in order: q k v biasLeft biasRight queryPoints keyPoints valuePoints
 * pairValues pointWeight segment keyBegin keyEnd (contiguous; absent parts as zero-width tensors).
 */
kernels::FusedAttentionProblem describe(const std::vector<torch::Tensor>& t, double scalarScale, double biasScale);

/** A forward pack and the tensors that own its buffers (in the order of TensorCorePack's pointers). */
struct PackedOperands {
    std::vector<torch::Tensor> keepAlive;
    kernels::TensorCorePack pack;
};

/** A backward pack and the tensors that own its buffers (in the order of TensorCoreBackwardPack's pointers). */
struct PackedBackwardOperands {
    std::vector<torch::Tensor> keepAlive;
    kernels::TensorCoreBackwardPack pack;
};

/** The forward's operands, packed by the GPU packing kernels. */
PackedOperands packForward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p, kernels::TensorCorePack::Layout layout);

/** The same, packed with LibTorch ops (the reference). */
PackedOperands packForwardWithTorch(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p,
                                    kernels::TensorCorePack::Layout layout);

/** The backward's operands from the forward's log-sum-exp and delta and the output's gradient (fp32), packed on the GPU. */
PackedBackwardOperands packBackward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p, const torch::Tensor& gradOut,
                                    const torch::Tensor& logSumExp, const torch::Tensor& delta, kernels::TensorCoreBackwardPack::Layout layout);

/** The same, packed with LibTorch ops (the reference). */
PackedBackwardOperands packBackwardWithTorch(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p,
                                             const torch::Tensor& gradOut, const torch::Tensor& logSumExp, const torch::Tensor& delta,
                                             kernels::TensorCoreBackwardPack::Layout layout);

} // namespace packing
} // namespace FlashIPAPlugin

#endif
#endif
