#ifndef FLASHIPA_ATTENTION_BACKEND_H_
#define FLASHIPA_ATTENTION_BACKEND_H_

#include <string>

namespace FlashIPAPlugin {

/**
 * How the FlashIPA attention is evaluated. All backends compute the same function (docs/MATH.md §4).
 *  - Math:      materialised L x L logits; supports double backward; training and test oracle.
 *  - SDPA:      lifted Q/K/V through at::scaled_dot_product_attention; never stores L x L.
 *  - Fused:     the project's own CUDA kernels with the scalar part on tensor cores: scalar features
 *               (q, k, v, bias and pair factors) rounded to fp16, points exact in fp32 (hi + lo split,
 *               tile re-centring), fp32 accumulation and softmax. CUDA only.
 *  - FusedFP32: the same kernels with every operand in fp32 (the SIMT kernels). CUDA only.
 *  - Auto:      Fused where it runs (CUDA tensors in float32 or float16, a build with the kernels),
 *               SDPA otherwise; resolved per call by resolveAttentionBackend(). Meant to become
 *               FlashIPAForce's default once it has run on a GPU (docs/KNOWN-ISSUES.md).
 */
enum class AttentionBackend { Math, SDPA, Fused, FusedFP32, Auto };

/** Parses "math", "sdpa", "fused", "fused-fp32" or "auto"; throws std::invalid_argument naming the accepted values. */
AttentionBackend parseAttentionBackend(const std::string& name);
/** The name parseAttentionBackend() accepts for a backend. */
std::string attentionBackendName(AttentionBackend backend);
/** True for Fused and FusedFP32 (the CUDA kernels). */
bool isFusedBackend(AttentionBackend backend);
/**
 * The backend that runs for a request on tensors of this device and element type: Auto becomes Fused
 * for CUDA tensors in float32 or float16 when the build has the fused kernels, SDPA otherwise (CPU,
 * float64); every other request is returned unchanged (so an impossible explicit choice still fails
 * with its own message).
 */
AttentionBackend resolveAttentionBackend(AttentionBackend requested, bool cudaTensors, bool doublePrecision);

} // namespace FlashIPAPlugin

#endif
