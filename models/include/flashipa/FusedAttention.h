#ifndef FLASHIPA_FUSED_ATTENTION_H_
#define FLASHIPA_FUSED_ATTENTION_H_

#include <torch/torch.h>

namespace FlashIPAPlugin {

/**
 * The inputs of the fused FlashIPA attention (docs/MATH.md §4), one row per residue, packed over
 * structures: rows attend to the rows of their own segment. Scalar features may be float32 or
 * float16 (all the same type); points are float32 in the global frame, already centred.
 */
struct FusedAttentionInputs {
    torch::Tensor q, k, v;                ///< [N, H, c]
    torch::Tensor biasLeft, biasRight;    ///< [N, H, Rb]; undefined = no bias factors
    torch::Tensor queryPoints, keyPoints; ///< [N, H, P_q, 3] float32
    torch::Tensor valuePoints;            ///< [N, H, P_v, 3] float32
    torch::Tensor pairValues;             ///< [N, r, c_z/4] (Z2, shared by the heads); undefined = none
    torch::Tensor pointWeight;            ///< [H] float32: w_h = gamma_h w_L w_C
    torch::Tensor segment;                ///< [N] integer; < 0 = padding. A segment's rows must be contiguous.
    torch::Tensor keyBegin, keyEnd;       ///< [N] optional: each row's segment range; computed from segment when undefined
};

/** True when this build contains the fused CUDA kernels. */
bool fusedAttentionAvailable();

/**
 * The fused attention with autograd (first order: forces and training gradients; double backward is
 * refused with an error, train with the math path). Returns the lifted output [N, H, c + 3 P_v + r c_z/4]
 * in float32: the scalar values, the value points (global frame, x y z per point), the pair values
 * per head. Logits: scalarScale q.k + biasScale bl.br - w_h/2 sum_p |x_p - y_p|^2.
 * Throws std::invalid_argument for inputs of the wrong shape, type or device.
 */
torch::Tensor fusedIPAAttention(const FusedAttentionInputs& inputs, double scalarScale, double biasScale);

/**
 * The fastest kind of kernel the fused backend may use, process-wide, for the forward and the backward
 * (for tests and benchmarks that compare the kernels; users keep the default): Fastest picks wgmma on
 * compute capability 9.0 GPUs, mma.sync tensor cores on other sm_80+ GPUs, SIMT otherwise; MmaSync stops
 * at mma.sync (what other sm_80+ GPUs run); Simt uses the fp32 kernels for every element type.
 */
enum class FusedKernelLimit { Fastest, MmaSync, Simt };
void setFusedKernelLimit(FusedKernelLimit limit);

/** Each row's key range [begin, end): the run of equal segment ids it belongs to. */
std::pair<torch::Tensor, torch::Tensor> segmentKeyRanges(const torch::Tensor& segment);

} // namespace FlashIPAPlugin

#endif
