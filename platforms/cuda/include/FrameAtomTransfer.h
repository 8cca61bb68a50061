#ifndef FLASHIPA_FRAME_ATOM_TRANSFER_H_
#define FLASHIPA_FRAME_ATOM_TRANSFER_H_
// Moving data between OpenMM's device arrays and the model's tensors, on the GPU (FrameAtomTransfer.cu).
// OpenMM reorders atoms for locality: atomIndex[j] is the original index of the atom stored at j.

#include <cuda_runtime.h>

namespace FlashIPAPlugin {

/** How OpenMM stores positions: float4 (single), float4 + float4 correction (mixed), double4 (double). */
enum class PositionLayout { Single, Mixed, Double };

/** sortedIndex[atomIndex[j]] = j for j < numAtoms. */
void launchInvertAtomOrder(const int* atomIndex, int numAtoms, int* sortedIndex, cudaStream_t stream);

/**
 * out[k] = position of original atom frameAtoms[k] (k < numFrameAtoms), as float or double xyz, and
 * parameters[0..2] = (scale, sigma, temperature) so that a captured graph reads the current values.
 */
void launchGatherFrameAtoms(PositionLayout layout, const void* posq, const void* posqCorrection, const int* sortedIndex,
                            const int* frameAtoms, int numFrameAtoms, bool outputDouble, void* out, void* parameters,
                            double scale, double sigma, double temperature, cudaStream_t stream);

/**
 * Adds forces [numFrameAtoms, 3] (float or double) to OpenMM's 64-bit fixed-point force buffer (x, y, z
 * blocks of paddedNumAtoms), and (thread 0) the energy to energyBuffer[0] and the three parameter
 * derivatives to derivativeBuffer[derivativeIndex[i]] (skipped where the index is negative). Writes the
 * invalid flag (degenerate frames) to a host-mapped word, read by the host without synchronising.
 */
void launchScatterForces(const void* forces, const void* energy, const void* derivatives, const bool* invalid,
                         bool inputDouble, const int* sortedIndex, const int* frameAtoms, int numFrameAtoms,
                         int paddedNumAtoms, unsigned long long* forceBuffer, bool includeForces, void* energyBuffer,
                         void* derivativeBuffer, bool mixedIsDouble, int derivative0, int derivative1, int derivative2,
                         int* invalidFlag, cudaStream_t stream);

} // namespace FlashIPAPlugin

#endif
