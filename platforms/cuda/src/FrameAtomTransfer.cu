// Kernels that move frame-atom positions from OpenMM's arrays to the model, and forces, energy and
// parameter derivatives back. Grouped here because they all translate between OpenMM's storage
// (reordered atoms, fixed-point forces) and the model's dense per-residue tensors.
#include "FrameAtomTransfer.h"
#include <stdexcept>
#include <string>

namespace FlashIPAPlugin {

namespace {
constexpr int BlockSize = 128;
int blocksFor(int n) { return (n + BlockSize - 1) / BlockSize; }

void check(cudaError_t result, const char* what) {
    if (result != cudaSuccess)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(result));
}

__global__ void invertAtomOrder(const int* atomIndex, int numAtoms, int* sortedIndex) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < numAtoms)
        sortedIndex[atomIndex[j]] = j;
}

template <class Real>
__device__ void storeParameters(Real* parameters, double scale, double sigma, double temperature) {
    parameters[0] = (Real) scale;
    parameters[1] = (Real) sigma;
    parameters[2] = (Real) temperature;
}

template <PositionLayout Layout, class Real>
__global__ void gatherFrameAtoms(const void* posq, const float4* correction, const int* sortedIndex, const int* frameAtoms,
                                 int numFrameAtoms, Real* out, Real* parameters, double scale, double sigma, double temperature) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k == 0)
        storeParameters(parameters, scale, sigma, temperature);
    if (k >= numFrameAtoms)
        return;
    int j = sortedIndex[frameAtoms[k]];
    double x, y, z;
    if (Layout == PositionLayout::Double) {
        double4 p = ((const double4*) posq)[j];
        x = p.x, y = p.y, z = p.z;
    } else {
        float4 p = ((const float4*) posq)[j];
        x = p.x, y = p.y, z = p.z;
        if (Layout == PositionLayout::Mixed) {
            // Mixed precision keeps positions as float + float correction; their sum is the double position.
            float4 c = correction[j];
            x += c.x, y += c.y, z += c.z;
        }
    }
    out[3 * k] = (Real) x;
    out[3 * k + 1] = (Real) y;
    out[3 * k + 2] = (Real) z;
}

template <class Real, class Mixed>
__global__ void scatterForces(const Real* forces, const Real* energy, const Real* derivatives, const bool* invalid,
                              const int* sortedIndex, const int* frameAtoms, int numFrameAtoms, int paddedNumAtoms,
                              unsigned long long* forceBuffer, bool includeForces, Mixed* energyBuffer, Mixed* derivativeBuffer,
                              int d0, int d1, int d2, int* invalidFlag) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k == 0) {
        energyBuffer[0] += (Mixed) energy[0];
        const int index[3] = {d0, d1, d2};
        for (int i = 0; i < 3; i++)
            if (index[i] >= 0)
                derivativeBuffer[index[i]] += (Mixed) derivatives[i];
        if (*invalid)
            *invalidFlag = 1;
    }
    if (!includeForces || k >= numFrameAtoms)
        return;
    int j = sortedIndex[frameAtoms[k]];
    // OpenMM's fixed point: value * 2^32 as a 64-bit integer, added atomically (other kernels may add too).
    for (int d = 0; d < 3; d++)
        atomicAdd(&forceBuffer[j + d * paddedNumAtoms],
                  (unsigned long long) ((long long) (forces[3 * k + d] * (Real) 0x100000000)));
}
} // namespace

void launchInvertAtomOrder(const int* atomIndex, int numAtoms, int* sortedIndex, cudaStream_t stream) {
    invertAtomOrder<<<blocksFor(numAtoms), BlockSize, 0, stream>>>(atomIndex, numAtoms, sortedIndex);
    check(cudaGetLastError(), "invertAtomOrder");
}

void launchGatherFrameAtoms(PositionLayout layout, const void* posq, const void* posqCorrection, const int* sortedIndex,
                            const int* frameAtoms, int numFrameAtoms, bool outputDouble, void* out, void* parameters,
                            double scale, double sigma, double temperature, cudaStream_t stream) {
    const float4* correction = (const float4*) posqCorrection;
    const int blocks = blocksFor(numFrameAtoms);
#define FLASHIPA_GATHER(LAYOUT, REAL)                                                                                  \
    gatherFrameAtoms<LAYOUT, REAL><<<blocks, BlockSize, 0, stream>>>(posq, correction, sortedIndex, frameAtoms,        \
                                                                     numFrameAtoms, (REAL*) out, (REAL*) parameters, \
                                                                     scale, sigma, temperature)
    if (outputDouble) {
        if (layout == PositionLayout::Double)
            FLASHIPA_GATHER(PositionLayout::Double, double);
        else if (layout == PositionLayout::Mixed)
            FLASHIPA_GATHER(PositionLayout::Mixed, double);
        else
            FLASHIPA_GATHER(PositionLayout::Single, double);
    } else {
        if (layout == PositionLayout::Double)
            FLASHIPA_GATHER(PositionLayout::Double, float);
        else if (layout == PositionLayout::Mixed)
            FLASHIPA_GATHER(PositionLayout::Mixed, float);
        else
            FLASHIPA_GATHER(PositionLayout::Single, float);
    }
#undef FLASHIPA_GATHER
    check(cudaGetLastError(), "gatherFrameAtoms");
}

void launchScatterForces(const void* forces, const void* energy, const void* derivatives, const bool* invalid,
                         bool inputDouble, const int* sortedIndex, const int* frameAtoms, int numFrameAtoms,
                         int paddedNumAtoms, unsigned long long* forceBuffer, bool includeForces, void* energyBuffer,
                         void* derivativeBuffer, bool mixedIsDouble, int d0, int d1, int d2, int* invalidFlag,
                         cudaStream_t stream) {
    const int blocks = blocksFor(std::max(numFrameAtoms, 1));
#define FLASHIPA_SCATTER(REAL, MIXED)                                                                                  \
    scatterForces<REAL, MIXED><<<blocks, BlockSize, 0, stream>>>(                                                     \
        (const REAL*) forces, (const REAL*) energy, (const REAL*) derivatives, invalid, sortedIndex, frameAtoms,      \
        numFrameAtoms, paddedNumAtoms, forceBuffer, includeForces, (MIXED*) energyBuffer, (MIXED*) derivativeBuffer,  \
        d0, d1, d2, invalidFlag)
    if (inputDouble && mixedIsDouble)
        FLASHIPA_SCATTER(double, double);
    else if (inputDouble)
        FLASHIPA_SCATTER(double, float);
    else if (mixedIsDouble)
        FLASHIPA_SCATTER(float, double);
    else
        FLASHIPA_SCATTER(float, float);
#undef FLASHIPA_SCATTER
    check(cudaGetLastError(), "scatterForces");
}

} // namespace FlashIPAPlugin
