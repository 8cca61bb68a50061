#include "flashipa/AttentionBackend.h"
#include <stdexcept>

namespace FlashIPAPlugin {

AttentionBackend parseAttentionBackend(const std::string& name) {
    if (name == "math")
        return AttentionBackend::Math;
    if (name == "sdpa")
        return AttentionBackend::SDPA;
    if (name == "fused")
        return AttentionBackend::Fused;
    throw std::invalid_argument("unknown attention backend '" + name + "' (expected \"fused\", \"sdpa\" or \"math\")");
}

std::string attentionBackendName(AttentionBackend backend) {
    switch (backend) {
    case AttentionBackend::Math:
        return "math";
    case AttentionBackend::SDPA:
        return "sdpa";
    case AttentionBackend::Fused:
        return "fused";
    }
    return "?";
}

} // namespace FlashIPAPlugin
