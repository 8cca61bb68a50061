#ifndef FLASHIPA_FUSED_ATTENTION_TILES_CUH_
#define FLASHIPA_FUSED_ATTENTION_TILES_CUH_

// Shared pieces of the fused FlashIPA kernels: reading lifted rows out of the layer's tensors, and
// the logit tile of a (query tile, key tile) pair, which the forward and both backward kernels
// recompute instead of storing (no L x L buffer anywhere).
//
// Precision (docs/MATH.md §5). The published layer folds the point term into the lifted dot product,
// |x|^2 + |y|^2 - 2 x.y, which in fp16 cancels large numbers once a structure sits far from the
// origin. Here the point term is never expanded: sum_p |x_ip - y_jp|^2 is formed from differences in
// fp32, and value points are aggregated in fp32, whatever the storage type of the scalar features.
// The caller centres coordinates on the structure (the softmax weights sum to one, so a common shift
// cancels), and the differences make the logits independent of where the structure sits: a
// translation changes x and y by the same fp32-rounded amount, so what remains is rounding at the
// coordinates' magnitude (1e-7 relative), not at their squares' magnitude. The scalar part
// (q.k, biases) is rotation- and translation-invariant by construction and may be fp16.
//
// Tiles: 64 query rows x 64 keys per block of 256 threads laid out 16 x 16; thread (ty, tx) owns
// rows ty + 16a and keys tx + 16b (a, b < 4). Shared-memory tiles are stored transposed
// ([column][row]) with a padded stride of 65 so that both the coalesced global loads (consecutive
// columns of one row) and the compute loops (consecutive rows of one column) are free of bank conflicts.

#include "FusedAttentionProblem.h"
#include <cuda_fp16.h>
#include <math_constants.h>

namespace FlashIPAPlugin {
namespace kernels {

constexpr int TileRows = 64;               ///< query rows per tile
constexpr int TileKeys = 64;               ///< keys per tile
constexpr int TileStride = 65;             ///< padded stride of transposed tiles
constexpr int TileThreads = 256;           ///< 16 x 16
constexpr int ColumnChunk = 32;            ///< lifted columns staged in shared memory at a time
constexpr int PerThread = 4;               ///< rows (and keys) per thread
static_assert(TileRows == TileKeys, "the backward kernel's two sides share one tile size");

__device__ __forceinline__ float toFloat(float x) { return x; }
__device__ __forceinline__ float toFloat(__half x) { return __half2float(x); }

/** Reads lifted rows of one head without materialising them. */
template <typename T>
struct LiftedRows {
    const FusedAttentionProblem& p;
    int head;

    /** Column col of the lifted query row: [q | bl]. */
    __device__ __forceinline__ float query(int row, int col) const {
        const size_t base = (size_t) row * p.heads + head;
        if (col < p.headDim)
            return toFloat(static_cast<const T*>(p.q)[base * p.headDim + col]);
        return toFloat(static_cast<const T*>(p.biasLeft)[base * p.biasRank + col - p.headDim]);
    }
    /**
     * Column col of the lifted key row: [scalarScale k | biasScale br], rounded to T after scaling,
     * as the tensor-core kernel stages it, so that every kernel sees the same logits.
     */
    __device__ __forceinline__ float key(int row, int col) const {
        const size_t base = (size_t) row * p.heads + head;
        const float scaled = col < p.headDim
                                 ? p.scalarScale * toFloat(static_cast<const T*>(p.k)[base * p.headDim + col])
                                 : p.biasScale * toFloat(static_cast<const T*>(p.biasRight)[base * p.biasRank + col - p.headDim]);
        return toFloat(T(scaled));
    }
    /** Column col of the lifted value row: [v | value points | pair values]. */
    __device__ __forceinline__ float value(int row, int col) const {
        const size_t base = (size_t) row * p.heads + head;
        if (col < p.headDim)
            return toFloat(static_cast<const T*>(p.v)[base * p.headDim + col]);
        col -= p.headDim;
        if (col < 3 * p.valuePoints)
            return p.valuePointsGlobal[base * 3 * p.valuePoints + col];
        col -= 3 * p.valuePoints;
        const int width = p.pairRank * p.pairValueDim;
        return toFloat(static_cast<const T*>(p.pairValues)[(size_t) row * width + col]);
    }
};

/**
 * for e in [0, count): store(e, load(e)), spread over `threads` threads with 8 loads in flight per
 * thread: the staging loops are latency-bound, and a plain loop waits for each load in turn.
 */
template <int Threads, typename Load, typename Store>
__device__ __forceinline__ void stageBatched(int count, const Load& load, const Store& store) {
    constexpr int Batch = 8;
    for (int base = threadIdx.x; base < count; base += Batch * Threads) {
        float value[Batch];
#pragma unroll
        for (int u = 0; u < Batch; u++) {
            const int e = base + u * Threads;
            value[u] = e < count ? load(e) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < Batch; u++) {
            const int e = base + u * Threads;
            if (e < count)
                store(e, value[u]);
        }
    }
}

/**
 * Stages columns [col0, col0 + ColumnChunk) of `count` rows starting at row0 into tile[col][row]
 * (stride TileStride); rows past the end and columns past `width` read as zero.
 */
template <typename Read>
__device__ __forceinline__ void stageColumns(float* tile, int row0, int rows, int col0, int width, const Read& read) {
    stageBatched<TileThreads>(
        TileRows * ColumnChunk,
        [&](int e) {
            const int row = row0 + e / ColumnChunk, col = col0 + e % ColumnChunk;
            return (row < rows && col < width) ? read(row, col) : 0.0f;
        },
        [&](int e, float v) { tile[(e % ColumnChunk) * TileStride + e / ColumnChunk] = v; });
}

/** Stages the fp32 points [rows, H, P * 3] of one head into tile[coordinate][row]. */
__device__ __forceinline__ void stagePoints(float* tile, const float* points, int heads, int head, int width, int row0, int rows) {
    if (width == 0)
        return;
    stageBatched<TileThreads>(
        TileRows * width,
        [&](int e) {
            const int row = row0 + e / width;
            return row < rows ? points[((size_t) row * heads + head) * width + e % width] : 0.0f;
        },
        [&](int e, float v) { tile[(e % width) * TileStride + e / width] = v; });
}

/** Segment bookkeeping of one tile of rows: segment id and key range, read from shared memory. */
struct TileRowInfo {
    int segment[TileRows];
    int keyBegin[TileRows];
    int keyEnd[TileRows];
};

__device__ __forceinline__ void stageRowInfo(TileRowInfo& info, const FusedAttentionProblem& p, int row0) {
    for (int r = threadIdx.x; r < TileRows; r += TileThreads) {
        const int row = row0 + r;
        const bool real = row < p.rows && p.segment[row] >= 0;
        info.segment[r] = real ? p.segment[row] : -1;
        info.keyBegin[r] = real ? p.keyBegin[row] : 0;
        info.keyEnd[r] = real ? p.keyEnd[row] : 0;
    }
}

/** The range of tiles [first, last) that the real rows of a staged tile interact with. */
__device__ __forceinline__ void tileRange(const TileRowInfo& info, int& first, int& last) {
    int lo = INT_MAX, hi = 0;
    for (int r = 0; r < TileRows; r++)
        if (info.segment[r] >= 0) {
            lo = min(lo, info.keyBegin[r]);
            hi = max(hi, info.keyEnd[r]);
        }
    first = lo == INT_MAX ? 0 : lo / TileKeys;
    last = lo == INT_MAX ? 0 : (hi + TileKeys - 1) / TileKeys;
}

/**
 * The logits of one (query tile, key tile) pair for this thread's 4 x 4 elements, together with the
 * squared point distances sum_p |x_ip - y_jp|^2 (needed by the point-weight gradient). Invalid
 * pairs get -inf. Uses the column staging buffers queryCols/keyCols; the point tiles must already
 * be staged (the function synchronises before reading them). The result is in registers; callers
 * synchronise before restaging any buffer.
 */
template <typename T>
__device__ __forceinline__ void logitTile(const LiftedRows<T>& lifted, int queryRow0, int keyRow0, float* queryCols, float* keyCols,
                                          const float* queryPts, const float* keyPts, const TileRowInfo& queryInfo,
                                          const TileRowInfo& keyInfo, float pointWeight, float logit[PerThread][PerThread],
                                          float distance2[PerThread][PerThread]) {
    const FusedAttentionProblem& p = lifted.p;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int width = p.liftedKeyDim();
    float dot[PerThread][PerThread] = {};
    for (int col0 = 0; col0 < width; col0 += ColumnChunk) {
        __syncthreads();
        stageColumns(queryCols, queryRow0, p.rows, col0, width, [&](int row, int col) { return lifted.query(row, col); });
        stageColumns(keyCols, keyRow0, p.rows, col0, width, [&](int row, int col) { return lifted.key(row, col); });
        __syncthreads();
        const int columns = min(ColumnChunk, width - col0);
        for (int d = 0; d < columns; d++) {
            float qa[PerThread], kb[PerThread];
            for (int a = 0; a < PerThread; a++)
                qa[a] = queryCols[d * TileStride + ty + 16 * a];
            for (int b = 0; b < PerThread; b++)
                kb[b] = keyCols[d * TileStride + tx + 16 * b];
            for (int a = 0; a < PerThread; a++)
                for (int b = 0; b < PerThread; b++)
                    dot[a][b] = fmaf(qa[a], kb[b], dot[a][b]);
        }
    }
    __syncthreads(); // the point tiles and row info staged by the caller are visible even when width == 0
    for (int a = 0; a < PerThread; a++)
        for (int b = 0; b < PerThread; b++)
            distance2[a][b] = 0.0f;
    const int coordinates = 3 * p.queryPoints;
    for (int d = 0; d < coordinates; d++) {
        float xa[PerThread], yb[PerThread];
        for (int a = 0; a < PerThread; a++)
            xa[a] = queryPts[d * TileStride + ty + 16 * a];
        for (int b = 0; b < PerThread; b++)
            yb[b] = keyPts[d * TileStride + tx + 16 * b];
        for (int a = 0; a < PerThread; a++)
            for (int b = 0; b < PerThread; b++) {
                const float diff = xa[a] - yb[b];
                distance2[a][b] = fmaf(diff, diff, distance2[a][b]);
            }
    }
    for (int a = 0; a < PerThread; a++) {
        const int r = ty + 16 * a;
        for (int b = 0; b < PerThread; b++) {
            const int j = tx + 16 * b, key = keyRow0 + j;
            const bool valid = queryInfo.segment[r] >= 0 && key >= queryInfo.keyBegin[r] && key < queryInfo.keyEnd[r] &&
                               keyInfo.segment[j] == queryInfo.segment[r];
            logit[a][b] = valid ? dot[a][b] - 0.5f * pointWeight * distance2[a][b] : -CUDART_INF_F;
        }
    }
}

/** Max over the 16 threads sharing a row (consecutive lanes of one half-warp). */
__device__ __forceinline__ float rowMax(float x) {
    for (int offset = 8; offset > 0; offset >>= 1)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset, 16));
    return x;
}

/** Sum over the 16 threads sharing a row. */
__device__ __forceinline__ float rowSum(float x) {
    for (int offset = 8; offset > 0; offset >>= 1)
        x += __shfl_xor_sync(0xffffffffu, x, offset, 16);
    return x;
}

} // namespace kernels
} // namespace FlashIPAPlugin

#endif
