#include "flashipa/ChainSpread.h"
#include <cmath>
#include <stdexcept>
#include <string>

namespace FlashIPAPlugin {

double ChainSpread::ofChain(int64_t length, bool rna) {
    if (length < 1)
        throw std::invalid_argument("ChainSpread: a chain needs at least one residue, got " + std::to_string(length));
    return rna ? RnaPrefactor * std::pow(double(length), RnaExponent)
               : ProteinPrefactor * std::pow(double(length), ProteinExponent);
}

double ChainSpread::noised(int64_t length, bool rna, double sigma) {
    if (!(sigma >= 0) || !std::isfinite(sigma))
        throw std::invalid_argument("ChainSpread: sigma must be finite and non-negative");
    const double spread = ofChain(length, rna);
    return std::sqrt(sigma * sigma + spread * spread);
}

} // namespace FlashIPAPlugin
