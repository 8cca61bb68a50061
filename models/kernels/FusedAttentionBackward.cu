// Backward pass of the fused FlashIPA attention, in two launches of one kernel; each block owns what
// it writes (no atomics except the per-head point weight):
//  - per query tile: d[q | bl], d(query points) and the point-weight gradient;
//  - per key tile:   d[k | br], d(key points) and d(lifted values).
// Both recompute the logits of each tile pair and the probabilities from the forward's log-sum-exp,
// then dP_ij = dOut_i . V_j and dS_ij = P_ij (dP_ij - delta_i), delta_i = dOut_i . out_i
// (the softmax backward). Point gradients use the same fp32 differences as the forward:
//   d logit_ij / d x_i = -w (x_i - y_j),   d logit_ij / d y_j = w (x_i - y_j),
//   d logit_ij / d w   = -|x_i - y_j|^2 / 2.
#include "FusedAttentionLaunch.cuh"

namespace FlashIPAPlugin {
namespace kernels {

namespace {

/** Shared memory of both backward kernels (in floats): column staging, points and two tiles. */
size_t backwardSharedFloats(const FusedAttentionProblem& p) {
    return 2 * ColumnChunk * TileStride + 2 * 3 * p.queryPoints * TileStride + 2 * TileRows * TileStride;
}

/**
 * The backward's accumulations, register-blocked (the SIMT backward is bound by shared-memory
 * bandwidth, so each load must feed several FMAs): for this thread's owned rows o = ty + 16a
 * (a < 4) and columns d = tx + 16b (b < 2) of a pass of 32,
 *   sum[a][b] = sum_{x < 64} weight(o, x) * (mine(o, d) - value(d, x)),
 * with mine = 0 for plain products. Differences are formed before multiplying, so point gradients
 * keep the exact fp32 differences of the forward.
 */
template <bool Difference, typename Weight, typename Value, typename Mine>
__device__ __forceinline__ void blockedSums(int columns, const Weight& weight, const Value& value, const Mine& mine,
                                            float (&sum)[PerThread][2]) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float own[PerThread][2];
    for (int a = 0; a < PerThread; a++)
        for (int b = 0; b < 2; b++) {
            sum[a][b] = 0.0f;
            own[a][b] = Difference && tx + 16 * b < columns ? mine(ty + 16 * a, tx + 16 * b) : 0.0f;
        }
    for (int x = 0; x < TileKeys; x++) {
        float w[PerThread], v[2];
        for (int a = 0; a < PerThread; a++)
            w[a] = weight(ty + 16 * a, x);
        for (int b = 0; b < 2; b++)
            v[b] = tx + 16 * b < columns ? value(tx + 16 * b, x) : 0.0f;
        for (int a = 0; a < PerThread; a++)
            for (int b = 0; b < 2; b++)
                sum[a][b] = fmaf(w[a], Difference ? own[a][b] - v[b] : v[b], sum[a][b]);
    }
}

/** Calls emit(o, d, sum) for the owned elements of blockedSums that exist (o < rows left, d < columns). */
template <typename Emit>
__device__ __forceinline__ void emitBlocked(int ownRows, int columns, const float (&sum)[PerThread][2], const Emit& emit) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int a = 0; a < PerThread; a++)
        for (int b = 0; b < 2; b++)
            if (ty + 16 * a < ownRows && tx + 16 * b < columns)
                emit(ty + 16 * a, tx + 16 * b, sum[a][b]);
}

/**
 * For one (query tile, key tile) pair: probabilities and dS for this thread's elements, with dS
 * stored in dS[row][key] and P in probs[row][key]. When valueGrad is set, also accumulates
 * d(lifted values) of the key tile (which needs P and the staged dOut chunks anyway).
 */
template <typename T>
__device__ void softmaxGradientTile(const LiftedRows<T>& lifted, int row0, int key0, const float* logSumExp, const float* gradOut,
                                    const float* delta, float* queryCols, float* keyCols, const float* queryPts, const float* keyPts,
                                    const TileRowInfo& queryInfo, const TileRowInfo& keyInfo, float pointWeight, float* probs,
                                    float* dS, float* valueGrad, float& pointWeightGrad) {
    const FusedAttentionProblem& p = lifted.p;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int valueWidth = p.liftedValueDim();
    float logit[PerThread][PerThread], distance2[PerThread][PerThread], prob[PerThread][PerThread];
    logitTile(lifted, row0, key0, queryCols, keyCols, queryPts, keyPts, queryInfo, keyInfo, pointWeight, logit, distance2);
    for (int a = 0; a < PerThread; a++) {
        const int row = row0 + ty + 16 * a;
        const float lse = row < p.rows ? logSumExp[(size_t) row * p.heads + lifted.head] : 0.0f;
        for (int b = 0; b < PerThread; b++) {
            prob[a][b] = logit[a][b] == -CUDART_INF_F ? 0.0f : expf(logit[a][b] - lse);
            probs[(ty + 16 * a) * TileStride + tx + 16 * b] = prob[a][b];
        }
    }
    float dP[PerThread][PerThread] = {};
    for (int col0 = 0; col0 < valueWidth; col0 += ColumnChunk) {
        __syncthreads();
        stageColumns(queryCols, row0, p.rows, col0, valueWidth,
                     [&](int row, int col) { return gradOut[((size_t) row * p.heads + lifted.head) * valueWidth + col]; });
        stageColumns(keyCols, key0, p.rows, col0, valueWidth, [&](int row, int col) { return lifted.value(row, col); });
        __syncthreads();
        const int columns = min(ColumnChunk, valueWidth - col0);
        for (int d = 0; d < columns; d++) {
            float ga[PerThread], vb[PerThread];
            for (int a = 0; a < PerThread; a++)
                ga[a] = queryCols[d * TileStride + ty + 16 * a];
            for (int b = 0; b < PerThread; b++)
                vb[b] = keyCols[d * TileStride + tx + 16 * b];
            for (int a = 0; a < PerThread; a++)
                for (int b = 0; b < PerThread; b++)
                    dP[a][b] = fmaf(ga[a], vb[b], dP[a][b]);
        }
        if (valueGrad) {
            // dV_j[col] += sum_i P_ij dOut_i[col]; this block owns the key tile.
            float sum[PerThread][2];
            blockedSums<false>(
                columns, [&](int j, int i) { return probs[i * TileStride + j]; }, [&](int d, int i) { return queryCols[d * TileStride + i]; },
                [](int, int) { return 0.0f; }, sum);
            emitBlocked(p.rows - key0, columns, sum, [&](int j, int d, float v) {
                valueGrad[((size_t) (key0 + j) * p.heads + lifted.head) * valueWidth + col0 + d] += v;
            });
        }
    }
    for (int a = 0; a < PerThread; a++) {
        const int row = row0 + ty + 16 * a;
        const float rowDelta = row < p.rows ? delta[(size_t) row * p.heads + lifted.head] : 0.0f;
        for (int b = 0; b < PerThread; b++) {
            const float grad = prob[a][b] * (dP[a][b] - rowDelta);
            dS[(ty + 16 * a) * TileStride + tx + 16 * b] = grad;
            if (prob[a][b] != 0.0f)
                pointWeightGrad = fmaf(-0.5f * grad, distance2[a][b], pointWeightGrad);
        }
    }
    __syncthreads();
}

/** Sums v over the block and adds it to *target (one atomic per block). */
__device__ void blockAtomicAdd(float v, float* target) {
    __shared__ float partial[TileThreads / 32];
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x % 32 == 0)
        partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int w = 0; w < TileThreads / 32; w++)
            sum += partial[w];
        atomicAdd(target, sum);
    }
}

/** Which side of the attention a backward block owns: its tile of query rows or its tile of keys. */
enum class Side { Query, Key };

/**
 * One backward block: owns a tile of 64 rows on one side, streams the tiles of the other side, and
 * accumulates the gradients of what it owns. Query side: d[q | bl], d(query points), the point
 * weight. Key side: d[scalarScale k | biasScale br], d(key points), d(lifted values).
 */
template <typename T, Side side>
__global__ void __launch_bounds__(TileThreads) fusedAttentionBackward(FusedAttentionProblem p, const float* logSumExp, const float* gradOut,
                                                                      const float* delta, FusedAttentionGradients g) {
    constexpr bool querySide = side == Side::Query;
    extern __shared__ float shared[];
    __shared__ TileRowInfo queryInfo, keyInfo;
    const int own0 = blockIdx.x * TileRows, head = blockIdx.y;
    const int coordinates = 3 * p.queryPoints, keyWidth = p.liftedKeyDim();
    float* queryCols = shared;
    float* keyCols = queryCols + ColumnChunk * TileStride;
    float* queryPts = keyCols + ColumnChunk * TileStride;
    float* keyPts = queryPts + coordinates * TileStride;
    float* probs = keyPts + coordinates * TileStride;
    float* dS = probs + TileRows * TileStride;
    TileRowInfo& ownInfo = querySide ? queryInfo : keyInfo;
    TileRowInfo& otherInfo = querySide ? keyInfo : queryInfo;
    float* ownPts = querySide ? queryPts : keyPts;
    float* otherPts = querySide ? keyPts : queryPts;
    float* otherCols = querySide ? keyCols : queryCols;
    const float* ownPointsGlobal = querySide ? p.queryPointsGlobal : p.keyPointsGlobal;
    const float* otherPointsGlobal = querySide ? p.keyPointsGlobal : p.queryPointsGlobal;
    float* ownLiftedGrad = querySide ? g.liftedQuery : g.liftedKey;
    float* ownPointsGrad = querySide ? g.queryPoints : g.keyPoints;
    const LiftedRows<T> lifted{p, head};
    stageRowInfo(ownInfo, p, own0);
    stagePoints(ownPts, ownPointsGlobal, p.heads, head, coordinates, own0, p.rows);
    __syncthreads();
    // Segments are contiguous, so the rows that see a key are the rows of its segment's range (and
    // conversely): one tile range serves both sides.
    int firstTile, lastTile;
    tileRange(ownInfo, firstTile, lastTile);
    const float pointWeight = p.pointWeight[head];
    float pointWeightGrad = 0.0f;
    // dS of (own o, other x), whichever side owns the block.
    auto gradient = [&](int o, int x) { return querySide ? dS[o * TileStride + x] : dS[x * TileStride + o]; };
    for (int tile = firstTile; tile < lastTile; tile++) {
        const int other0 = tile * TileKeys;
        __syncthreads();
        stageRowInfo(otherInfo, p, other0);
        stagePoints(otherPts, otherPointsGlobal, p.heads, head, coordinates, other0, p.rows);
        softmaxGradientTile(lifted, querySide ? own0 : other0, querySide ? other0 : own0, logSumExp, gradOut, delta, queryCols, keyCols,
                            queryPts, keyPts, queryInfo, keyInfo, pointWeight, probs, dS, querySide ? nullptr : g.liftedValue,
                            pointWeightGrad);
        // d(own lifted row)_o += sum_x dS(o, x) (other lifted row)_x
        for (int col0 = 0; col0 < keyWidth; col0 += ColumnChunk) {
            stageColumns(otherCols, other0, p.rows, col0, keyWidth,
                         [&](int row, int col) { return querySide ? lifted.key(row, col) : lifted.query(row, col); });
            __syncthreads();
            const int columns = min(ColumnChunk, keyWidth - col0);
            float sum[PerThread][2];
            blockedSums<false>(
                columns, gradient, [&](int d, int x) { return otherCols[d * TileStride + x]; }, [](int, int) { return 0.0f; }, sum);
            emitBlocked(p.rows - own0, columns, sum, [&](int o, int d, float v) {
                ownLiftedGrad[((size_t) (own0 + o) * p.heads + head) * keyWidth + col0 + d] += v;
            });
            __syncthreads();
        }
        // Both sides: d(own point)_o -= w sum_x dS(o, x) (own point_o - other point_x)
        for (int d0 = 0; d0 < coordinates; d0 += 32) {
            const int columns = min(32, coordinates - d0);
            float sum[PerThread][2];
            blockedSums<true>(
                columns, gradient, [&](int d, int x) { return otherPts[(d0 + d) * TileStride + x]; },
                [&](int o, int d) { return ownPts[(d0 + d) * TileStride + o]; }, sum);
            emitBlocked(p.rows - own0, columns, sum, [&](int o, int d, float v) {
                ownPointsGrad[((size_t) (own0 + o) * p.heads + head) * coordinates + d0 + d] -= pointWeight * v;
            });
        }
    }
    if (querySide)
        blockAtomicAdd(pointWeightGrad, g.pointWeight + head);
}

template <typename T>
void launchBackward(const FusedAttentionProblem& p, const float* logSumExp, const float* gradOut, const float* delta,
                    const FusedAttentionGradients& g, cudaStream_t stream) {
    const size_t bytes = backwardSharedFloats(p) * sizeof(float);
    auto queryKernel = fusedAttentionBackward<T, Side::Query>;
    auto keyKernel = fusedAttentionBackward<T, Side::Key>;
    allowSharedMemory(queryKernel, bytes, "backward: shared memory");
    allowSharedMemory(keyKernel, bytes, "backward: shared memory");
    const dim3 grid((p.rows + TileRows - 1) / TileRows, p.heads);
    queryKernel<<<grid, TileThreads, bytes, stream>>>(p, logSumExp, gradOut, delta, g);
    checkLaunch(cudaGetLastError(), "backward, query side");
    keyKernel<<<grid, TileThreads, bytes, stream>>>(p, logSumExp, gradOut, delta, g);
    checkLaunch(cudaGetLastError(), "backward, key side");
}

} // namespace

void launchFusedAttentionBackward(const FusedAttentionProblem& p, const float* logSumExp, const float* gradOut, const float* delta,
                                  const FusedAttentionGradients& g, cudaStream_t stream) {
    validateProblem(p);
    if (p.rows == 0)
        return;
    if (p.element == ElementType::Float16)
        launchBackward<__half>(p, logSumExp, gradOut, delta, g, stream);
    else
        launchBackward<float>(p, logSumExp, gradOut, delta, g, stream);
}

} // namespace kernels
} // namespace FlashIPAPlugin
