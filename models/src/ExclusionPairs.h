#ifndef FLASHIPA_EXCLUSION_PAIRS_SUMS_H_
#define FLASHIPA_EXCLUSION_PAIRS_SUMS_H_

// The geometry prior's exclusion term summed pair by pair (GeometryPrior::exclusionEnergy with
// ExclusionEvaluation::Pairwise): the energy of each structure and its first derivatives in one pass over the atom
// pairs, on the CPU (a loop over atoms) or the GPU (models/kernels/ExclusionPairs.cu), with memory linear in the
// atoms. Private to the model library.
#include <torch/torch.h>

namespace FlashIPAPlugin {

/** The sums of one pairwise evaluation. */
struct ExclusionPairSums {
    torch::Tensor energy;     ///< [B]
    torch::Tensor gradAtoms;  ///< [B, N, 3], dE/dx
    torch::Tensor gradSpread; ///< [B], dE/ds
};

/** Whether exclusionPairSums() evaluates atoms of this dtype on this device (float32 or float64; CPU, or CUDA with the kernels built). */
bool exclusionPairSumsApply(const torch::Tensor& atoms);

/**
 * The exclusion term of x [B, N = 3 L, 3] (no gradient tracked) for walls of spread s [B], chain segment ids
 * chains [B, L] and real [B, L] (bool): pairs of atoms of two real residues, not within nearest - 1 residues along
 * one segment; each pair as in GeometryPrior::exclusionEnergy, r softened by smallestDistance, pairs farther than
 * radius + cutoffSpreads s skipped.
 */
ExclusionPairSums exclusionPairSums(const torch::Tensor& x, const torch::Tensor& s, const torch::Tensor& chains, const torch::Tensor& real,
                                    int64_t nearest, double radius, double smallestDistance, double cutoffSpreads);

} // namespace FlashIPAPlugin

#endif // FLASHIPA_EXCLUSION_PAIRS_SUMS_H_
