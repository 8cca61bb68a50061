#ifndef FLASHIPA_FLASHIPA_LAYER_H_
#define FLASHIPA_FLASHIPA_LAYER_H_

#include "flashipa/AttentionBackend.h"
#include "flashipa/FrameBuilder.h"
#include "flashipa/ModelConfig.h"
#include <torch/torch.h>

namespace FlashIPAPlugin {

/** Inputs of one IPA layer, batched: B structures of L residues (padded, see mask). */
struct IPAInputs {
    torch::Tensor nodes;        ///< s [B, L, c_s]
    torch::Tensor pairLeft;     ///< z1 [B, L, r, c_z]; undefined when r == 0
    torch::Tensor pairRight;    ///< z2 [B, L, r, c_z]; undefined when r == 0
    Frames frames;              ///< R [B, L, 3, 3], t [B, L, 3] in nm
    torch::Tensor positions;    ///< sequence position of each residue [B, L]: integer values in float32 or
                                ///< float64 (fp16 holds integers exactly only up to 2048, and overflows at 65504)
    torch::Tensor mask;         ///< [B, L] bool, true = real residue; undefined = all real
};

/**
 * Invariant Point Attention with a factorised pair representation (docs/MATH.md §2-§4). The math and
 * SDPA backends compute the same function: the math path materialises the logits, the SDPA path
 * lifts queries/keys/values so that the logits become one dot product and calls
 * at::scaled_dot_product_attention with scale 1 (no L x L tensor). Coordinates are centred on the
 * frame origins' mean before use: the function is unchanged (softmax weights sum to one) and the
 * lifted point terms no longer cancel large numbers far from the origin (docs/MATH.md §5). The fused
 * backend (CUDA) computes the same function in the project's own kernel (models/kernels), with
 * point terms in fp32 from differences; it keeps no lifted tensor and no L x L buffer.
 */
class FlashIPALayerImpl : public torch::nn::Module {
public:
    explicit FlashIPALayerImpl(const ModelConfig& config);

    /**
     * The update to the node representation, [B, L, c_s] (the output projection is zero-initialised).
     * AttentionBackend::Auto is resolved here from the nodes' device and type (resolveAttentionBackend).
     */
    torch::Tensor forward(const IPAInputs& inputs, AttentionBackend backend);

    /** Width of each head's lifted query/key vector (before padding). */
    int liftedKeyDim() const;
    /** Width of each head's lifted value vector (before padding). */
    int liftedValueDim() const;

    torch::nn::Linear linearQ{nullptr}, linearK{nullptr}, linearV{nullptr};
    torch::nn::Linear linearQPoints{nullptr}, linearKPoints{nullptr}, linearVPoints{nullptr};
    torch::nn::Linear linearBias{nullptr};      ///< c_z -> H, applied to each rank of z1 and z2
    torch::nn::Linear linearPairDown{nullptr};  ///< c_z -> c_z/4, pair-value factors
    torch::nn::Linear linearOut{nullptr};
    torch::Tensor headWeights;                  ///< theta_h; gamma_h = softplus(theta_h)
    torch::Tensor relPosWeights;                ///< alpha_hk [H, K]: bias += sum_k alpha_hk cos(omega_k (i - j))

private:
    struct Projected;
    Projected project(const IPAInputs& inputs, bool float32Points);
    torch::Tensor attendMath(const Projected& p, const IPAInputs& inputs);
    /** Throws std::runtime_error when the math path would not fit in half of this machine's memory (CPU only). */
    void checkMathMemory(int64_t B, int64_t L, bool onGpu, int64_t elementSize) const;
    torch::Tensor attendSDPA(const Projected& p, const IPAInputs& inputs);
    /** The fused kernels with the scalar operands in attentionType (fp16: tensor cores; fp32: SIMT). */
    torch::Tensor attendFused(const Projected& p, const IPAInputs& inputs, torch::Dtype attentionType);
    torch::Tensor unlift(const Projected& p, const torch::Tensor& scalar, const torch::Tensor& pointsGlobal,
                         const torch::Tensor& pairAggregate, const IPAInputs& inputs);
    ModelConfig config;
};
TORCH_MODULE(FlashIPALayer);

} // namespace FlashIPAPlugin

#endif
