#include "flashipa/GeometryPrior.h"
#include "flashipa/Dataset.h"
#include "flashipa/ResidueTypes.h"
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

torch::Tensor GeometryPrior::measure(const Dataset& data) {
    const torch::Tensor& atoms = data.atoms();     // [N, 3, 3]
    const torch::Tensor& types = data.types();     // [N]
    const torch::Tensor& segment = data.segments(); // [N]
    const int64_t N = atoms.size(0);
    // Per residue: is it in a training chain, and the chain it belongs to (so links never cross chains).
    std::vector<int64_t> chainOf(N, -1);
    for (int64_t c : data.chains(DatasetSplit::Train))
        for (int64_t n = data.chainOffset(c); n < data.chainOffset(c + 1); n++)
            chainOf[n] = c;
    torch::Tensor chain = torch::tensor(chainOf, torch::kInt64);
    torch::Tensor train = chain >= 0;
    torch::Tensor rna = types >= ResidueType::FirstNucleotide;
    torch::Tensor x = atoms.to(torch::kFloat64);
    torch::Tensor stats = torch::zeros({(int64_t) Kinds.size(), 2}, torch::kFloat64);
    for (size_t k = 0; k < Kinds.size(); k++) {
        const GeometryPairKind& kind = Kinds[k];
        torch::Tensor use, d;
        if (kind.offset == 0) {
            use = train & (rna == kind.rna);
            d = (x.index({Slice(), kind.atomI}) - x.index({Slice(), kind.atomJ})).norm(2, -1);
        } else {
            auto head = Slice(None, -1), tail = Slice(1, None);
            use = train.index({head}) & (chain.index({head}) == chain.index({tail})) &
                  (segment.index({head}) == segment.index({tail})) & (rna.index({head}) == kind.rna) & (rna.index({tail}) == kind.rna);
            d = (x.index({head, kind.atomI}) - x.index({tail, kind.atomJ})).norm(2, -1);
        }
        torch::Tensor values = d.index({use});
        if (values.numel() < 10)
            throw std::runtime_error("geometry prior: the training split of '" + data.path() + "' holds fewer than 10 " +
                                     kind.name + " pairs");
        const double median = values.median().item<double>();
        const double mad = (values - median).abs().median().item<double>();
        stats[k][0] = median;
        stats[k][1] = std::max(1.4826 * mad, 1e-4); // a floor: a spread of zero would make the prior infinitely stiff
    }
    return stats;
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
                                    int version) {
    if (version < 1 || version > 3)
        throw std::invalid_argument("geometry prior: version must be 1, 2 or 3, got " + std::to_string(version));
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
    return total;
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

torch::Tensor GeometryPrior::backboneChainEnergy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                                                 const torch::Tensor& real, const torch::Tensor& sigma, const torch::Tensor& stats) {
    const int64_t B = atoms.size(0), L = atoms.size(1);
    // The backbone path N0 CA0 C0 N1 CA1 C1 ...: bond slot j joins flattened atoms j and j + 1 (3L - 1 slots).
    torch::Tensor path = atoms.reshape({B, 3 * L, 3});
    if (3 * L < 2)
        return torch::zeros({B}, atoms.options());
    torch::Tensor bonds = path.index({Slice(), Slice(1, None)}) - path.index({Slice(), Slice(None, -1)}); // [B, 3L-1, 3]
    torch::Tensor protein = real & (types < ResidueType::FirstNucleotide);                             // [B, L]
    // Slots inside a residue (N-CA, CA-C) exist with the residue; the link slot C(i)-N(i+1) with both residues
    // in one chain (equal chain ids, the rule of the link kinds above).
    torch::Tensor inside = protein.unsqueeze(-1).expand({B, L, 2});
    torch::Tensor link = torch::zeros({B, L, 1}, protein.options());
    if (L > 1)
        link.index_put_({Slice(), Slice(None, -1), 0}, protein.index({Slice(), Slice(None, -1)}) & protein.index({Slice(), Slice(1, None)}) &
                                                           (chains.index({Slice(), Slice(None, -1)}) == chains.index({Slice(), Slice(1, None)})));
    torch::Tensor present = torch::cat({inside, link}, 2).reshape({B, 3 * L}).narrow(1, 0, 3 * L - 1); // [B, 3L-1]
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

} // namespace FlashIPAPlugin
