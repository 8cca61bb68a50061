#include "flashipa/AttentionBackend.h"
#include "flashipa/FusedAttention.h"
#include <stdexcept>

namespace FlashIPAPlugin {

AttentionBackend parseAttentionBackend(const std::string& name) {
    if (name == "math")
        return AttentionBackend::Math;
    if (name == "sdpa")
        return AttentionBackend::SDPA;
    if (name == "fused")
        return AttentionBackend::Fused;
    if (name == "fused-fp32")
        return AttentionBackend::FusedFP32;
    if (name == "auto")
        return AttentionBackend::Auto;
    throw std::invalid_argument("unknown attention backend '" + name +
                                "' (expected \"auto\", \"fused\", \"fused-fp32\", \"sdpa\" or \"math\")");
}

std::string attentionBackendName(AttentionBackend backend) {
    switch (backend) {
    case AttentionBackend::Math:
        return "math";
    case AttentionBackend::SDPA:
        return "sdpa";
    case AttentionBackend::Fused:
        return "fused";
    case AttentionBackend::FusedFP32:
        return "fused-fp32";
    case AttentionBackend::Auto:
        return "auto";
    }
    return "?";
}

bool isFusedBackend(AttentionBackend backend) {
    return backend == AttentionBackend::Fused || backend == AttentionBackend::FusedFP32;
}

AttentionBackend resolveAttentionBackend(AttentionBackend requested, bool cudaTensors, bool doublePrecision) {
    if (requested != AttentionBackend::Auto)
        return requested;
    return cudaTensors && !doublePrecision && fusedAttentionAvailable() ? AttentionBackend::Fused : AttentionBackend::SDPA;
}

} // namespace FlashIPAPlugin
