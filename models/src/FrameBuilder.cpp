#include "flashipa/FrameBuilder.h"
#include <sstream>
#include <stdexcept>

namespace FlashIPAPlugin {

using torch::indexing::Ellipsis;
using torch::indexing::Slice;

namespace {
// Guard for unchecked (generation) mode: keeps normalisation finite when a vector vanishes.
constexpr double GuardEpsilon = 1e-24;

torch::Tensor unit(const torch::Tensor& v, bool guarded) {
    torch::Tensor squared = (v * v).sum(-1, true);
    // A floor rather than an added epsilon: for any non-degenerate residue the guarded and unguarded
    // frames are bitwise identical, so energy-only and energy+force evaluations compute one function.
    if (guarded)
        squared = squared.clamp_min(GuardEpsilon);
    return v / torch::sqrt(squared);
}

std::string describeResidue(int64_t flatIndex, const torch::IntArrayRef& batchShape) {
    // Name the residue by its multi-index, e.g. "structure 0, residue 17".
    std::ostringstream out;
    if (batchShape.size() >= 2) {
        int64_t residues = batchShape.back();
        out << "structure " << flatIndex / residues << ", residue " << flatIndex % residues;
    } else
        out << "residue " << flatIndex;
    return out.str();
}
} // namespace

namespace {
struct Degeneracy {
    torch::Tensor nonFinite, coincident, collinear; // [N] bool each
};

Degeneracy classify(const torch::Tensor& flat) {
    torch::Tensor a = flat.select(1, 0), b = flat.select(1, 1), c = flat.select(1, 2);
    torch::Tensor bc = c - b, ba = a - b;
    torch::Tensor bondLength = bc.norm(2, -1), otherLength = ba.norm(2, -1);
    torch::Tensor sine = torch::linalg_cross(bc, ba).norm(2, -1) / (bondLength * otherLength + 1e-300);
    Degeneracy d;
    d.nonFinite = torch::isfinite(flat).all(-1).all(-1).logical_not();
    d.coincident = bondLength < FrameBuilder::MinBondLength;
    d.collinear = (otherLength < FrameBuilder::MinBondLength).logical_or(sine < FrameBuilder::MinSine);
    return d;
}
} // namespace

torch::Tensor FrameBuilder::degenerate(const torch::Tensor& atoms) {
    torch::NoGradGuard noGrad;
    torch::Tensor flat = atoms.detach().reshape({-1, 3, 3});
    if (flat.scalar_type() != torch::kFloat64)
        flat = flat.to(torch::kFloat32);
    Degeneracy d = classify(flat);
    return d.nonFinite.logical_or(d.coincident).logical_or(d.collinear).view(atoms.sizes().slice(0, atoms.dim() - 2));
}

void FrameBuilder::check(const torch::Tensor& atoms) {
    if (atoms.dim() < 2 || atoms.size(-1) != 3 || atoms.size(-2) != 3)
        throw std::invalid_argument("frame atoms must have shape [..., 3, 3]");
    torch::NoGradGuard noGrad;
    torch::IntArrayRef batchShape = atoms.sizes().slice(0, atoms.dim() - 2);
    Degeneracy d = classify(atoms.detach().to(torch::kCPU, torch::kFloat64).reshape({-1, 3, 3}));
    auto firstBad = [&](const torch::Tensor& bad) -> int64_t {
        torch::Tensor index = torch::nonzero(bad);
        return index.numel() == 0 ? -1 : index[0][0].item<int64_t>();
    };
    auto fail = [&](int64_t bad, const std::string& problem) {
        throw DegenerateFrameError("frame atoms of " + describeResidue(bad, batchShape) + " " + problem, bad, problem);
    };
    int64_t bad = firstBad(d.nonFinite);
    if (bad >= 0)
        fail(bad, "have non-finite coordinates");
    bad = firstBad(d.coincident);
    if (bad >= 0)
        fail(bad, "are coincident (|c - b| below 1e-3 nm): cannot build a frame");
    bad = firstBad(d.collinear);
    if (bad >= 0)
        fail(bad, "are collinear or coincident (a, b, c on one line): cannot build a frame");
}

Frames FrameBuilder::build(const torch::Tensor& atoms, bool checked) {
    if (checked)
        check(atoms);
    torch::Tensor a = atoms.select(-2, 0), b = atoms.select(-2, 1), c = atoms.select(-2, 2);
    torch::Tensor e1 = unit(c - b, !checked);
    torch::Tensor u = a - b;
    torch::Tensor e2 = unit(u - (e1 * u).sum(-1, true) * e1, !checked);
    torch::Tensor e3 = torch::linalg_cross(e1, e2);
    return {torch::stack({e1, e2, e3}, -1), b};
}

} // namespace FlashIPAPlugin
