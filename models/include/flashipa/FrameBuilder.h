#ifndef FLASHIPA_FRAME_BUILDER_H_
#define FLASHIPA_FRAME_BUILDER_H_

#include <stdexcept>
#include <string>
#include <torch/torch.h>

namespace FlashIPAPlugin {

/** Rigid frames T_i = (R_i, t_i): R is [..., 3, 3] with the axes as columns, t is [..., 3]. */
struct Frames {
    torch::Tensor rotations;
    torch::Tensor translations;
};

/**
 * A residue whose frame atoms are coincident, collinear or not finite. what() names it by its index in the
 * batch ("structure 0, residue 17"); residue is the flat index over the batch and problem the rest of the
 * message ("are coincident (...)"), so callers that know the residue's name can say it instead.
 */
class DegenerateFrameError : public std::invalid_argument {
public:
    DegenerateFrameError(const std::string& what, int64_t residue, const std::string& problem)
        : std::invalid_argument(what), residue(residue), problem(problem) {}
    int64_t residue;
    std::string problem;
};

/**
 * Builds residue frames from three atoms by Gram-Schmidt (docs/MATH.md §1), differentiably:
 * e1 = unit(c - b), e2 = unit((a - b) - (e1.(a - b)) e1), e3 = e1 x e2, t = b.
 * Protein: (a, b, c) = (N, CA, C); RNA: (C3', C4', O4').
 */
class FrameBuilder {
public:
    /** Smallest |c - b| (nm) accepted as a bond. */
    static constexpr double MinBondLength = 1e-3;
    /** Smallest sine of the a-b-c angle accepted as non-collinear. */
    static constexpr double MinSine = 1e-3;

    /**
     * Frames of atoms [..., 3 (a, b, c), 3 (xyz)].
     * @param checked  if true, throw std::invalid_argument naming the first residue whose atoms are
     *                 coincident, collinear or not finite; if false, guard the normalisations so that
     *                 degenerate input gives finite (if arbitrary) frames, for noisy generation.
     */
    static Frames build(const torch::Tensor& atoms, bool checked = true);

    /** Throws DegenerateFrameError (a std::invalid_argument) if any residue of atoms [..., 3, 3] is degenerate (see build). */
    static void check(const torch::Tensor& atoms);

    /**
     * Per residue, whether its atoms are degenerate (non-finite, coincident or collinear), as a bool
     * tensor [...] on the atoms' device. Never synchronises with the host, so GPU callers can test it
     * asynchronously.
     */
    static torch::Tensor degenerate(const torch::Tensor& atoms);
};

} // namespace FlashIPAPlugin

#endif
