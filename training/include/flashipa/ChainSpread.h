#ifndef FLASHIPA_CHAIN_SPREAD_H_
#define FLASHIPA_CHAIN_SPREAD_H_

#include <cstdint>
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

/**
 * Where generation starts: the noised data's distribution at sigmaMax (docs/MODEL.md, "Where generation
 * starts"). How far the frame atoms of a real chain of a given length spread about their centroid (the
 * root-mean-square displacement per coordinate, Rg / sqrt(3) over the frame atoms, a power law a L^nu fitted in
 * log-log to the single-segment chains of the training split), and how that spread divides among the chain's
 * cosine modes: a folded chain keeps most of its size in its first few modes, so a start that is isotropic in
 * every mode, even with the right total spread, hands the flow too little size where the size is decided and
 * every generated chain comes out compact. start() draws from a Gaussian with the training chains' mode
 * variances (ChainModes.inc, scripts/fit_chain_modes.py) plus sigmaMax of isotropic noise.
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

    /** Cosine modes whose variances the start takes from the training chains (the rest of the size is isotropic). */
    constexpr int ModeCount = 16;

    /** The variance of a real chain's frame atoms split by cosine mode (see modesOfChain). */
    struct Modes {
        /** Variance per coordinate (nm^2) of modes k = 1 .. min(ModeCount, 3L - 1), mode k of n = 3L atoms in
         *  chain order being phi_k(i) = sqrt(2 / n) cos(pi k (i + 1/2) / n). */
        std::vector<double> variances;
        /** The rest of the chain's variance about its centroid, per atom and coordinate (nm^2, >= 0). */
        double rest = 0;
    };

    /**
     * The mode variances of the single-segment training chains of about `length` residues (>= 1; mean over a
     * length bin of ChainModes.inc, interpolated in log-log between bins; beyond the first and last bins scaled by
     * the chain's total variance, 3L ofChain^2).
     */
    Modes modesOfChain(int64_t length, bool rna);

    /**
     * numSamples draws [numSamples, L, 3, 3] (nm, float64, CPU) of frame atoms from the Gaussian model of the
     * noised data at sigma (nm, >= 0): each chain (a run of equal consecutive `chains` ids [L]; RNA where every
     * residue's `types` entry [L] is a nucleotide) gets its modesOfChain variances along its cosine modes and its
     * rest isotropically; with several chains, each chain's centroid is displaced as the atoms of one chain of all
     * L residues spread (ofChain); every atom gets sigma of isotropic noise; each sample is centred.
     */
    torch::Tensor start(const torch::Tensor& types, const torch::Tensor& chains, double sigma, int64_t numSamples,
                        torch::Generator& generator);
}

} // namespace FlashIPAPlugin

#endif
