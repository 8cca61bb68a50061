#ifndef FLASHIPA_EXCLUSION_PAIRS_H_
#define FLASHIPA_EXCLUSION_PAIRS_H_

// The geometry prior's exclusion term evaluated pair by pair on the GPU (ExclusionPairs.cu): energy per
// structure and its first derivatives with respect to the frame atoms and the wall's spread, in one pass over
// the atom pairs, with no pair buffer. Plain pointers and sizes, shared by nvcc and the C++ compiler
// (models/src/ExclusionPairs.cpp, which also holds the CPU loop and the autograd around both).

#include <cuda_runtime_api.h>

namespace FlashIPAPlugin {
namespace kernels {

/** Atoms per block (one thread each) and per shared-memory tile of partners; the caller sizes the splits with it. */
constexpr int ExclusionTileAtoms = 128;

struct ExclusionPairsProblem {
    int structures = 0;        ///< B
    int residues = 0;          ///< L; atoms N = 3 L, atom n belongs to residue n / 3
    int nearest = 2;           ///< residues of one chain segment count only at least this far apart
    int splits = 1;            ///< the atom range each thread reads is cut into this many parts (one partial each)
    double radius = 0;         ///< r0 (nm)
    double smallestDistance = 0; ///< r = sqrt(d^2 + smallest^2)
    double cutoffSpreads = 0;  ///< pairs farther than r0 + cutoffSpreads s are skipped (their term is below 1e-32)
    bool doublePrecision = false; ///< float64 when set, else float32: atoms, spread and partials
    const void* atoms = nullptr;  ///< [B, N, 3]
    const void* spread = nullptr; ///< [B], s
    const int* chains = nullptr;  ///< [B, L] chain segment ids
    const unsigned char* real = nullptr; ///< [B, L] 1 for real residues
    void* partial = nullptr;      ///< [splits, B, N, 5]: dE/dx (3), the energy of pairs with the other residue
                                  ///< after this one's, and that energy's derivative by s
};

/** Launches the pairwise evaluation on `stream`; throws std::runtime_error on a launch error. */
void launchExclusionPairs(const ExclusionPairsProblem& problem, cudaStream_t stream);

} // namespace kernels
} // namespace FlashIPAPlugin

#endif // FLASHIPA_EXCLUSION_PAIRS_H_
