#ifndef FLASHIPA_FUSED_ATTENTION_MMA_CUH_
#define FLASHIPA_FUSED_ATTENTION_MMA_CUH_

// Tensor-core building blocks shared by the forward and backward tensor-core kernels: fp16 packing,
// the m16n8k16 product, asynchronous 16-byte copies and ldmatrix fragment loads.
//
// Fragment layouts of mma.sync.m16n8k16 (lane = 4 g + t): A (16 x 16, row-major) a0 = (row g, k 2t..2t+1),
// a1 = (g + 8, 2t), a2 = (g, 2t + 8), a3 = (g + 8, 2t + 8); B (16 x 8) b0 = (k 2t..2t+1, n g), b1 = (k 2t + 8, n g);
// accumulators d0..d1 = (row g, n 2t..2t+1), d2..d3 = (row g + 8, n 2t..2t+1). The accumulators of a 16 x 16
// product therefore are the A fragment of the next product once packed to fp16 (FlashAttention-2's trick).
//
// Shared-memory tiles hold fp16 pairs in 32-bit words, rows padded to 4 mod 32 words (paddedWords) so that
// eight 16-byte row segments, what one ldmatrix phase reads, fall on distinct banks.
#include "FusedAttentionLaunch.cuh"
#include <cstdint>

namespace FlashIPAPlugin {
namespace kernels {

/** Row stride in 32-bit words, padded to 4 mod 32 so that the 8 x 4 fragment loads hit 32 banks. */
__host__ __device__ constexpr int paddedWords(int words) {
    return words + ((4 - words % 32) + 32) % 32;
}

constexpr float Log2E = 1.4426950408889634f;

/**
 * 2^x with results below 2^-126 flushed to zero (ex2.approx.ftz): exp2f handles denormal results with a
 * compare and two multiplies per call, 3 of the forward softmax's ~30 instructions per logit; probabilities that
 * small are zero for every purpose here.
 */
__device__ __forceinline__ float exp2Flushed(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t packHalf2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

/** d += A B on tensor cores (fp16 operands, fp32 accumulators). */
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned sharedAddress(const void* pointer) {
    return (unsigned) __cvta_generic_to_shared(pointer);
}

__device__ __forceinline__ void copyAsync16(uint32_t* dst, const uint4* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sharedAddress(dst)), "l"(src));
}

__device__ __forceinline__ void commitCopies() {
    asm volatile("cp.async.commit_group;\n" ::);
}

__device__ __forceinline__ void waitCopies() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

/**
 * Which 16-byte vectors of a row-by-row copy a thread moves: the first (row, vector) and the step
 * between its copies (one division per call, none per copied vector).
 */
struct CopyPlan {
    int vectors, row, vector, rowStep, vectorStep;
};

template <int Threads>
__device__ __forceinline__ CopyPlan planCopies(int vectors) {
    return {vectors, (int) threadIdx.x / vectors, (int) threadIdx.x % vectors, Threads / vectors, Threads % vectors};
}

/**
 * Copies `rows` rows of `vectors` 16-byte vectors from src (row pitch srcPitch vectors) to dst
 * (pitch dstPitch words), spread over the block's threads.
 */
template <int Threads>
__device__ __forceinline__ void copyRows(uint32_t* dst, int dstPitch, const uint4* src, size_t srcPitch, int rows, int vectors) {
    // Pointers advance by fixed steps (one more row when the vector index wraps): no multiplications per copy.
    const CopyPlan plan = planCopies<Threads>(vectors);
    int r = plan.row, v = plan.vector;
    unsigned target = sharedAddress(dst) + 4u * (unsigned) (r * dstPitch + 4 * v);
    const uint4* source = src + r * srcPitch + v;
    const unsigned targetStep = 4u * (unsigned) (plan.rowStep * dstPitch + 4 * plan.vectorStep);
    const unsigned targetWrap = 4u * (unsigned) (dstPitch - 4 * plan.vectors);
    const ptrdiff_t sourceStep = (ptrdiff_t) (plan.rowStep * srcPitch) + plan.vectorStep;
    const ptrdiff_t sourceWrap = (ptrdiff_t) srcPitch - plan.vectors;
    while (r < rows) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(target), "l"(source));
        v += plan.vectorStep;
        r += plan.rowStep;
        target += targetStep;
        source += sourceStep;
        if (v >= plan.vectors) {
            v -= plan.vectors;
            r++;
            target += targetWrap;
            source += sourceWrap;
        }
    }
}

/** Copies `vectors` contiguous 16-byte vectors from src to the shared address dst, spread over the block's threads. */
template <int Threads>
__device__ __forceinline__ void copyContiguous(unsigned dst, const uint4* src, int vectors) {
    for (int i = threadIdx.x; i < vectors; i += Threads)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + 16u * (unsigned) i), "l"(src + i));
}

/** Four 8 x 8 fp16 matrices; lane l gives the shared address of row l % 8 of matrix l / 8. */
__device__ __forceinline__ void loadMatrices(uint32_t (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

/** As loadMatrices, transposed: lane 4 g + t receives elements (2t, g) and (2t + 1, g) of each matrix. */
__device__ __forceinline__ void loadMatricesTransposed(uint32_t (&r)[4], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

/** Two matrices (lanes 0..15 give the addresses). */
__device__ __forceinline__ void loadTwoMatrices(uint32_t (&r)[2], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
}

/** Two matrices, transposed (lanes 0..15 give the addresses). */
__device__ __forceinline__ void loadTwoMatricesTransposed(uint32_t (&r)[2], unsigned address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address) : "memory");
}

// Fragment loads from a row-major fp16 tile in shared memory with a row stride in 32-bit words. The
// lane-dependent part of each address is computed once per kernel (FragmentLanes); a load adds only
// its tile's base and the block offset (rows times stride, plus 32 bytes per 16-column k-step).

/** Byte offsets of this lane's row address for each fragment pattern of a tile with the given stride. */
struct FragmentLanes {
    unsigned a, b, bOne, bTransposed, bTransposedOne;

    __device__ __forceinline__ explicit FragmentLanes(int stride) {
        const int lane = threadIdx.x % 32;
        a = 4u * (unsigned) ((lane & 15) * stride + (lane >> 4) * 4);
        b = 4u * (unsigned) (((lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 4);
        bOne = 4u * (unsigned) ((lane & 7) * stride + ((lane >> 3) & 1) * 4);
        bTransposed = 4u * (unsigned) (((lane & 7) + (((lane >> 3) & 1) << 3)) * stride + (lane >> 4) * 4);
        bTransposedOne = 4u * (unsigned) (((lane & 7) + (((lane >> 3) & 1) << 3)) * stride);
    }
};

/** A fragment of rows m0..m0+15, k-step ks (16 columns), of the tile at `tile` (shared address). */
__device__ __forceinline__ void loadA(uint32_t (&a)[4], unsigned tile, const FragmentLanes& lanes, int stride, int m0, int ks) {
    loadMatrices(a, tile + lanes.a + 4u * (unsigned) (m0 * stride + ks * 8));
}

/**
 * B fragments of two n-tiles (rows n0..n0+15 of a row-major tile [n][k]), k-step ks:
 * b[0], b[1] for n0..n0+7 and b[2], b[3] for n0+8..n0+15.
 */
__device__ __forceinline__ void loadB(uint32_t (&b)[4], unsigned tile, const FragmentLanes& lanes, int stride, int n0, int ks) {
    loadMatrices(b, tile + lanes.b + 4u * (unsigned) (n0 * stride + ks * 8));
}

/** As loadB for one n-tile (rows n0..n0+7). */
__device__ __forceinline__ void loadBOne(uint32_t (&b)[2], unsigned tile, const FragmentLanes& lanes, int stride, int n0, int ks) {
    loadTwoMatrices(b, tile + lanes.bOne + 4u * (unsigned) (n0 * stride + ks * 8));
}

/**
 * B fragments of two n-tiles (columns n0..n0+15) from a row-major tile [k][n] (rows k0..k0+15):
 * the transposed use of a tile, without a transposed copy.
 */
__device__ __forceinline__ void loadBTransposed(uint32_t (&b)[4], unsigned tile, const FragmentLanes& lanes, int stride, int k0, int n0) {
    loadMatricesTransposed(b, tile + lanes.bTransposed + 4u * (unsigned) (k0 * stride + n0 / 2));
}

/** As loadBTransposed for one n-tile (columns n0..n0+7). */
__device__ __forceinline__ void loadBTransposedOne(uint32_t (&b)[2], unsigned tile, const FragmentLanes& lanes, int stride, int k0, int n0) {
    loadTwoMatricesTransposed(b, tile + lanes.bTransposedOne + 4u * (unsigned) (k0 * stride + n0 / 2));
}

/**
 * One k-step of a 16-row product into NTiles accumulator n-tiles: acc[n] += A B_n for the A fragment `a`
 * and the B fragments of rows 0 .. 8 NTiles - 1 of a row-major [n][k] tile (k-step ks), read in pairs
 * of n-tiles by ldmatrix. The inner loop of every mma.sync product here (logits, dP, P.V).
 */
template <int NTiles>
__device__ __forceinline__ void multiplyKStep(float (&acc)[NTiles][4], const uint32_t (&a)[4], unsigned tile, const FragmentLanes& lanes,
                                              int stride, int ks) {
    static_assert(NTiles % 2 == 0, "n-tiles come in pairs");
#pragma unroll
    for (int np = 0; np < NTiles / 2; np++) {
        uint32_t b[4];
        loadB(b, tile, lanes, stride, 16 * np, ks);
        mma(acc[2 * np], a[0], a[1], a[2], a[3], b[0], b[1]);
        mma(acc[2 * np + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
    }
}

} // namespace kernels
} // namespace FlashIPAPlugin

#endif
