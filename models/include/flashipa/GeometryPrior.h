#ifndef FLASHIPA_GEOMETRY_PRIOR_H_
#define FLASHIPA_GEOMETRY_PRIOR_H_

#include <string>
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

class Dataset;

/**
 * One kind of atom pair the geometry prior holds: frame atoms atomI of residue i and atomJ of residue
 * i + offset (offset 0: inside a residue; 1: across the link to the next residue of the same chain), for
 * residues of one molecule type.
 */
struct GeometryPairKind {
    bool rna;          ///< false: protein (N, CA, C); true: RNA (C3', C4', O4')
    int offset;        ///< 0 or 1
    int atomI, atomJ;  ///< frame-atom indices 0..2
    const char* name;  ///< e.g. "N-CA", "C-N+1"
};

/**
 * The analytic part of the energy model (docs/MODEL.md, "Geometry prior"): for every covalent bond between
 * frame atoms, minus the log-density of the pair's difference vector r under the noise
 * the model is trained on, with the pair's true length spread about d0 with standard deviation s0 and
 * each atom displaced by isotropic Gaussian noise of standard deviation sigma (variance v = s0^2 + 2 sigma^2
 * per component of r, its direction uniform):
 *
 *     E_pair(r; sigma) = log r + (r - d0)^2 / (2 v) - log(1 - exp(-2 r d0 / v))     [kT]
 *
 * the exact score of that distance marginal at every sigma (bond-stiff at small sigma, flat at large sigma).
 * The network learns the rest. (d0, s0) per kind are measured on the training split (median and
 * 1.4826 x median absolute deviation) and stored in the model's checkpoint.
 *
 * Version 2 multiplies each pair's term by chainWeight(): a sum of independent pair marginals counts each
 * atom's noise once per bond it is in, which over-pulls bonded atoms by up to 1.5x at large sigma
 * (docs/MODEL.md, "Chain weight").
 */
namespace GeometryPrior {
    /** The pair kinds, in the order of the stats rows. */
    const std::vector<GeometryPairKind>& pairKinds();
    /** The kinds as a float tensor [K, 4] (rna, offset, atomI, atomJ), as stored in checkpoints. */
    torch::Tensor pairTable(const torch::TensorOptions& options);
    /** (d0, s0) per kind [K, 2] (nm, float64, CPU), from the training split of a data set. */
    torch::Tensor measure(const Dataset& data);
    /**
     * The prior energy [B] in kT of frame atoms [B, L, 3, 3] (nm) with types [B, L], chain ids [B, L]
     * (consecutive residues with equal ids are linked), mask [B, L] (bool, or undefined = all real) and
     * sigma [B], for stats [K, 2] (same device and dtype as atoms).
     */
    torch::Tensor energy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                         const torch::Tensor& mask, const torch::Tensor& sigma, const torch::Tensor& stats,
                         int version = 1);
    /**
     * Version 2's weight of a bond's term [B] at noise levels sigma [B] (nm), for a bond of length d0 (nm, a
     * scalar tensor on sigma's device) in
     * a protein backbone (rna false: an unbranched chain of bonds) or an RNA residue's frame atoms (rna true:
     * a path of two bonds). For a harmonic chain of bonds with per-component variance a, noised by sigma,
     * the exact score of each normal mode (Laplacian eigenvalue lambda) is lambda / (a + lambda sigma^2)
     * while the sum of pair marginals gives lambda / (a + 2 sigma^2); the weight makes their mean pull along
     * the bonds (modes weighted by lambda^2) agree:
     *
     *     w = (a + 2 sigma^2) <lambda^2 / (a + lambda sigma^2)> / <lambda^2>,     a = 4 d0^2 / 3
     *
     * 1 at sigma -> 0; 2/3 (chain) and 4/5 (path of two bonds) at large sigma. a = 4 d0^2 / 3 is fitted to
     * the least-squares optimal weight measured on validation chains (docs/MODEL.md).
     */
    torch::Tensor chainWeight(const torch::Tensor& sigma, const torch::Tensor& d0, bool rna);
}

} // namespace FlashIPAPlugin

#endif
