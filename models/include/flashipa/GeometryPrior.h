#ifndef FLASHIPA_GEOMETRY_PRIOR_H_
#define FLASHIPA_GEOMETRY_PRIOR_H_

#include <string>
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

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
 * 1.4826 x median absolute deviation; GeometryPriorStatistics.h, in the training library) and stored in the
 * model's checkpoint.
 *
 * Version 2 multiplies each pair's term by chainWeight(): a sum of independent pair marginals counts each
 * atom's noise once per bond it is in, which over-pulls bonded atoms by up to 1.5x at large sigma
 * (docs/MODEL.md, "Chain weight"). Version 3 keeps the pair terms unweighted and adds
 * backboneChainEnergy(), the correction of every backbone mode rather than of their mean. Version 4 adds
 * correlatedChainEnergy() instead: the same correction for a chain whose neighbouring bonds are correlated
 * as in the data (bond angles), with the covariances measureBondCovariance() finds on the training split.
 * Version 5 is version 4 plus exclusionEnergy(): frame atoms of residues that are not bonded neighbours are kept
 * apart (docs/MODEL.md, "Generated samples clash"). Version 6 counts only residues at least three apart along a
 * chain segment (exclusionNearest()).
 */
namespace GeometryPrior {
    /** The pair kinds, in the order of the stats rows. */
    const std::vector<GeometryPairKind>& pairKinds();
    /** The kinds as a float tensor [K, 4] (rna, offset, atomI, atomJ), as stored in checkpoints. */
    torch::Tensor pairTable(const torch::TensorOptions& options);
    /**
     * The prior energy [B] in kT of frame atoms [B, L, 3, 3] (nm) with types [B, L], chain ids [B, L]
     * (consecutive residues with equal ids are linked), mask [B, L] (bool, or undefined = all real) and
     * sigma [B], for stats [K, 2] (same device and dtype as atoms).
     */
    torch::Tensor energy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                         const torch::Tensor& mask, const torch::Tensor& sigma, const torch::Tensor& stats,
                         int version = 1, const torch::Tensor& bondCovariance = {});
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
    /**
     * Version 3's chain term [B] (kT): the exact score of a freely jointed Gaussian chain's backbone modes
     * minus what the bond terms already give in the same harmonic picture (docs/MODEL.md, "The backbone
     * chain term"). On the protein backbone path N CA C N+1 ... of each chain, with bond vectors b, bond
     * variance a per component (the protein bonds' mean d0^2 / 3) and noise sigma per atom, the bonds'
     * covariance is a I + sigma^2 T (T the path's bond-space Laplacian: 2 on the diagonal, -1 between
     * adjacent bonds), so
     *
     *     E_chain = 1/2 [ b^T (a I + sigma^2 T)^-1 b - b^T b / (a + 2 sigma^2) ]     per coordinate, summed
     *
     * It vanishes as sigma -> 0 and adds the low-mode pull that bond terms lack at large sigma. real [B, L]
     * (bool) marks real residues; RNA residues take no part.
     */
    torch::Tensor backboneChainEnergy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                                      const torch::Tensor& real, const torch::Tensor& sigma, const torch::Tensor& stats);
    /**
     * The smallest value over t of c0 + 2 c1 cos t + 2 c2 cos 2t for covariances (c0, c1, c2): the
     * smallest eigenvalue a long chain's banded bond covariance approaches (finite chains stay above it).
     */
    double bondSpectrumMinimum(double c0, double c1, double c2);
    /** Whether covariances (c0, c1, c2) define a positive definite chain covariance at every length:
     *  c0 > 0 and bondSpectrumMinimum() > 0. */
    bool isPositiveDefiniteBondCovariance(double c0, double c1, double c2);
    /**
     * The bond slots of the protein backbone path [B, 3L] (bool): slot 3i + p is residue i's N-CA (p = 0),
     * CA-C (1) and C(i)-N(i+1) (2), present for real protein residues, the link only where the next residue is
     * one too with the same chain id (the last residue's link never). types, chains, real [B, L].
     */
    torch::Tensor backboneBondSlots(const torch::Tensor& types, const torch::Tensor& chains, const torch::Tensor& real);
    /** Version 4's fade-in noise level (nm) of the bond correlations (correlatedChainEnergy()). */
    constexpr double CorrelationFadeSigma = 0.05;
    /**
     * Version 4's chain term [B] (kT): version 3's with bonds correlated as in the data. On the protein
     * backbone path of each chain the bond vectors b are modelled per component as a stationary Gaussian
     * with covariance C (c0 on the diagonal, c1 between adjacent bonds, c2 between bonds two apart; zero
     * across chain breaks); noised by sigma per atom their covariance is C + sigma^2 T, so
     *
     *     E_chain = 1/2 [ b^T (C_g + sigma^2 T)^-1 b - b^T b / (c0 + 2 sigma^2) ]     per coordinate, summed
     *
     * the bonds' Gaussian energy minus what the bond terms give in the same picture. C_g = c0 I + g (C - c0 I)
     * fades the correlations in with the noise, g = sigma^2 / (sigma^2 + CorrelationFadeSigma^2): at large
     * sigma the chain has the data's bond angles, and as sigma -> 0 the term vanishes as version 3's does,
     * leaving local geometry to the exact bond terms and the network (the Gaussian angle energy that the
     * unfaded term keeps at sigma -> 0 raised the untrained model's loss below sigma = 0.05 nm by 15 %;
     * docs/MODEL.md). C_g is positive definite for every g in [0, 1] (a mean of two that are).
     * bondCovariance [3] = (c0, c1, c2), same device and dtype as atoms; real [B, L] (bool).
     */
    torch::Tensor correlatedChainEnergy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                                        const torch::Tensor& real, const torch::Tensor& sigma, const torch::Tensor& bondCovariance);
    /** The exclusion radius (nm) of versions 5 and 6: frame atoms of non-neighbouring residues are hardly ever closer
     *  in the data (150 training chains: the smallest such distance 0.242 nm, a C(i)-N(i+2) pair, and 1.4 pairs per
     *  100 residues below 0.3 nm; without the i, i+2 pairs 0.286 nm; benchmarks/results/prior/close_pairs_cpu.md). */
    constexpr double ExclusionRadius = 0.27;
    /** Version 5's intrinsic width of the exclusion wall (nm), added to the noise: s^2 = 2 sigma^2 + width^2. */
    constexpr double ExclusionWidth = 0.01;
    /** Up to this many atom pairs exclusionEnergy() is one dense evaluation (a training batch of 64 crops of 256
     *  residues has 38 M); above it (a chain of 8,208 residues has 606 M) it runs in blocks of ExclusionBlockPairs. */
    constexpr int64_t ExclusionDensePairs = int64_t(1) << 26;
    /** The most atom pairs one block of the blocked exclusionEnergy() holds (about 25 tensors of this size live
     *  at once: 1.6 GB in float32). */
    constexpr int64_t ExclusionBlockPairs = int64_t(1) << 24;
    /**
     * The smallest separation along a chain segment at which the exclusion term counts a pair of residues: 2 in
     * version 5 (every pair but linked neighbours), 3 in version 6, which leaves the i, i+2 pairs to the bond terms
     * and the network: their C(i)-N(i+2) distance is set by the torsions of the residue between, below 0.35 nm in
     * 42 % of native residues (short in the helical region), not a contact the term's uniform density describes
     * (docs/MODEL.md, "Generated samples clash").
     */
    constexpr int64_t exclusionNearest(int version) { return version >= 6 ? 3 : 2; }
    /**
     * How exclusionEnergy() evaluates the term. Pairwise (the default): one pass over the atom pairs on the CPU or
     * the GPU (models/kernels/ExclusionPairs.cu), energy and first derivatives analytic, memory linear in the
     * atoms, pairs beyond ExclusionRadius + ExclusionCutoffSpreads s skipped; a second derivative, where a caller
     * asks for one, comes from the Tensors evaluation, recomputed in the backward pass. Tensors: LibTorch
     * operations over the pair matrix (dense up to densePairs, then in blocks), differentiable to any order; the
     * pairwise evaluation's test oracle, and the route for dtypes and devices the kernels do not take.
     */
    enum class ExclusionEvaluation { Pairwise, Tensors };
    /** The pairwise evaluation skips pairs farther than ExclusionRadius + this many spreads s: their term is below 1e-31 kT. */
    constexpr double ExclusionCutoffSpreads = 12.0;
    /**
     * The exclusion term [B] of versions 5 and 6 (kT): for every pair of frame atoms of two real residues that are
     * neither the same residue nor within nearest - 1 residues along one chain segment (nearest = 2: all but linked
     * neighbours, consecutive residues with equal chain ids; see exclusionNearest()), minus the log-density of
     * the pair's distance r when the true separation is spread uniformly outside a ball of radius r0
     * (ExclusionRadius) and each atom is noised by sigma (s^2 = 2 sigma^2 + ExclusionWidth^2 per component):
     *
     *     E_pair = -log(1 - F(r)),   F(r) = Phi((r0 - r)/s) + Phi((r0 + r)/s) - 1 - (s/r) [phi((r0 - r)/s) - phi((r0 + r)/s)]
     *
     * F is the probability that a Gaussian of spread s about a point at distance r lies inside the ball. A hard
     * wall as sigma -> 0, negligible at large sigma. Inside the wall 1 - F is evaluated in log space (erfcx), so
     * the energy and its first and second derivatives stay finite for any r. Up to ExclusionDensePairs atom pairs
     * (B (3L)^2) it is one dense evaluation; above, it runs over blocks of rows and recomputes each block in the
     * backward pass, so memory stays O(ExclusionBlockPairs) at any length with the same values and derivatives
     * (first and second). real [B, L] (bool). That is the Tensors evaluation; the default is the Pairwise one
     * (ExclusionEvaluation). densePairs and blockPairs replace the Tensors evaluation's limits (tests).
     */
    torch::Tensor exclusionEnergy(const torch::Tensor& atoms, const torch::Tensor& chains, const torch::Tensor& real,
                                  const torch::Tensor& sigma, int64_t nearest = 2,
                                  ExclusionEvaluation evaluation = ExclusionEvaluation::Pairwise,
                                  int64_t densePairs = ExclusionDensePairs, int64_t blockPairs = ExclusionBlockPairs);
    /**
     * Solves K y = b for a symmetric positive definite block-tridiagonal K by block parallel cyclic
     * reduction (ceil(log2 L) vectorised levels of 3 x 3 block products and closed-form inverses, no host
     * synchronisation, differentiable twice): diagonal blocks [B, L, 3, 3], upper blocks [B, L, 3, 3]
     * (block i couples rows of block i to those of block i + 1; the last is ignored), right-hand sides
     * [B, L, 3, C]. Returns y [B, L, 3, C].
     */
    torch::Tensor solveBlockTridiagonal(const torch::Tensor& diagonal, const torch::Tensor& upper, const torch::Tensor& rhs);
    /**
     * Solves (a I + sigma^2 T) y = b for the bond slots present [B, M] (bool) of each row, by parallel cyclic
     * reduction (ceil(log2 M) vectorised levels, no host synchronisation): diagonal [B] = a + 2 sigma^2,
     * coupling [B] = sigma^2 between adjacent present slots, bonds [B, M, 3]. Absent slots decouple their
     * neighbours (segment ends) and return 0.
     */
    torch::Tensor solveBondSystem(const torch::Tensor& bonds, const torch::Tensor& present, const torch::Tensor& diagonal,
                                  const torch::Tensor& coupling);
}

} // namespace FlashIPAPlugin

#endif
