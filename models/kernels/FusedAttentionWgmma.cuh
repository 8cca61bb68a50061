#ifndef FLASHIPA_FUSED_ATTENTION_WGMMA_CUH_
#define FLASHIPA_FUSED_ATTENTION_WGMMA_CUH_

// Hopper warpgroup products (wgmma, sm_90a only): one instruction per warpgroup of 4 warps computes a
// 64-row product, B (and optionally A) read by the tensor cores straight from shared memory. Against
// mma.sync this removes the ldmatrix loads and most of the issue slots, which bound the mma.sync
// forward (benchmarks/results/fused_kernel_ncu_h100.md).
//
// Shared-memory operands use the no-swizzle K-major layout: 8 x 8 fp16 "core matrices" of 128
// contiguous bytes (8 rows of 16 bytes). The operands are packed once per call in exactly this order
// (tile by tile, FusedAttention.cpp), so staging a tile is a contiguous copy. A tile of R rows and K
// columns stores core matrix (row group rg, column group kc) at byte (rg * K / 8 + kc) * 128: the
// descriptor's leading offset (between core matrices along K) is 128 bytes and its stride offset
// (between row groups) K * 16 bytes; a 16-column k-step advances the start by 256 bytes.
//
// Accumulators: for a 64 x N product, warp w of the warpgroup holds rows 16 w .. 16 w + 15 in the
// mma.sync m16n8 layout, n-tile by n-tile: d[4 j + e] = (row g, column 8 j + 2 t + e), d[4 j + 2 + e] =
// (row g + 8, ...). A from registers uses the mma.sync A-fragment layout of the warp's 16 rows, so the
// softmax code and FlashAttention-2's register re-use of probabilities carry over unchanged.
#include <cstdint>

namespace FlashIPAPlugin {
namespace kernels {

/** Byte offset of element (row, column) in a core-matrix tile with `columns` columns (a multiple of 8). */
__host__ __device__ constexpr unsigned coreMatrixOffset(int row, int column, int columns) {
    return (unsigned) (((row / 8) * (columns / 8) + column / 8) * 128 + (row % 8) * 16 + (column % 8) * 2);
}

/** Descriptor of a no-swizzle K-major core-matrix tile at a shared address with `columns` columns. */
__device__ __forceinline__ uint64_t tileDescriptor(unsigned address, int columns) {
    const uint64_t leading = 128 >> 4, stride = (uint64_t) (columns * 16) >> 4;
    return (uint64_t) ((address & 0x3FFFF) >> 4) | (leading << 16) | (stride << 32);
}

/**
 * Descriptor of the same core-matrix tile read N-major (the transposed B operand): the product's K runs
 * along the tile's rows and N along its columns. Core matrices adjacent along N are 128 bytes apart,
 * along K (8 rows) columns * 16 bytes; a 16-row k-step advances the start by columns * 32 bytes and
 * 8 columns along N by 128 bytes.
 */
__device__ __forceinline__ uint64_t transposedTileDescriptor(unsigned address, int columns) {
    const uint64_t leading = (uint64_t) (columns * 16) >> 4, stride = (uint64_t) (128) >> 4;
    return (uint64_t) ((address & 0x3FFFF) >> 4) | (leading << 16) | (stride << 32);
}

/** A descriptor moved by `bytes` (a multiple of 16) along its tile. */
__device__ __forceinline__ uint64_t advance(uint64_t descriptor, unsigned bytes) {
    return descriptor + (bytes >> 4);
}

/** Orders this thread's earlier register writes before the warpgroup's next wgmma reads them. */
__device__ __forceinline__ void wgmmaFence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmmaCommit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

/** Waits until at most `Pending` committed groups of wgmma are still running. */
template <int Pending>
__device__ __forceinline__ void wgmmaWait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}

/** Keeps the compiler from moving reads or writes of accumulators across an asynchronous product. */
template <int N>
__device__ __forceinline__ void fenceRegisters(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+f"(d[i])::"memory");
}

/** Makes this thread's shared-memory writes (st.shared, cp.async) visible to the tensor cores' reads. */
__device__ __forceinline__ void fenceSharedForTensorCores() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/** d (64 x 64 per warpgroup, fp32) = A B^T + (accumulate ? d : 0), A and B read from shared memory through descriptors. */
__device__ __forceinline__ void wgmma64x64(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(a), "l"(b), "r"(accumulate));
}

/**
 * d (64 x N per warpgroup, N = 2 x the accumulator count) += A B^T with A from registers (per warp, the
 * mma.sync A fragment of its 16 rows) and B from shared memory. TransposeB = 0: B is K-major (core
 * matrices hold 8 of B's rows, K contiguous), as from tileDescriptor; 1: B is N-major, as from
 * transposedTileDescriptor (the products of the backward that multiply by an operand tile along its rows).
 */
template <int TransposeB>
__device__ __forceinline__ void wgmmaRegisterA(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1, %10;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b), "r"(1), "n"(TransposeB));
}

template <int TransposeB>
__device__ __forceinline__ void wgmmaRegisterA(float (&d)[8], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, %14;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b), "r"(1), "n"(TransposeB));
}

template <int TransposeB>
__device__ __forceinline__ void wgmmaRegisterA(float (&d)[12], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %17, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n24k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11}, {%12,%13,%14,%15}, %16, p, 1, 1, %18;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b), "r"(1), "n"(TransposeB));
}

template <int TransposeB>
__device__ __forceinline__ void wgmmaRegisterA(float (&d)[16], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, %22;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b), "r"(1), "n"(TransposeB));
}

template <int TransposeB>
__device__ __forceinline__ void wgmmaRegisterA(float (&d)[32], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(b), "r"(1), "n"(TransposeB));
}

} // namespace kernels
} // namespace FlashIPAPlugin

#endif
