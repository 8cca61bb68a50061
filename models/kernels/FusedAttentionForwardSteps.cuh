#ifndef FLASHIPA_FUSED_ATTENTION_FORWARD_STEPS_CUH_
#define FLASHIPA_FUSED_ATTENTION_FORWARD_STEPS_CUH_

// The steps of the tensor-core forward that do not depend on how the products are issued, shared by
// the mma.sync kernel (FusedAttentionForwardTensorCore.cu, sm_80+) and the wgmma kernel
// (FusedAttentionForwardWgmma.cu, sm_90a): the query tile's rows and key range, the exact point
// terms added to the logits, the mask, the online softmax, and the output epilogue.
//
// Layout: a block owns TensorCoreQueryTile = 128 query rows, 16 per warp; each thread holds rows g and
// g + 8 of its warp's 16 (lane = 4 g + t) and, per 8-column n-tile, columns 2 t and 2 t + 1: the m16n8
// accumulator layout, which is also the per-warp layout of a 64-row wgmma accumulator.
#include "FusedAttentionMma.cuh"

namespace FlashIPAPlugin {
namespace kernels {

/** The query tile's rows in shared memory: segment (-1: padding) and key range, and their extremes. */
struct QueryRows {
    int segment[TensorCoreQueryTile], begin[TensorCoreQueryTile], end[TensorCoreQueryTile];
    int range[7]; // min begin, max end, max begin, min end, min segment, max segment, real rows
};

/** Static shared memory of a tensor-core forward block of `warps` warps (QueryRows and the key-term scratch). */
constexpr size_t forwardStaticSharedBytes(int warps) {
    return sizeof(QueryRows) + sizeof(float) * warps * TensorCoreKeyTile;
}

/**
 * The value chunk (columns per block) of a tensor-core forward, or 0 where the value points and the extras
 * that normalise them do not fit in its first chunk (then the SIMT forward runs). Both forwards' checks.
 */
inline int forwardValueChunk(const FusedAttentionProblem& p) {
    const int chunk = tensorCoreValueChunk(tensorCoreForwardValueWidth(p));
    return TensorCoreValueExtras + 3 * p.valuePoints <= chunk ? chunk : 0;
}

/** Which key tiles a query tile visits, and whether its rows share one segment and key range. */
struct KeySpan {
    int firstTile, lastTile;
    bool uniform; // all rows real, of one segment and one key range
    int begin, end, segment;

    /** True when the whole key tile [key0, key0 + tile) lies in every row's range and segment: no mask. */
    __device__ __forceinline__ bool covers(int key0, int tileKeys, int tileSegment) const {
        return uniform && key0 >= begin && key0 + tileKeys <= end && tileSegment == segment;
    }
};

/** x as the compiler sees a warp-uniform value (lane 0's), so that what derives from it lives in uniform registers. */
__device__ __forceinline__ int warpUniform(int x) {
    return __shfl_sync(0xffffffffu, x, 0);
}

/** Fills `rows` for query rows row0 .. row0 + 127 (every thread calls it; it synchronises the block). */
template <int Threads>
__device__ KeySpan describeQueryRows(const FusedAttentionProblem& p, int row0, int tileKeys, QueryRows& rows) {
    if (threadIdx.x == 0) {
        rows.range[0] = rows.range[3] = rows.range[4] = INT_MAX;
        rows.range[1] = rows.range[2] = rows.range[5] = INT_MIN;
        rows.range[6] = 0;
    }
    __syncthreads();
    for (int r = threadIdx.x; r < TensorCoreQueryTile; r += Threads) {
        const int row = row0 + r;
        const bool real = row < p.rows && p.segment[row] >= 0;
        rows.segment[r] = real ? p.segment[row] : -1;
        rows.begin[r] = real ? p.keyBegin[row] : 0;
        rows.end[r] = real ? p.keyEnd[row] : 0;
        if (real) {
            atomicMin(&rows.range[0], rows.begin[r]);
            atomicMax(&rows.range[1], rows.end[r]);
            atomicMax(&rows.range[2], rows.begin[r]);
            atomicMin(&rows.range[3], rows.end[r]);
            atomicMin(&rows.range[4], rows.segment[r]);
            atomicMax(&rows.range[5], rows.segment[r]);
            atomicAdd(&rows.range[6], 1);
        }
    }
    __syncthreads();
    const int* range = rows.range;
    KeySpan span;
    span.firstTile = warpUniform(range[0] == INT_MAX ? 0 : range[0] / tileKeys);
    span.lastTile = warpUniform(range[0] == INT_MAX ? 0 : (range[1] + tileKeys - 1) / tileKeys);
    span.uniform = range[6] == TensorCoreQueryTile && range[4] == range[5] && range[0] == range[2] && range[1] == range[3];
    span.begin = range[0];
    span.end = range[1];
    span.segment = range[4];
    return span;
}

/**
 * The global values a key tile needs besides its staged rows: its centre and its keys' common segment.
 * The kernels load them one tile ahead, so that no load latency sits between a tile's barrier and its
 * products (profiled: it did, once the logit loop became short).
 */
struct KeyTileFacts {
    float centre[3];
    int segment;

    __device__ __forceinline__ void load(const TensorCorePack& pack, int tile, int heads, int head) {
        const float* c = pack.keyCentres + ((size_t) tile * heads + head) * 3;
        centre[0] = c[0];
        centre[1] = c[1];
        centre[2] = c[2];
        segment = pack.tileSegments[tile];
    }
};

/**
 * One warp's online softmax over its two rows per thread (FlashAttention-2), in log2 units, with the
 * exact point terms of docs/MATH.md §5 added to the tensor cores' logits: query points a relative to the
 * query tile's centre, key points b relative to the key tile's centre, d the centres' difference,
 *     sum_p |x_p - y_p|^2 = sum|a|^2 + sum|b|^2 + P d.d - 2 sum a.b + 2 d.sum a - 2 d.sum b,
 * where the products hold the cross term -2 w sum a.b (scaled into the key operand) and this adds the rest.
 */
struct RowSoftmax {
    float rowStats[2][4]; // sum|a|^2, sum a (x, y, z) of this thread's rows
    float runningMax[2], runningSum[2];
    int localRow[2];      // rows within the query tile

    __device__ RowSoftmax(const TensorCorePack& pack, int heads, int head, int row0, int warp, int g) {
        localRow[0] = warp * 16 + g;
        localRow[1] = warp * 16 + g + 8;
        for (int h = 0; h < 2; h++) {
            runningMax[h] = -CUDART_INF_F;
            runningSum[h] = 0.0f;
        }
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                rowStats[h][k] = pack.queryStats[((size_t) (row0 + localRow[h]) * heads + head) * 4 + k];
    }

    /**
     * Turns this warp's logits tile s (16 rows x 64 keys, from the products) into unnormalised
     * probabilities and returns each row's rescaling factor for the accumulators.
     * keyStats: the tile's 64 keys' (sum|b|^2, sum b) in shared memory; keySegment likewise;
     * warpScratch: 64 floats of shared memory owned by this warp.
     *
     * Instruction count is what bounds the tensor-core kernels here (benchmarks/results/
     * fused_kernel_ncu_h100.md), hence: each key's point term computed once per warp (two per lane,
     * through warpScratch) rather than by each of the 8 lanes that use it; maxima and sums in four
     * independent chains; and the running maximum moved only when a row's logits exceed it by more
     * than 2^8 (FlashAttention-3's lazy rescaling: probabilities up to 256 are harmless in fp32 and
     * fp16), so that the accumulators are rescaled in the first tiles only.
     */
    __device__ __forceinline__ void update(float (&s)[8][4], float (&scales)[2], const float4* keyStats, const int* keySegment,
                                           float* warpScratch, const QueryRows& rows, int key0, bool wholeTile, const float (&d)[3],
                                           float pointWeight, float pointCount, int t) {
        constexpr float MaxGrowth = 8.0f; // log2 units
        const float dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
        const int lane = threadIdx.x % 32;
        // Each key's terms -(w/2)(sum|b|^2 - 2 d.sum b) in log2 units, two keys per lane.
#pragma unroll
        for (int k = lane; k < 64; k += 32) {
            const float4 stats = keyStats[k];
            warpScratch[k] = -0.5f * Log2E * pointWeight * (stats.x - 2.0f * (d[0] * stats.y + d[1] * stats.z + d[2] * stats.w));
        }
        __syncwarp();
        float keyTerms[8][2];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            const float2 pair = *reinterpret_cast<const float2*>(warpScratch + nt * 8 + 2 * t);
            keyTerms[nt][0] = pair.x;
            keyTerms[nt][1] = pair.y;
        }
        __syncwarp(); // every lane has read the scratch before the next tile overwrites it
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = localRow[h];
            const float rowTerm = -0.5f * Log2E * pointWeight *
                                  (rowStats[h][0] + pointCount * dd + 2.0f * (d[0] * rowStats[h][1] + d[1] * rowStats[h][2] + d[2] * rowStats[h][3]));
            float partialMax[4] = {-CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F};
            if (wholeTile) {
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float& x = s[nt][2 * h + e];
                        x = fmaf(x, Log2E, rowTerm + keyTerms[nt][e]);
                        partialMax[nt % 4] = fmaxf(partialMax[nt % 4], x);
                    }
            } else {
                const int segment = rows.segment[r], begin = rows.begin[r], end = rows.end[r];
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = nt * 8 + 2 * t + e, key = key0 + j;
                        const bool valid = segment >= 0 && key >= begin && key < end && keySegment[j] == segment;
                        float& x = s[nt][2 * h + e];
                        x = valid ? fmaf(x, Log2E, rowTerm + keyTerms[nt][e]) : -CUDART_INF_F;
                        partialMax[nt % 4] = fmaxf(partialMax[nt % 4], x);
                    }
            }
            float tileMax = fmaxf(fmaxf(partialMax[0], partialMax[1]), fmaxf(partialMax[2], partialMax[3]));
            tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, 1));
            tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, 2));
            // Move the shift only when the logits outgrow it by more than MaxGrowth (always for the first
            // valid logits: the running maximum starts at -inf). A row with nothing valid yet keeps
            // -inf and shift 0: its probabilities are exp2(-inf) = 0.
            float scale = 1.0f;
            if (tileMax > runningMax[h] + MaxGrowth) {
                scale = exp2f(runningMax[h] - tileMax);
                runningMax[h] = tileMax;
            }
            const float shift = runningMax[h] == -CUDART_INF_F ? 0.0f : runningMax[h];
            float partialSum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& x = s[nt][2 * h + e];
                    x = exp2Flushed(x - shift);
                    partialSum[nt % 4] += x;
                }
            float sum = (partialSum[0] + partialSum[1]) + (partialSum[2] + partialSum[3]);
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            runningSum[h] = runningSum[h] * scale + sum;
            scales[h] = scale;
        }
    }
};

/** Rescales the accumulators where a row's maximum moved (rare after the first tiles: skipped warp-wide). */
template <int ValueTiles>
__device__ __forceinline__ void rescale(float (&acc)[ValueTiles][4], const float (&scales)[2]) {
    if (__any_sync(0xffffffffu, scales[0] != 1.0f || scales[1] != 1.0f)) {
#pragma unroll
        for (int nv = 0; nv < ValueTiles; nv++) {
            acc[nv][0] *= scales[0];
            acc[nv][1] *= scales[0];
            acc[nv][2] *= scales[1];
            acc[nv][3] *= scales[1];
        }
    }
}

/** The probabilities of k-step kk (keys 16 kk .. 16 kk + 15) as the fp16 A fragment of the P.V product. */
__device__ __forceinline__ void probabilityFragment(uint32_t (&a)[4], const float (&s)[8][4], int kk) {
    a[0] = packHalf2(s[2 * kk][0], s[2 * kk][1]);
    a[1] = packHalf2(s[2 * kk][2], s[2 * kk][3]);
    a[2] = packHalf2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = packHalf2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

/**
 * Writes this thread's output columns and, from the first chunk, the log-sum-exp. Packed order
 * [extras | value points - c | v | pair values] (TensorCorePack) goes back to the output's
 * [v | value points | pair values]. Scalar and pair columns are normalised by the fp32 sum of the
 * probabilities; value points by the sum of the fp16 probabilities the products used (the extras'
 * ones column), with the centre's share added, so that they move exactly with the structure.
 */
template <int ValueTiles>
__device__ __forceinline__ void writeOutput(const FusedAttentionProblem& p, const RowSoftmax& softmax, const float (&acc)[ValueTiles][4],
                                            int row0, int head, int chunk0, float* out, float* logSumExp, int t) {
    static_assert(TensorCoreValueExtras == 8, "the extras are the first n-tile: lanes 4 g .. 4 g + 3 hold them");
    const int valueWidth = p.liftedValueDim(), chunkColumns = min(8 * ValueTiles, tensorCoreForwardValueWidth(p) - chunk0);
    const int pointColumns = 3 * p.valuePoints;
    // The first chunk's first n-tile: [sum p | c_hi x y z | c_lo x y z | 0] per row, spread over the 4 lanes of the row.
    float pointSum[2] = {0.0f, 0.0f}, centre[2][3] = {};
    if (chunk0 == 0) {
        const int quad = (threadIdx.x % 32) & ~3;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float extra[8];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                extra[2 * k] = __shfl_sync(0xffffffffu, acc[0][2 * h], quad + k);
                extra[2 * k + 1] = __shfl_sync(0xffffffffu, acc[0][2 * h + 1], quad + k);
            }
            pointSum[h] = extra[0];
            for (int x = 0; x < 3; x++)
                centre[h][x] = extra[1 + x] + extra[4 + x];
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = row0 + softmax.localRow[h];
        if (row >= p.rows)
            continue;
        const float inverse = softmax.runningSum[h] > 0.0f ? 1.0f / softmax.runningSum[h] : 0.0f;
        const float pointInverse = pointSum[h] > 0.0f ? 1.0f / pointSum[h] : 0.0f;
        float* outRow = out + ((size_t) row * p.heads + head) * valueWidth;
#pragma unroll
        for (int nv = 0; nv < ValueTiles; nv++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = nv * 8 + 2 * t + e, packed = chunk0 + col - TensorCoreValueExtras;
                if (col >= chunkColumns || packed < 0)
                    continue;
                const float x = acc[nv][2 * h + e];
                if (packed < pointColumns) {
                    const int axis = packed % 3;
                    const float c = axis == 0 ? centre[h][0] : (axis == 1 ? centre[h][1] : centre[h][2]);
                    outRow[p.headDim + packed] = (x + c) * pointInverse;
                } else {
                    outRow[packed < pointColumns + p.headDim ? packed - pointColumns : packed] = x * inverse;
                }
            }
        if (chunk0 == 0 && t == 0)
            logSumExp[(size_t) row * p.heads + head] =
                softmax.runningSum[h] > 0.0f ? softmax.runningMax[h] / Log2E + logf(softmax.runningSum[h]) : 0.0f;
    }
}

} // namespace kernels
} // namespace FlashIPAPlugin

#endif
