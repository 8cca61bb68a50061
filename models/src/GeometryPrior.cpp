#include "flashipa/GeometryPrior.h"
#include "flashipa/ResidueTypes.h"
#include "ExclusionPairs.h"
#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace FlashIPAPlugin {

using torch::indexing::None;
using torch::indexing::Slice;

namespace {
// Frame atoms: protein N, CA, C; RNA C3', C4', O4' (FrameBuilder). Bonds only: the covalent bonds between frame
// atoms along the chain (protein N-CA, CA-C and the peptide bond C-N+1; RNA C3'-C4' and C4'-O4'; RNA's frame
// atoms of consecutive residues are not bonded). Each atom then sits in at most two terms, about 115 degrees
// apart, and the terms, each exact for its own pair, overlap little: the least-squares weight of their sum in
// the small-sigma limit is about 0.92. Adding 1-3 distances (N-C, CA-N+1, ...) counted the same noise several
// times (directions 35 degrees apart) and raised the initial DSM loss from 1.0 to 1.87 (docs/MODEL.md).
const std::vector<GeometryPairKind> Kinds = {
    {false, 0, 0, 1, "N-CA"}, {false, 0, 1, 2, "CA-C"}, {false, 1, 2, 0, "C-N+1"},
    {true, 0, 0, 1, "C3'-C4'"}, {true, 0, 1, 2, "C4'-O4'"},
};
// The crossover variance a of the chain weight in units of d0^2 (GeometryPrior.h; fitted, docs/MODEL.md).
constexpr double ChainWeightCrossover = 4.0 / 3.0;
// Distances below this (nm) are treated as this: log r and the exp term stay finite for coincident atoms.
constexpr double SmallestDistance = 1e-6;
} // namespace

const std::vector<GeometryPairKind>& GeometryPrior::pairKinds() { return Kinds; }

torch::Tensor GeometryPrior::pairTable(const torch::TensorOptions& options) {
    std::vector<double> values;
    for (const auto& k : Kinds)
        values.insert(values.end(), {k.rna ? 1.0 : 0.0, (double) k.offset, (double) k.atomI, (double) k.atomJ});
    return torch::tensor(values, torch::kFloat64).view({(int64_t) Kinds.size(), 4}).to(options);
}


torch::Tensor GeometryPrior::chainWeight(const torch::Tensor& sigma, const torch::Tensor& d0, bool rna) {
    // The mode averages in closed form, in t = sigma^2 / a (no cancellation at small t, no host sync):
    // a long chain's Laplacian eigenvalues lambda = 2 - 2 cos(theta), theta uniform on [0, pi], have
    // <lambda^2> = 6 and <lambda^2 / (a + b lambda)> = 8 (s + 2) / (a s (s + 1)^2), s = sqrt(1 + 4 b / a);
    // a path of three atoms (an RNA residue's O4'-C4'-C3') has the two non-zero eigenvalues 1 and 3.
    torch::Tensor t = sigma.pow(2) / (ChainWeightCrossover * d0 * d0);
    if (rna)
        return (1.0 + 2.0 * t) / 10.0 * (1.0 / (1.0 + t) + 9.0 / (1.0 + 3.0 * t));
    torch::Tensor s = torch::sqrt(1.0 + 4.0 * t);
    return (4.0 / 3.0) * (1.0 + 2.0 * t) * (s + 2.0) / (s * (s + 1.0).pow(2));
}

torch::Tensor GeometryPrior::energy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                                    const torch::Tensor& mask, const torch::Tensor& sigma, const torch::Tensor& stats,
                                    int version, const torch::Tensor& bondCovariance) {
    if (version < 1 || version > 6)
        throw std::invalid_argument("geometry prior: version must be 1 to 6, got " + std::to_string(version));
    if (version >= 4 && !(bondCovariance.defined() && bondCovariance.numel() == 3))
        throw std::invalid_argument("geometry prior: versions 4 to 6 need the bond covariances (c0, c1, c2)");
    const int64_t B = atoms.size(0), L = atoms.size(1);
    torch::Tensor real = mask.defined() ? mask.to(torch::kBool) : torch::ones({B, L}, types.options().dtype(torch::kBool));
    torch::Tensor rna = types >= ResidueType::FirstNucleotide;
    torch::Tensor variance2 = 2.0 * sigma.to(atoms.dtype()).pow(2).view({B, 1}); // 2 sigma^2, [B, 1]
    torch::Tensor total = torch::zeros({B}, atoms.options());
    for (size_t k = 0; k < Kinds.size(); k++) {
        const GeometryPairKind& kind = Kinds[k];
        torch::Tensor use, r;
        if (kind.offset == 0) {
            use = real & (rna == kind.rna);
            r = atoms.index({Slice(), Slice(), kind.atomI}) - atoms.index({Slice(), Slice(), kind.atomJ});
        } else {
            if (L < 2)
                continue;
            auto head = Slice(None, -1), tail = Slice(1, None);
            use = real.index({Slice(), head}) & real.index({Slice(), tail}) &
                  (chains.index({Slice(), head}) == chains.index({Slice(), tail})) & (rna.index({Slice(), head}) == kind.rna) &
                  (rna.index({Slice(), tail}) == kind.rna);
            r = atoms.index({Slice(), head, kind.atomI}) - atoms.index({Slice(), tail, kind.atomJ});
        }
        torch::Tensor d = torch::sqrt(r.pow(2).sum(-1) + SmallestDistance * SmallestDistance); // [B, L or L-1]
        torch::Tensor d0 = stats[k][0], s0 = stats[k][1];
        torch::Tensor v = s0 * s0 + variance2;
        torch::Tensor a = 2.0 * d * d0 / v;
        torch::Tensor e = torch::log(d) + (d - d0).pow(2) / (2.0 * v) - torch::log(-torch::expm1(-a));
        torch::Tensor termSum = (e * use.to(e.dtype())).sum(1); // [B]
        if (version == 2)
            termSum = termSum * chainWeight(sigma.to(atoms.dtype()).view({B}), d0, kind.rna);
        total = total + termSum;
    }
    if (version == 3)
        total = total + backboneChainEnergy(atoms, types, chains, real, sigma.to(atoms.dtype()).view({B}), stats);
    if (version >= 4)
        total = total + correlatedChainEnergy(atoms, types, chains, real, sigma.to(atoms.dtype()).view({B}), bondCovariance);
    if (version >= 5)
        total = total + exclusionEnergy(atoms, chains, real, sigma.to(atoms.dtype()).view({B}), exclusionNearest(version));
    return total;
}

namespace {

/**
 * The exclusion term [B] of the pairs (atom i, atom j) with i in rows [begin, end) of x [B, N, 3] and j in
 * [begin, N) (the upper triangle of that row block; only j's residue > i's residue counts). residue [N], chainAtom
 * and realAtom [B, N] describe each atom; s [B, 1, 1] is the wall's spread; residues of one chain segment count
 * only at least `nearest` apart.
 */
torch::Tensor exclusionOfRows(const torch::Tensor& x, const torch::Tensor& residue, const torch::Tensor& chainAtom,
                              const torch::Tensor& realAtom, const torch::Tensor& s, int64_t nearest, int64_t begin, int64_t end) {
    const auto rows = Slice(begin, end), cols = Slice(begin, None);
    torch::Tensor xi = x.index({Slice(), rows}), xj = x.index({Slice(), cols});
    torch::Tensor r = torch::sqrt((xi.unsqueeze(2) - xj.unsqueeze(1)).pow(2).sum(-1) + SmallestDistance * SmallestDistance); // [B, R, C]
    // The pairs: atom p of residue i and atom q of residue j > i, both real, j not within `nearest` - 1 residues of i
    // along the same chain segment (segment ids are contiguous, so equal ids of i and j cover the residues between).
    torch::Tensor ri = residue.index({rows}).unsqueeze(1), rj = residue.index({cols}).unsqueeze(0);
    torch::Tensor ci = chainAtom.index({Slice(), rows}).unsqueeze(2), cj = chainAtom.index({Slice(), cols}).unsqueeze(1);
    torch::Tensor linked = (rj < ri + nearest).unsqueeze(0) & (ci == cj);
    torch::Tensor use = (rj > ri).unsqueeze(0) & ~linked & realAtom.index({Slice(), rows}).unsqueeze(2) &
                        realAtom.index({Slice(), cols}).unsqueeze(1); // [B, R, C]

    const double r0 = GeometryPrior::ExclusionRadius;
    torch::Tensor a = (r - r0) / s, b = (r + r0) / s, q = 2.0 * r * r0 / s.pow(2);
    torch::Tensor inside = a <= 0;
    // Inside the wall: 1 - F = phi(a) [sqrt(pi/2) (erfcx(-a/sqrt2) + erfcx(b/sqrt2) e^-q) - (s/r) expm1(-q)], every
    // factor bounded. Outside: F is small and -log1p(-F) exact. Each branch is fed only its own side's values, so
    // neither overflows into the other's gradient.
    const double rootHalfPi = std::sqrt(M_PI / 2.0), rootTwo = std::sqrt(2.0), logRootTwoPi = 0.5 * std::log(2.0 * M_PI);
    torch::Tensor ai = torch::where(inside, a, torch::zeros_like(a));
    torch::Tensor bracket = rootHalfPi * (torch::special_erfcx(-ai / rootTwo) + torch::special_erfcx(b / rootTwo) * torch::exp(-q)) -
                            (s / r) * torch::expm1(-q);
    torch::Tensor energyInside = 0.5 * ai.pow(2) + logRootTwoPi - torch::log(bracket);
    torch::Tensor ao = torch::where(inside, torch::ones_like(a), a);
    auto density = [&](const torch::Tensor& v) { return torch::exp(-0.5 * v.pow(2)) / std::sqrt(2.0 * M_PI); };
    torch::Tensor f = torch::special_ndtr(-ao) - torch::special_ndtr(-b) - (s / r) * (density(ao) - density(b));
    torch::Tensor energyOutside = -torch::log1p(-f.clamp_min(0.0));
    torch::Tensor energy = torch::where(inside, energyInside, energyOutside);
    return (energy * use.to(energy.dtype())).sum({1, 2});
}

/** The row blocks' bounds for B structures of N atoms: blocks of at most blockPairs pairs (at least one row). */
std::vector<std::pair<int64_t, int64_t>> exclusionRowBlocks(int64_t B, int64_t N, int64_t blockPairs) {
    const int64_t rows = std::max<int64_t>(1, blockPairs / std::max<int64_t>(1, B * N));
    std::vector<std::pair<int64_t, int64_t>> blocks;
    for (int64_t begin = 0; begin < N; begin += rows)
        blocks.emplace_back(begin, std::min(N, begin + rows));
    return blocks;
}

/**
 * The exclusion term evaluated block by block, recomputed in the backward pass (activation checkpointing), so
 * that memory stays O(block) instead of O(B N^2) while values and gradients are the dense evaluation's. The
 * backward is itself differentiable: with create_graph (grad mode on inside backward) each block's gradient is
 * built on the saved inputs' graph; otherwise each block's graph is freed before the next.
 */
class BlockedExclusion : public torch::autograd::Function<BlockedExclusion> {
public:
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& s,
                                 const torch::Tensor& residue, const torch::Tensor& chainAtom, const torch::Tensor& realAtom,
                                 int64_t nearest, int64_t blockPairs) {
        ctx->save_for_backward({x, s, residue, chainAtom, realAtom});
        ctx->saved_data["nearest"] = nearest;
        ctx->saved_data["blockPairs"] = blockPairs;
        torch::Tensor total = torch::zeros({x.size(0)}, x.options());
        for (const auto& [begin, end] : exclusionRowBlocks(x.size(0), x.size(1), blockPairs))
            total = total + exclusionOfRows(x, residue, chainAtom, realAtom, s, nearest, begin, end);
        return total;
    }

    static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::tensor_list gradOutputs) {
        const auto saved = ctx->get_saved_variables();
        const torch::Tensor &residue = saved[2], &chainAtom = saved[3], &realAtom = saved[4];
        const torch::Tensor weight = gradOutputs[0].view({-1});
        const bool createGraph = torch::GradMode::is_enabled();
        const int64_t nearest = ctx->saved_data["nearest"].toInt(), blockPairs = ctx->saved_data["blockPairs"].toInt();
        torch::Tensor x = createGraph ? saved[0] : saved[0].detach().requires_grad_(true);
        torch::Tensor s = createGraph ? saved[1] : saved[1].detach().requires_grad_(true);
        torch::AutoGradMode enable(true);
        torch::Tensor gradX = torch::zeros_like(x), gradS = torch::zeros_like(s);
        for (const auto& [begin, end] : exclusionRowBlocks(x.size(0), x.size(1), blockPairs)) {
            torch::Tensor e = (exclusionOfRows(x, residue, chainAtom, realAtom, s, nearest, begin, end) * weight).sum();
            auto g = torch::autograd::grad({e}, {x, s}, {}, /*retain_graph=*/createGraph, /*create_graph=*/createGraph,
                                           /*allow_unused=*/true);
            if (g[0].defined())
                gradX = gradX + g[0];
            if (g[1].defined())
                gradS = gradS + g[1];
        }
        return {gradX, gradS, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
};

/** The Tensors evaluation of x [B, N, 3] with spread s [B, 1, 1]: dense up to densePairs pairs, else in blocks. */
torch::Tensor exclusionByTensors(const torch::Tensor& x, const torch::Tensor& s, const torch::Tensor& chains, const torch::Tensor& real,
                                 int64_t nearest, int64_t densePairs, int64_t blockPairs) {
    const int64_t B = x.size(0), N = x.size(1), L = N / 3;
    torch::Tensor residue = torch::arange(L, torch::TensorOptions().device(x.device()).dtype(torch::kLong)).repeat_interleave(3);
    torch::Tensor chainAtom = chains.repeat_interleave(3, 1), realAtom = real.to(torch::kBool).repeat_interleave(3, 1);
    // Up to ExclusionDensePairs (training batches): one plain autograd evaluation, nothing recomputed.
    if (B * N * N <= densePairs)
        return exclusionOfRows(x, residue, chainAtom, realAtom, s, nearest, 0, N);
    return BlockedExclusion::apply(x, s, residue, chainAtom, realAtom, nearest, blockPairs);
}

/**
 * The gradient of the pairwise evaluation, (w dE/dx, w dE/ds) for weights w [B], as an autograd node of its own:
 * its forward is the saved analytic gradient; its backward (a Hessian-vector product, wanted only where a caller
 * differentiates a gradient with respect to the atoms or the spread) recomputes the Tensors evaluation. A
 * trainer that differentiates only with respect to its parameters never runs it.
 */
class PairwiseExclusionGradient : public torch::autograd::Function<PairwiseExclusionGradient> {
public:
    static torch::autograd::tensor_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& w, const torch::Tensor& x,
                                                const torch::Tensor& s, const torch::Tensor& gradAtoms, const torch::Tensor& gradSpread,
                                                const torch::Tensor& chains, const torch::Tensor& real, int64_t nearest) {
        ctx->save_for_backward({w, x, s, gradAtoms, gradSpread, chains, real});
        ctx->saved_data["nearest"] = nearest;
        return {w.view({-1, 1, 1}) * gradAtoms, w * gradSpread};
    }

    static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::tensor_list gradOutputs) {
        const auto saved = ctx->get_saved_variables();
        const torch::Tensor &w = saved[0], &gradAtoms = saved[3], &gradSpread = saved[4], &chains = saved[5], &real = saved[6];
        torch::Tensor vx = gradOutputs[0].defined() ? gradOutputs[0] : torch::zeros_like(gradAtoms);
        torch::Tensor vs = gradOutputs[1].defined() ? gradOutputs[1] : torch::zeros_like(gradSpread);
        torch::Tensor gradW = (vx * gradAtoms).sum({1, 2}) + vs * gradSpread;
        const bool createGraph = torch::GradMode::is_enabled();
        torch::Tensor x = createGraph ? saved[1] : saved[1].detach().requires_grad_(true);
        torch::Tensor s = createGraph ? saved[2] : saved[2].detach().requires_grad_(true);
        torch::AutoGradMode enable(true);
        torch::Tensor e = exclusionByTensors(x, s.view({-1, 1, 1}), chains, real, ctx->saved_data["nearest"].toInt(),
                                             GeometryPrior::ExclusionDensePairs, GeometryPrior::ExclusionBlockPairs);
        auto g = torch::autograd::grad({(e * w.detach()).sum()}, {x, s}, {}, /*retain_graph=*/true, /*create_graph=*/true,
                                       /*allow_unused=*/true);
        torch::Tensor product = torch::zeros({}, x.options());
        if (g[0].defined())
            product = product + (g[0] * vx).sum();
        if (g[1].defined())
            product = product + (g[1] * vs).sum();
        auto h = torch::autograd::grad({product}, {x, s}, {}, createGraph, createGraph, /*allow_unused=*/true);
        torch::Tensor hx = h[0].defined() ? h[0] : torch::zeros_like(x), hs = h[1].defined() ? h[1] : torch::zeros_like(s);
        return {gradW, hx, hs, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
};

/**
 * The Pairwise evaluation (GeometryPrior::ExclusionEvaluation): the energy [B] of x [B, N, 3] with spread s [B]
 * from exclusionPairSums(), its first derivatives saved from the same pass.
 */
class PairwiseExclusion : public torch::autograd::Function<PairwiseExclusion> {
public:
    static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& s,
                                 const torch::Tensor& chains, const torch::Tensor& real, int64_t nearest) {
        ExclusionPairSums sums = exclusionPairSums(x, s, chains, real, nearest, GeometryPrior::ExclusionRadius, SmallestDistance,
                                                   GeometryPrior::ExclusionCutoffSpreads);
        ctx->save_for_backward({x, s, sums.gradAtoms, sums.gradSpread, chains, real});
        ctx->saved_data["nearest"] = nearest;
        return sums.energy;
    }

    static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::tensor_list gradOutputs) {
        const auto saved = ctx->get_saved_variables();
        const torch::Tensor w = gradOutputs[0].view({-1});
        torch::Tensor gradX, gradS;
        if (torch::GradMode::is_enabled()) {
            // create_graph: a differentiable gradient, through its own node (second derivatives by the Tensors evaluation).
            auto g = PairwiseExclusionGradient::apply(w, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                                      ctx->saved_data["nearest"].toInt());
            gradX = g[0], gradS = g[1];
        } else {
            gradX = w.view({-1, 1, 1}) * saved[2];
            gradS = w * saved[3];
        }
        return {gradX, gradS, torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
};

} // namespace

torch::Tensor GeometryPrior::exclusionEnergy(const torch::Tensor& atoms, const torch::Tensor& chains, const torch::Tensor& real,
                                             const torch::Tensor& sigma, int64_t nearest, ExclusionEvaluation evaluation,
                                             int64_t densePairs, int64_t blockPairs) {
    if (nearest < 2)
        throw std::invalid_argument("exclusionEnergy: nearest must be >= 2 (linked neighbours are bonded)");
    const int64_t B = atoms.size(0), L = atoms.size(1), N = 3 * L;
    torch::Tensor x = atoms.reshape({B, N, 3});
    torch::Tensor s = torch::sqrt(2.0 * sigma.to(atoms.dtype()).pow(2) + ExclusionWidth * ExclusionWidth).view({B});
    if (evaluation == ExclusionEvaluation::Pairwise && exclusionPairSumsApply(x))
        return PairwiseExclusion::apply(x, s, chains, real.to(torch::kBool), nearest);
    return exclusionByTensors(x, s.view({B, 1, 1}), chains, real, nearest, densePairs, blockPairs);
}

torch::Tensor GeometryPrior::solveBondSystem(const torch::Tensor& bonds, const torch::Tensor& present, const torch::Tensor& diagonal,
                                             const torch::Tensor& coupling) {
    // Parallel cyclic reduction: at each level every row eliminates its neighbours at distance `stride`
    // from its equation, doubling the stride; after ceil(log2 M) levels each row holds one unknown. Rows
    // beyond the ends read as the identity (sub 0, diag 1, super 0, rhs 0). K is diagonally dominant
    // (a + 2 sigma^2 > 2 sigma^2), so no pivoting is needed.
    const int64_t M = bonds.size(1);
    torch::Tensor on = present.to(bonds.dtype());                                             // [B, M]
    torch::Tensor diag = on * diagonal.view({-1, 1}) + (1.0 - on);                             // [B, M]
    torch::Tensor linked = torch::zeros_like(on);                                              // bond j-1 and j adjacent
    if (M > 1)
        linked.index_put_({Slice(), Slice(1, None)}, on.index({Slice(), Slice(None, -1)}) * on.index({Slice(), Slice(1, None)}));
    torch::Tensor sub = -coupling.view({-1, 1}) * linked;                                      // K[j][j-1]
    torch::Tensor sup = torch::zeros_like(sub);                                                // K[j][j+1]
    if (M > 1)
        sup.index_put_({Slice(), Slice(None, -1)}, sub.index({Slice(), Slice(1, None)}));
    torch::Tensor rhs = bonds * on.unsqueeze(-1);                                              // [B, M, 3]
    auto shifted = [](const torch::Tensor& t, int64_t stride, bool fromBefore, double fill) {
        // t[:, j - stride] (fromBefore) or t[:, j + stride], `fill` outside the rows
        const int64_t M = t.size(1);
        if (stride >= M)
            return torch::full_like(t, fill);
        std::vector<int64_t> padding(2 * (t.dim() - 1), 0);
        // pad works from the last dimension backwards; dimension 1 is the row
        const size_t rowPad = 2 * (t.dim() - 2);
        padding[rowPad + (fromBefore ? 0 : 1)] = stride;
        torch::Tensor part = fromBefore ? t.narrow(1, 0, M - stride) : t.narrow(1, stride, M - stride);
        return torch::constant_pad_nd(part, padding, fill);
    };
    for (int64_t stride = 1; stride < M; stride *= 2) {
        torch::Tensor alpha = -sub / shifted(diag, stride, true, 1.0);
        torch::Tensor gamma = -sup / shifted(diag, stride, false, 1.0);
        torch::Tensor nextDiag = diag + alpha * shifted(sup, stride, true, 0.0) + gamma * shifted(sub, stride, false, 0.0);
        torch::Tensor nextRhs = rhs + alpha.unsqueeze(-1) * shifted(rhs, stride, true, 0.0) +
                                gamma.unsqueeze(-1) * shifted(rhs, stride, false, 0.0);
        torch::Tensor nextSub = alpha * shifted(sub, stride, true, 0.0);
        torch::Tensor nextSup = gamma * shifted(sup, stride, false, 0.0);
        diag = nextDiag, rhs = nextRhs, sub = nextSub, sup = nextSup;
    }
    return rhs / diag.unsqueeze(-1) * on.unsqueeze(-1);
}

torch::Tensor GeometryPrior::backboneBondSlots(const torch::Tensor& types, const torch::Tensor& chains, const torch::Tensor& real) {
    const int64_t B = types.size(0), L = types.size(1);
    torch::Tensor protein = real & (types < ResidueType::FirstNucleotide); // [B, L]
    // Slots inside a residue (N-CA, CA-C) exist with the residue; the link slot C(i)-N(i+1) with both residues
    // in one chain (equal chain ids, the rule of the link kinds above). The last residue's link slot is absent.
    torch::Tensor link = torch::zeros({B, L}, protein.options());
    if (L > 1)
        link.index_put_({Slice(), Slice(None, -1)}, protein.index({Slice(), Slice(None, -1)}) & protein.index({Slice(), Slice(1, None)}) &
                                                        (chains.index({Slice(), Slice(None, -1)}) == chains.index({Slice(), Slice(1, None)})));
    return torch::stack({protein, protein, link}, 2).reshape({B, 3 * L});
}

bool GeometryPrior::isPositiveDefiniteBondCovariance(double c0, double c1, double c2) {
    return c0 > 0 && bondSpectrumMinimum(c0, c1, c2) > 0;
}

torch::Tensor GeometryPrior::backboneChainEnergy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                                                 const torch::Tensor& real, const torch::Tensor& sigma, const torch::Tensor& stats) {
    const int64_t B = atoms.size(0), L = atoms.size(1);
    // The backbone path N0 CA0 C0 N1 CA1 C1 ...: bond slot j joins flattened atoms j and j + 1 (3L - 1 slots).
    torch::Tensor path = atoms.reshape({B, 3 * L, 3});
    if (3 * L < 2)
        return torch::zeros({B}, atoms.options());
    torch::Tensor bonds = path.index({Slice(), Slice(1, None)}) - path.index({Slice(), Slice(None, -1)}); // [B, 3L-1, 3]
    torch::Tensor present = backboneBondSlots(types, chains, real).narrow(1, 0, 3 * L - 1);              // [B, 3L-1]
    // Bond variance a per component: the protein bonds' mean d0^2 / 3 (a freely jointed chain of those bonds).
    // The protein kinds lead the table, so a narrow selects them: no index tensor to copy to the device inside
    // a step (CUDA graphs capture this).
    static const int64_t proteinKinds = [] {
        int64_t count = 0;
        while (count < (int64_t) Kinds.size() && !Kinds[count].rna)
            count++;
        for (size_t k = count; k < Kinds.size(); k++)
            if (!Kinds[k].rna)
                throw std::logic_error("GeometryPrior: the protein pair kinds must come first in the table");
        return count;
    }();
    torch::Tensor a = stats.narrow(0, 0, proteinKinds).select(1, 0).pow(2).mean() / 3.0;
    torch::Tensor sigma2 = sigma.pow(2);                                                  // [B]
    torch::Tensor diagonal = a + 2.0 * sigma2;                                            // [B]
    torch::Tensor y = solveBondSystem(bonds, present, diagonal, sigma2);                  // K^-1 b
    torch::Tensor on = present.to(atoms.dtype()).unsqueeze(-1);
    torch::Tensor exact = (y * bonds).sum({1, 2});                                        // b^T K^-1 b
    torch::Tensor pairs = (bonds.pow(2) * on).sum({1, 2}) / diagonal;                     // b^T b / (a + 2 sigma^2)
    return 0.5 * (exact - pairs);
}

double GeometryPrior::bondSpectrumMinimum(double c0, double c1, double c2) {
    // c0 + 2 c1 x + 2 c2 (2 x^2 - 1) with x = cos t in [-1, 1]: a quadratic in x, smallest at an end or at
    // its vertex.
    auto symbol = [&](double x) { return c0 + 2.0 * c1 * x + 2.0 * c2 * (2.0 * x * x - 1.0); };
    double smallest = std::min(symbol(-1.0), symbol(1.0));
    if (c2 > 0) {
        const double vertex = -c1 / (4.0 * c2);
        if (vertex > -1.0 && vertex < 1.0)
            smallest = std::min(smallest, symbol(vertex));
    }
    return smallest;
}

namespace {
// The inverse of every 3 x 3 matrix of m [..., 3, 3] from its cofactors: elementwise operations only, so it
// runs inside CUDA graphs and differentiates twice (the trainer's loss is a derivative of the energy).
torch::Tensor inverse3(const torch::Tensor& m) {
    auto e = [&](int i, int j) { return m.select(-2, i).select(-1, j); };
    torch::Tensor c00 = e(1, 1) * e(2, 2) - e(1, 2) * e(2, 1);
    torch::Tensor c01 = e(1, 2) * e(2, 0) - e(1, 0) * e(2, 2);
    torch::Tensor c02 = e(1, 0) * e(2, 1) - e(1, 1) * e(2, 0);
    torch::Tensor det = e(0, 0) * c00 + e(0, 1) * c01 + e(0, 2) * c02;
    torch::Tensor c10 = e(0, 2) * e(2, 1) - e(0, 1) * e(2, 2);
    torch::Tensor c11 = e(0, 0) * e(2, 2) - e(0, 2) * e(2, 0);
    torch::Tensor c12 = e(0, 1) * e(2, 0) - e(0, 0) * e(2, 1);
    torch::Tensor c20 = e(0, 1) * e(1, 2) - e(0, 2) * e(1, 1);
    torch::Tensor c21 = e(0, 2) * e(1, 0) - e(0, 0) * e(1, 2);
    torch::Tensor c22 = e(0, 0) * e(1, 1) - e(0, 1) * e(1, 0);
    // inverse[i][j] = cofactor[j][i] / det
    torch::Tensor adjugate = torch::stack({torch::stack({c00, c10, c20}, -1), torch::stack({c01, c11, c21}, -1),
                                           torch::stack({c02, c12, c22}, -1)}, -2);
    return adjugate / det.unsqueeze(-1).unsqueeze(-1);
}

// t[:, i - stride] (fromBefore) or t[:, i + stride], with `fill` (a tensor of one block) outside the rows.
torch::Tensor shiftedBlocks(const torch::Tensor& t, int64_t stride, bool fromBefore, const torch::Tensor& fill) {
    const int64_t L = t.size(1);
    std::vector<int64_t> shape = t.sizes().vec();
    shape[1] = std::min(stride, L);
    torch::Tensor padding = fill.expand(shape);
    if (stride >= L)
        return padding.clone();
    return fromBefore ? torch::cat({padding, t.narrow(1, 0, L - stride)}, 1) : torch::cat({t.narrow(1, stride, L - stride), padding}, 1);
}
} // namespace

torch::Tensor GeometryPrior::solveBlockTridiagonal(const torch::Tensor& diagonal, const torch::Tensor& upper, const torch::Tensor& rhs) {
    // Block parallel cyclic reduction: block row i reads A_i y_{i-s} + D_i y_i + U_i y_{i+s} = r_i; eliminating
    // its neighbours at distance s with alpha = -A_i D_{i-s}^-1 and gamma = -U_i D_{i+s}^-1 leaves the same
    // form at distance 2s. Blocks beyond the ends read as the identity with zero coupling and right-hand side.
    // K is symmetric positive definite, so every D stays so (a Schur complement) and no pivoting is needed.
    const int64_t L = diagonal.size(1);
    torch::Tensor zeroBlock = torch::zeros({3, 3}, diagonal.options());
    torch::Tensor identity = torch::eye(3, diagonal.options());
    torch::Tensor zeroRhs = torch::zeros({3, rhs.size(-1)}, rhs.options());
    torch::Tensor D = diagonal, U = upper.clone(), r = rhs;
    if (L > 0)
        U.select(1, L - 1).zero_();
    torch::Tensor A = shiftedBlocks(U.transpose(-1, -2), 1, true, zeroBlock); // A_i = U_{i-1}^T
    for (int64_t stride = 1; stride < L; stride *= 2) {
        // Each level inverts every diagonal block once; both neighbours read the shifted inverses (the
        // identity's beyond the ends).
        torch::Tensor inverseD = inverse3(D);
        torch::Tensor alpha = -torch::matmul(A, shiftedBlocks(inverseD, stride, true, identity));
        torch::Tensor gamma = -torch::matmul(U, shiftedBlocks(inverseD, stride, false, identity));
        torch::Tensor nextD = D + torch::matmul(alpha, shiftedBlocks(U, stride, true, zeroBlock)) +
                              torch::matmul(gamma, shiftedBlocks(A, stride, false, zeroBlock));
        torch::Tensor nextR = r + torch::matmul(alpha, shiftedBlocks(r, stride, true, zeroRhs)) +
                              torch::matmul(gamma, shiftedBlocks(r, stride, false, zeroRhs));
        torch::Tensor nextA = torch::matmul(alpha, shiftedBlocks(A, stride, true, zeroBlock));
        torch::Tensor nextU = torch::matmul(gamma, shiftedBlocks(U, stride, false, zeroBlock));
        D = nextD, r = nextR, A = nextA, U = nextU;
    }
    return torch::matmul(inverse3(D), r);
}

torch::Tensor GeometryPrior::correlatedChainEnergy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                                                   const torch::Tensor& real, const torch::Tensor& sigma,
                                                   const torch::Tensor& bondCovariance) {
    const int64_t B = atoms.size(0), L = atoms.size(1);
    if (L == 0)
        return torch::zeros({B}, atoms.options());
    // Slots 3i + p (p = 0: N-CA, 1: CA-C, 2: C(i)-N(i+1)) grouped per residue: with correlations reaching two
    // bonds the matrix is block-tridiagonal in 3 x 3 blocks. Slot 3L - 1 (past the last residue) is absent.
    torch::Tensor path = atoms.reshape({B, 3 * L, 3});
    torch::Tensor bonds = torch::cat({path.index({Slice(), Slice(1, None)}) - path.index({Slice(), Slice(None, -1)}),
                                      torch::zeros({B, 1, 3}, atoms.options())}, 1); // [B, 3L, 3]
    torch::Tensor on = backboneBondSlots(types, chains, real).to(atoms.dtype()); // [B, 3L]
    // P_j P_{j+1} and P_j P_{j+1} P_{j+2}: the couplings exist only inside one unbroken stretch of present slots.
    torch::Tensor padded = torch::cat({on, torch::zeros({B, 2}, on.options())}, 1);
    torch::Tensor next1 = on * padded.narrow(1, 1, 3 * L);
    torch::Tensor next2 = next1 * padded.narrow(1, 2, 3 * L);
    torch::Tensor sigma2 = sigma.pow(2).view({B, 1});
    torch::Tensor c0 = bondCovariance[0], c1 = bondCovariance[1], c2 = bondCovariance[2];
    torch::Tensor diag = on * (c0 + 2.0 * sigma2) + (1.0 - on); // absent slots: identity rows
    // The correlations fade in with sigma (GeometryPrior.h): g c1 and g c2 with g = sigma^2 / (sigma^2 + fade^2).
    torch::Tensor g = sigma2 / (sigma2 + CorrelationFadeSigma * CorrelationFadeSigma);
    torch::Tensor e1 = next1 * (g * c1 - sigma2);               // K[j][j+1]
    torch::Tensor e2 = next2 * (g * c2);                        // K[j][j+2]
    auto slot = [&](const torch::Tensor& t, int p) { return t.view({B, L, 3}).select(2, p); }; // [B, L]
    torch::Tensor zero = torch::zeros({B, L}, atoms.options());
    torch::Tensor d0 = slot(diag, 0), d1 = slot(diag, 1), d2 = slot(diag, 2);
    torch::Tensor a0 = slot(e1, 0), a1 = slot(e1, 1), a2 = slot(e1, 2);
    torch::Tensor b0 = slot(e2, 0), b1 = slot(e2, 1), b2 = slot(e2, 2);
    torch::Tensor D = torch::stack({torch::stack({d0, a0, b0}, -1), torch::stack({a0, d1, a1}, -1), torch::stack({b0, a1, d2}, -1)}, -2);
    // U_i[p][q] = K[3i + p][3i + 3 + q]: slot 3i+1 reaches 3i+3 (two apart), slot 3i+2 reaches 3i+3 and 3i+4.
    torch::Tensor U = torch::stack({torch::stack({zero, zero, zero}, -1), torch::stack({b1, zero, zero}, -1),
                                    torch::stack({a2, b2, zero}, -1)}, -2);
    torch::Tensor rhs = (bonds * on.unsqueeze(-1)).view({B, L, 3, 3});
    torch::Tensor y = solveBlockTridiagonal(D, U, rhs);
    torch::Tensor exact = (y * rhs).sum({1, 2, 3});                                      // b^T K^-1 b
    torch::Tensor pairs = (rhs.pow(2)).sum({1, 2, 3}) / (c0 + 2.0 * sigma2.view({B})); // b^T b / (c0 + 2 sigma^2)
    return 0.5 * (exact - pairs);
}

} // namespace FlashIPAPlugin
