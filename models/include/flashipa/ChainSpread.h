#ifndef FLASHIPA_CHAIN_SPREAD_H_
#define FLASHIPA_CHAIN_SPREAD_H_

#include <cstdint>

namespace FlashIPAPlugin {

/**
 * How far the frame atoms of a real chain of a given length spread about their centroid: the root-mean-square
 * displacement per coordinate (Rg / sqrt(3) over the frame atoms), from a power law a L^nu fitted in log-log to
 * the single-segment chains of the training split (docs/MODEL.md, "Where generation starts"). Generation
 * starts from the noised data's distribution at sigmaMax, whose spread per coordinate is
 * sqrt(sigmaMax^2 + chainSpread^2), not sigmaMax alone: starting narrower shrinks every generated chain.
 */
namespace ChainSpread {
    /** Protein: a (nm) and nu of the power law. */
    constexpr double ProteinPrefactor = 0.2066, ProteinExponent = 0.3015;
    /** RNA: a (nm) and nu of the power law. */
    constexpr double RnaPrefactor = 0.4618, RnaExponent = 0.2470;

    /** Spread per coordinate (nm) of a chain of `length` residues (>= 1; std::invalid_argument otherwise). */
    double ofChain(int64_t length, bool rna);
    /** Spread per coordinate (nm) of such a chain noised by sigma (nm, >= 0): sqrt(sigma^2 + ofChain^2). */
    double noised(int64_t length, bool rna, double sigma);
}

} // namespace FlashIPAPlugin

#endif
