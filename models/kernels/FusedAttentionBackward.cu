// Backward pass of the fused FlashIPA attention, in two kernels that each own what they write (no
// atomics except the per-head point weight):
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
            for (int e = threadIdx.x; e < TileKeys * ColumnChunk; e += TileThreads) {
                const int j = e / ColumnChunk, d = e % ColumnChunk, key = key0 + j;
                if (key >= p.rows || d >= columns)
                    continue;
                float sum = 0.0f;
                for (int i = 0; i < TileRows; i++)
                    sum = fmaf(probs[i * TileStride + j], queryCols[d * TileStride + i], sum);
                valueGrad[((size_t) key * p.heads + lifted.head) * valueWidth + col0 + d] += sum;
            }
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

template <typename T>
__global__ void __launch_bounds__(TileThreads) fusedAttentionBackwardQuery(FusedAttentionProblem p, const float* logSumExp,
                                                                           const float* gradOut, const float* delta,
                                                                           FusedAttentionGradients g) {
    extern __shared__ float shared[];
    __shared__ TileRowInfo queryInfo, keyInfo;
    const int row0 = blockIdx.x * TileRows, head = blockIdx.y;
    const int coordinates = 3 * p.queryPoints, keyWidth = p.liftedKeyDim();
    float* queryCols = shared;
    float* keyCols = queryCols + ColumnChunk * TileStride;
    float* queryPts = keyCols + ColumnChunk * TileStride;
    float* keyPts = queryPts + coordinates * TileStride;
    float* probs = keyPts + coordinates * TileStride;
    float* dS = probs + TileRows * TileStride;
    const LiftedRows<T> lifted{p, head};
    stageRowInfo(queryInfo, p, row0);
    stagePoints(queryPts, p.queryPointsGlobal, p.heads, head, coordinates, row0, p.rows);
    __syncthreads();
    int firstTile, lastTile;
    tileRange(queryInfo, firstTile, lastTile);
    const float pointWeight = p.pointWeight[head];
    float pointWeightGrad = 0.0f;
    for (int tile = firstTile; tile < lastTile; tile++) {
        const int key0 = tile * TileKeys;
        __syncthreads();
        stageRowInfo(keyInfo, p, key0);
        stagePoints(keyPts, p.keyPointsGlobal, p.heads, head, coordinates, key0, p.rows);
        softmaxGradientTile(lifted, row0, key0, logSumExp, gradOut, delta, queryCols, keyCols, queryPts, keyPts, queryInfo, keyInfo,
                            pointWeight, probs, dS, nullptr, pointWeightGrad);
        // d[q | bl]_i += sum_j dS_ij [scalarScale k | biasScale br]_j
        for (int col0 = 0; col0 < keyWidth; col0 += ColumnChunk) {
            stageColumns(keyCols, key0, p.rows, col0, keyWidth, [&](int row, int col) { return lifted.key(row, col); });
            __syncthreads();
            for (int e = threadIdx.x; e < TileRows * ColumnChunk; e += TileThreads) {
                const int i = e / ColumnChunk, d = e % ColumnChunk, row = row0 + i;
                if (row >= p.rows || col0 + d >= keyWidth)
                    continue;
                float sum = 0.0f;
                for (int j = 0; j < TileKeys; j++)
                    sum = fmaf(dS[i * TileStride + j], keyCols[d * TileStride + j], sum);
                g.liftedQuery[((size_t) row * p.heads + head) * keyWidth + col0 + d] += sum;
            }
            __syncthreads();
        }
        // d x_i += -w sum_j dS_ij (x_i - y_j)
        for (int e = threadIdx.x; e < TileRows * coordinates; e += TileThreads) {
            const int i = e / coordinates, d = e % coordinates, row = row0 + i;
            if (row >= p.rows)
                continue;
            const float x = queryPts[d * TileStride + i];
            float sum = 0.0f;
            for (int j = 0; j < TileKeys; j++)
                sum = fmaf(dS[i * TileStride + j], x - keyPts[d * TileStride + j], sum);
            g.queryPoints[((size_t) row * p.heads + head) * coordinates + d] -= pointWeight * sum;
        }
    }
    blockAtomicAdd(pointWeightGrad, g.pointWeight + head);
}

template <typename T>
__global__ void __launch_bounds__(TileThreads) fusedAttentionBackwardKey(FusedAttentionProblem p, const float* logSumExp,
                                                                         const float* gradOut, const float* delta,
                                                                         FusedAttentionGradients g) {
    extern __shared__ float shared[];
    __shared__ TileRowInfo queryInfo, keyInfo;
    const int key0 = blockIdx.x * TileKeys, head = blockIdx.y;
    const int coordinates = 3 * p.queryPoints, keyWidth = p.liftedKeyDim();
    float* queryCols = shared;
    float* keyCols = queryCols + ColumnChunk * TileStride;
    float* queryPts = keyCols + ColumnChunk * TileStride;
    float* keyPts = queryPts + coordinates * TileStride;
    float* probs = keyPts + coordinates * TileStride;
    float* dS = probs + TileRows * TileStride;
    const LiftedRows<T> lifted{p, head};
    stageRowInfo(keyInfo, p, key0);
    stagePoints(keyPts, p.keyPointsGlobal, p.heads, head, coordinates, key0, p.rows);
    __syncthreads();
    // Segments are contiguous, so the queries that see a key are the rows of its segment's range.
    int firstTile, lastTile;
    tileRange(keyInfo, firstTile, lastTile);
    const float pointWeight = p.pointWeight[head];
    float unused = 0.0f;
    for (int tile = firstTile; tile < lastTile; tile++) {
        const int row0 = tile * TileRows;
        __syncthreads();
        stageRowInfo(queryInfo, p, row0);
        stagePoints(queryPts, p.queryPointsGlobal, p.heads, head, coordinates, row0, p.rows);
        softmaxGradientTile(lifted, row0, key0, logSumExp, gradOut, delta, queryCols, keyCols, queryPts, keyPts, queryInfo, keyInfo,
                            pointWeight, probs, dS, g.liftedValue, unused);
        // d[scalarScale k | biasScale br]_j += sum_i dS_ij [q | bl]_i
        for (int col0 = 0; col0 < keyWidth; col0 += ColumnChunk) {
            stageColumns(queryCols, row0, p.rows, col0, keyWidth, [&](int row, int col) { return lifted.query(row, col); });
            __syncthreads();
            for (int e = threadIdx.x; e < TileKeys * ColumnChunk; e += TileThreads) {
                const int j = e / ColumnChunk, d = e % ColumnChunk, key = key0 + j;
                if (key >= p.rows || col0 + d >= keyWidth)
                    continue;
                float sum = 0.0f;
                for (int i = 0; i < TileRows; i++)
                    sum = fmaf(dS[i * TileStride + j], queryCols[d * TileStride + i], sum);
                g.liftedKey[((size_t) key * p.heads + head) * keyWidth + col0 + d] += sum;
            }
            __syncthreads();
        }
        // d y_j += w sum_i dS_ij (x_i - y_j)
        for (int e = threadIdx.x; e < TileKeys * coordinates; e += TileThreads) {
            const int j = e / coordinates, d = e % coordinates, key = key0 + j;
            if (key >= p.rows)
                continue;
            const float y = keyPts[d * TileStride + j];
            float sum = 0.0f;
            for (int i = 0; i < TileRows; i++)
                sum = fmaf(dS[i * TileStride + j], queryPts[d * TileStride + i] - y, sum);
            g.keyPoints[((size_t) key * p.heads + head) * coordinates + d] += pointWeight * sum;
        }
    }
}

template <typename T>
void launchBackward(const FusedAttentionProblem& p, const float* logSumExp, const float* gradOut, const float* delta,
                    const FusedAttentionGradients& g, cudaStream_t stream) {
    const size_t bytes = backwardSharedFloats(p) * sizeof(float);
    auto queryKernel = fusedAttentionBackwardQuery<T>;
    auto keyKernel = fusedAttentionBackwardKey<T>;
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
    if (p.element == ElementType::BFloat16)
        launchBackward<__nv_bfloat16>(p, logSumExp, gradOut, delta, g, stream);
    else
        launchBackward<float>(p, logSumExp, gradOut, delta, g, stream);
}

} // namespace kernels
} // namespace FlashIPAPlugin
