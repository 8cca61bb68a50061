#ifndef FLASHIPA_ATTENTION_BACKEND_H_
#define FLASHIPA_ATTENTION_BACKEND_H_

#include <string>

namespace FlashIPAPlugin {

/**
 * How the FlashIPA attention is evaluated. All backends compute the same function (DESIGN 2.4).
 *  - Math:  materialised L x L logits; supports double backward; training and test oracle.
 *  - SDPA:  lifted Q/K/V through at::scaled_dot_product_attention; never stores L x L.
 *  - Fused: the project's own CUDA kernel (CUDA only).
 */
enum class AttentionBackend { Math, SDPA, Fused };

/** Parses "math", "sdpa" or "fused"; throws std::invalid_argument naming the accepted values. */
AttentionBackend parseAttentionBackend(const std::string& name);
/** The name parseAttentionBackend() accepts for a backend. */
std::string attentionBackendName(AttentionBackend backend);

} // namespace FlashIPAPlugin

#endif
