#ifndef FLASHIPA_EXCLUSION_PAIR_TERM_H_
#define FLASHIPA_EXCLUSION_PAIR_TERM_H_

// One pair of the geometry prior's exclusion term (GeometryPrior::exclusionEnergy, docs/MODEL.md "Generated
// samples clash") with its analytic first derivatives, for the pairwise evaluation on the CPU
// (models/src/ExclusionPairs.cpp) and the GPU (ExclusionPairs.cu). The special functions come from a policy
// class M (static exp, log, expm1, log1p, erfcx, normalCdf), so nvcc's device functions and the host's serve
// the same formulas.
//
// With a = (r - r0)/s, b = (r + r0)/s, q = 2 r r0 / s^2 (so phi(b) = phi(a) e^-q) and G = 1 - F, the
// probability that the noised pair lies outside the ball,
//
//     G     = Phi(a) + Phi(-b) + (s/r) [phi(a) - phi(b)],        E = -log G
//     dG/dr = (r0 / (r s)) [phi(a) + phi(b)] - (s / r^2) [phi(a) - phi(b)]
//     dG/ds = [-a phi(a) + b phi(b)] / s + [phi(a) - phi(b)] / r + [a^2 phi(a) - b^2 phi(b)] / r
//
// Inside the wall (a <= 0) G is tiny, so every term is divided by phi(a) first and Phi by erfcx:
// G = phi(a) H, H = sqrt(pi/2) [erfcx(-a/sqrt2) + erfcx(b/sqrt2) e^-q] - (s/r) expm1(-q), all bounded; outside,
// E = -log1p(-F) as in the tensor evaluation, and F <= 0 (rounding) is a zero term there as it is here.

#ifdef __CUDACC__
#define FLASHIPA_EXCLUSION_FN __device__ __forceinline__
#else
#define FLASHIPA_EXCLUSION_FN inline
#endif

namespace FlashIPAPlugin {
namespace kernels {

/** The energy (kT) of one pair and its derivatives with respect to the distance r and the spread s. */
template <typename T>
struct ExclusionPairValue {
    T energy, dEdr, dEds;
};

/**
 * The exclusion term of one pair at distance r (already softened: r > 0) for a wall of radius r0 and spread s.
 * M supplies exp, log, expm1, log1p, erfcx and normalCdf for T.
 */
template <typename T, class M>
FLASHIPA_EXCLUSION_FN ExclusionPairValue<T> exclusionPair(T r, T s, T r0) {
    const T rootHalfPi = T(1.2533141373155002512), rootHalf = T(0.70710678118654752440);
    const T logRootTwoPi = T(0.91893853320467274178), inverseRootTwoPi = T(0.39894228040143267794);
    const T a = (r - r0) / s, b = (r + r0) / s, q = T(2) * r * r0 / (s * s);
    const T eq = M::exp(-q), em = M::expm1(-q);
    ExclusionPairValue<T> v;
    if (a <= T(0)) {
        const T h = rootHalfPi * (M::erfcx(-a * rootHalf) + M::erfcx(b * rootHalf) * eq) - (s / r) * em;
        v.energy = T(0.5) * a * a + logRootTwoPi - M::log(h);
        v.dEdr = -((r0 / (r * s)) * (T(1) + eq) + (s / (r * r)) * em) / h;
        v.dEds = -((b * eq - a) / s - em / r + (a * a - b * b * eq) / r) / h;
        return v;
    }
    const T pa = inverseRootTwoPi * M::exp(T(-0.5) * a * a), pb = inverseRootTwoPi * M::exp(T(-0.5) * b * b);
    const T f = M::normalCdf(-a) - M::normalCdf(-b) - (s / r) * (pa - pb);
    if (f <= T(0)) {
        v.energy = v.dEdr = v.dEds = T(0);
        return v;
    }
    const T g = T(1) - f;
    v.energy = -M::log1p(-f);
    v.dEdr = -((r0 / (r * s)) * (pa + pb) - (s / (r * r)) * (pa - pb)) / g;
    v.dEds = -((b * pb - a * pa) / s + (pa - pb) / r + (a * a * pa - b * b * pb) / r) / g;
    return v;
}

} // namespace kernels
} // namespace FlashIPAPlugin

#endif // FLASHIPA_EXCLUSION_PAIR_TERM_H_
