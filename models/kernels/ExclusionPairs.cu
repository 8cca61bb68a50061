// The geometry prior's exclusion term, pair by pair on the GPU (ExclusionPairs.h). One thread owns one atom i
// of one structure and walks the atoms j of its part of the range in tiles staged in shared memory: it
// accumulates dE/dx_i over every counted pair (i, j), and the energy and dE/ds of the pairs whose j residue
// comes after i's, so each unordered pair is counted once and nothing is written by two threads. Pairs beyond
// r0 + cutoffSpreads s are skipped before any special function. The partial sums go to their own slots and the
// caller sums them in a fixed order: results do not depend on scheduling.
#include "ExclusionPairTerm.h"
#include "ExclusionPairs.h"
#include <stdexcept>
#include <string>

namespace FlashIPAPlugin {
namespace kernels {
namespace {

constexpr int ExclusionThreads = ExclusionTileAtoms; // atoms i per block, and atoms j per shared-memory tile

/** nvcc's device functions for float and double, as exclusionPair() wants them. */
template <typename T>
struct DeviceMath;
template <>
struct DeviceMath<float> {
    __device__ static float exp(float x) { return ::expf(x); }
    __device__ static float log(float x) { return ::logf(x); }
    __device__ static float expm1(float x) { return ::expm1f(x); }
    __device__ static float log1p(float x) { return ::log1pf(x); }
    __device__ static float erfcx(float x) { return ::erfcxf(x); }
    __device__ static float normalCdf(float x) { return ::normcdff(x); }
};
template <>
struct DeviceMath<double> {
    __device__ static double exp(double x) { return ::exp(x); }
    __device__ static double log(double x) { return ::log(x); }
    __device__ static double expm1(double x) { return ::expm1(x); }
    __device__ static double log1p(double x) { return ::log1p(x); }
    __device__ static double erfcx(double x) { return ::erfcx(x); }
    __device__ static double normalCdf(double x) { return ::normcdf(x); }
};

template <typename T>
__global__ void __launch_bounds__(ExclusionThreads) exclusionPairsKernel(ExclusionPairsProblem p) {
    __shared__ T tileX[ExclusionThreads][3];
    __shared__ int tileChain[ExclusionThreads];
    __shared__ unsigned char tileReal[ExclusionThreads];
    const int B = p.structures, N = 3 * p.residues, b = blockIdx.y, part = blockIdx.z;
    const int i = blockIdx.x * ExclusionThreads + threadIdx.x;
    const T* x = static_cast<const T*>(p.atoms) + (size_t) b * N * 3;
    const int* chains = p.chains + (size_t) b * p.residues;
    const unsigned char* real = p.real + (size_t) b * p.residues;
    const T s = static_cast<const T*>(p.spread)[b], r0 = T(p.radius), smallest2 = T(p.smallestDistance * p.smallestDistance);
    const T cutoff = r0 + T(p.cutoffSpreads) * s, cutoff2 = cutoff * cutoff;
    const int ri = i / 3;
    const bool active = i < N && real[ri];
    T xi[3] = {0, 0, 0};
    int ci = 0;
    if (active) {
        for (int k = 0; k < 3; k++)
            xi[k] = x[3 * i + k];
        ci = chains[ri];
    }
    T grad[3] = {0, 0, 0}, energy = 0, dEds = 0;
    // This block's part of the j range, whole tiles.
    const int tiles = (N + ExclusionThreads - 1) / ExclusionThreads;
    const int perPart = (tiles + p.splits - 1) / p.splits;
    const int firstTile = part * perPart, endTile = min(tiles, firstTile + perPart);
    for (int tile = firstTile; tile < endTile; tile++) {
        const int j0 = tile * ExclusionThreads, load = j0 + threadIdx.x;
        __syncthreads();
        if (load < N) {
            for (int k = 0; k < 3; k++)
                tileX[threadIdx.x][k] = x[3 * load + k];
            tileChain[threadIdx.x] = chains[load / 3];
            tileReal[threadIdx.x] = real[load / 3];
        } else {
            tileReal[threadIdx.x] = 0;
        }
        __syncthreads();
        if (!active)
            continue;
        const int count = min(ExclusionThreads, N - j0);
        for (int t = 0; t < count; t++) {
            const T dx = xi[0] - tileX[t][0], dy = xi[1] - tileX[t][1], dz = xi[2] - tileX[t][2];
            const T d2 = dx * dx + dy * dy + dz * dz;
            if (d2 > cutoff2 || !tileReal[t])
                continue;
            const int rj = (j0 + t) / 3;
            const int separation = rj > ri ? rj - ri : ri - rj;
            if (separation == 0 || (tileChain[t] == ci && separation < p.nearest))
                continue;
            const T r = sqrt(d2 + smallest2);
            const ExclusionPairValue<T> v = exclusionPair<T, DeviceMath<T>>(r, s, r0);
            const T scale = v.dEdr / r;
            grad[0] += scale * dx, grad[1] += scale * dy, grad[2] += scale * dz;
            if (rj > ri)
                energy += v.energy, dEds += v.dEds;
        }
    }
    if (i < N) {
        T* out = static_cast<T*>(p.partial) + (((size_t) part * B + b) * N + i) * 5;
        out[0] = grad[0], out[1] = grad[1], out[2] = grad[2], out[3] = energy, out[4] = dEds;
    }
}

} // namespace

void launchExclusionPairs(const ExclusionPairsProblem& p, cudaStream_t stream) {
    if (p.structures <= 0 || p.residues <= 0)
        return;
    if (p.splits < 1 || p.structures > 65535 || p.splits > 65535 || 3LL * p.residues > (1LL << 30))
        throw std::invalid_argument("exclusion pairs: sizes out of range");
    const dim3 grid((3 * p.residues + ExclusionThreads - 1) / ExclusionThreads, p.structures, p.splits);
    if (p.doublePrecision)
        exclusionPairsKernel<double><<<grid, ExclusionThreads, 0, stream>>>(p);
    else
        exclusionPairsKernel<float><<<grid, ExclusionThreads, 0, stream>>>(p);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess)
        throw std::runtime_error(std::string("exclusion pairs: kernel launch failed: ") + cudaGetErrorString(status));
}

} // namespace kernels
} // namespace FlashIPAPlugin
