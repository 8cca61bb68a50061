// The exclusion term pair by pair (ExclusionPairs.h): the CPU loop, and the launch of the GPU kernel
// (models/kernels/ExclusionPairs.cu). Both evaluate models/kernels/ExclusionPairTerm.h per pair and sum in a
// fixed order, so results do not depend on threads or scheduling.
#include "ExclusionPairs.h"
#include "../kernels/ExclusionPairTerm.h"
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <cmath>
#include <stdexcept>

#ifdef FLASHIPA_HAVE_FUSED_KERNEL
#include "../kernels/ExclusionPairs.h"
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace FlashIPAPlugin {

namespace {

/** The host's special functions for exclusionPair(): erfcx as LibTorch's own (torch::special_erfcx on the CPU). */
template <typename T>
struct HostMath {
    static T exp(T x) { return std::exp(x); }
    static T log(T x) { return std::log(x); }
    static T expm1(T x) { return std::expm1(x); }
    static T log1p(T x) { return std::log1p(x); }
    static T erfcx(T x) { return calc_erfcx(x); } // ATen/native/Math.h, in the global namespace
    static T normalCdf(T x) { return T(0.5) * std::erfc(-x * T(0.70710678118654752440)); }
};

template <typename T>
void exclusionPairsOnHost(const torch::Tensor& x, const torch::Tensor& s, const torch::Tensor& chains, const torch::Tensor& real,
                          int64_t nearest, double radius, double smallestDistance, double cutoffSpreads, torch::Tensor& partial) {
    const int64_t B = x.size(0), N = x.size(1), L = N / 3;
    const T* xs = x.data_ptr<T>();
    const T* spread = s.data_ptr<T>();
    const int64_t* chain = chains.data_ptr<int64_t>();
    const bool* isReal = real.data_ptr<bool>();
    T* out = partial.data_ptr<T>();
    const T r0 = T(radius), smallest2 = T(smallestDistance * smallestDistance);
    at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; item++) {
            const int64_t b = item / N, i = item % N, ri = i / 3;
            T* o = out + item * 5;
            o[0] = o[1] = o[2] = o[3] = o[4] = T(0);
            if (!isReal[b * L + ri])
                continue;
            const T sb = spread[b], cutoff = r0 + T(cutoffSpreads) * sb, cutoff2 = cutoff * cutoff;
            const T* xb = xs + b * N * 3;
            const T xi0 = xb[3 * i], xi1 = xb[3 * i + 1], xi2 = xb[3 * i + 2];
            const int64_t ci = chain[b * L + ri];
            for (int64_t j = 0; j < N; j++) {
                const T dx = xi0 - xb[3 * j], dy = xi1 - xb[3 * j + 1], dz = xi2 - xb[3 * j + 2];
                const T d2 = dx * dx + dy * dy + dz * dz;
                const int64_t rj = j / 3;
                if (d2 > cutoff2 || !isReal[b * L + rj])
                    continue;
                const int64_t separation = rj > ri ? rj - ri : ri - rj;
                if (separation == 0 || (chain[b * L + rj] == ci && separation < nearest))
                    continue;
                const T r = std::sqrt(d2 + smallest2);
                const kernels::ExclusionPairValue<T> v = kernels::exclusionPair<T, HostMath<T>>(r, sb, r0);
                const T scale = v.dEdr / r;
                o[0] += scale * dx, o[1] += scale * dy, o[2] += scale * dz;
                if (rj > ri)
                    o[3] += v.energy, o[4] += v.dEds;
            }
        }
    });
}

} // namespace

bool exclusionPairSumsApply(const torch::Tensor& atoms) {
    if (atoms.scalar_type() != torch::kFloat32 && atoms.scalar_type() != torch::kFloat64)
        return false;
    if (atoms.device().is_cpu())
        return true;
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
    return atoms.device().is_cuda();
#else
    return false;
#endif
}

ExclusionPairSums exclusionPairSums(const torch::Tensor& xIn, const torch::Tensor& sIn, const torch::Tensor& chainsIn,
                                    const torch::Tensor& realIn, int64_t nearest, double radius, double smallestDistance,
                                    double cutoffSpreads) {
    if (!exclusionPairSumsApply(xIn))
        throw std::invalid_argument("exclusion pairs: atoms must be float32 or float64 on the CPU or a GPU with the kernels built");
    const bool atomsShaped = xIn.dim() == 3 && xIn.size(2) == 3 && xIn.size(1) % 3 == 0;
    const int64_t B = atomsShaped ? xIn.size(0) : 0, N = atomsShaped ? xIn.size(1) : 0, L = N / 3;
    if (!atomsShaped || chainsIn.sizes() != torch::IntArrayRef{B, L} || realIn.sizes() != torch::IntArrayRef{B, L} || sIn.numel() != B)
        throw std::invalid_argument("exclusion pairs: want atoms [B, 3 L, 3], spread [B], chains and real [B, L]");
    torch::NoGradGuard noGrad;
    torch::Tensor x = xIn.detach().contiguous(), s = sIn.detach().reshape({B}).to(x.dtype()).contiguous();
    int64_t splits = 1;
    torch::Tensor partial;
    if (x.device().is_cpu()) {
        torch::Tensor chains = chainsIn.to(torch::kInt64).contiguous(), real = realIn.to(torch::kBool).contiguous();
        partial = torch::empty({1, B, N, 5}, x.options());
        AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "exclusionPairsOnHost", [&] {
            exclusionPairsOnHost<scalar_t>(x, s, chains, real, nearest, radius, smallestDistance, cutoffSpreads, partial);
        });
    } else {
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
        c10::cuda::CUDAGuard guard(x.device());
        // Enough blocks to fill the GPU: a short chain's atoms alone give few blocks, so each atom's partner range
        // is then cut into parts (at most 16), each with its own partial sums.
        const int64_t tiles = (N + kernels::ExclusionTileAtoms - 1) / kernels::ExclusionTileAtoms, atomBlocks = B * tiles;
        const int64_t wanted = 4 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        splits = std::max<int64_t>(1, std::min<int64_t>({16, tiles, (wanted + atomBlocks - 1) / std::max<int64_t>(1, atomBlocks)}));
        torch::Tensor chains = chainsIn.to(torch::kInt32).contiguous(), real = realIn.to(torch::kUInt8).contiguous();
        partial = torch::empty({splits, B, N, 5}, x.options());
        kernels::ExclusionPairsProblem p;
        p.structures = (int) B, p.residues = (int) L, p.nearest = (int) nearest, p.splits = (int) splits;
        p.radius = radius, p.smallestDistance = smallestDistance, p.cutoffSpreads = cutoffSpreads;
        p.doublePrecision = x.scalar_type() == torch::kFloat64;
        p.atoms = x.data_ptr(), p.spread = s.data_ptr(), p.chains = chains.data_ptr<int>(), p.real = real.data_ptr<uint8_t>();
        p.partial = partial.data_ptr();
        kernels::launchExclusionPairs(p, at::cuda::getCurrentCUDAStream());
#endif
    }
    torch::Tensor sums = splits == 1 ? partial[0] : partial.sum(0); // [B, N, 5]
    return {sums.select(2, 3).sum(1), sums.narrow(2, 0, 3).contiguous(), sums.select(2, 4).sum(1)};
}

} // namespace FlashIPAPlugin
