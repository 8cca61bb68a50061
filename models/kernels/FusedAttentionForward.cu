// Forward pass of the fused FlashIPA attention in fp32 arithmetic (SIMT; the fp32 mode, and the
// fallback where the tensor-core kernel does not apply): one block per (tile of 64 query rows, head, chunk of
// value columns). It streams key tiles, recomputes their logits (FusedAttentionTiles.cuh), keeps an
// online softmax per row, and accumulates probability-weighted lifted values in shared memory. The
// output is the lifted output row (scalar values, value points in the global frame, pair values) and
// the log-sum-exp the backward pass needs. Nothing of size L x L is ever stored.
#include "FusedAttentionLaunch.cuh"

namespace FlashIPAPlugin {
namespace kernels {

namespace {

template <typename T>
__global__ void __launch_bounds__(TileThreads) fusedAttentionForward(FusedAttentionProblem p, int valueChunk, float* out, float* logSumExp) {
    extern __shared__ float shared[];
    __shared__ TileRowInfo queryInfo, keyInfo;
    __shared__ float rowScale[TileRows];
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int row0 = blockIdx.x * TileRows, head = blockIdx.y;
    const int valueWidth = p.liftedValueDim(), coordinates = 3 * p.queryPoints;
    const int chunk0 = blockIdx.z * valueChunk, chunkColumns = min(valueChunk, valueWidth - chunk0);
    float* queryCols = shared;
    float* keyCols = queryCols + ColumnChunk * TileStride;
    float* queryPts = keyCols + ColumnChunk * TileStride;
    float* keyPts = queryPts + coordinates * TileStride;
    float* probs = keyPts + coordinates * TileStride;  // [row][key], stride TileStride
    float* values = probs + TileRows * TileStride;      // [key][column of the chunk]
    float* accumulated = values + TileKeys * valueChunk; // [row][column of the chunk]

    const LiftedRows<T> lifted{p, head};
    stageRowInfo(queryInfo, p, row0);
    stagePoints(queryPts, p.queryPointsGlobal, p.heads, head, coordinates, row0, p.rows);
    for (int e = threadIdx.x; e < TileRows * valueChunk; e += TileThreads)
        accumulated[e] = 0.0f;
    __syncthreads();
    int firstTile, lastTile;
    tileRange(queryInfo, firstTile, lastTile);
    const float pointWeight = p.pointWeight[head];
    float runningMax[PerThread], runningSum[PerThread];
    for (int a = 0; a < PerThread; a++) {
        runningMax[a] = -CUDART_INF_F;
        runningSum[a] = 0.0f;
    }

    for (int tile = firstTile; tile < lastTile; tile++) {
        const int key0 = tile * TileKeys;
        __syncthreads(); // the previous tile's values, probabilities and key info are no longer read
        stageRowInfo(keyInfo, p, key0);
        stagePoints(keyPts, p.keyPointsGlobal, p.heads, head, coordinates, key0, p.rows);
        stageBatched<TileThreads>(
            TileKeys * valueChunk,
            [&](int e) {
                const int j = e / valueChunk, d = e % valueChunk;
                return (key0 + j < p.rows && d < chunkColumns) ? lifted.value(key0 + j, chunk0 + d) : 0.0f;
            },
            [&](int e, float v) { values[e] = v; });
        float logit[PerThread][PerThread], distance2[PerThread][PerThread];
        logitTile(lifted, row0, key0, queryCols, keyCols, queryPts, keyPts, queryInfo, keyInfo, pointWeight, logit, distance2);

        for (int a = 0; a < PerThread; a++) {
            float tileMax = -CUDART_INF_F;
            for (int b = 0; b < PerThread; b++)
                tileMax = fmaxf(tileMax, logit[a][b]);
            const float newMax = fmaxf(runningMax[a], rowMax(tileMax));
            // A row with no valid key yet keeps max -inf; its probabilities are exactly zero.
            const float scale = runningMax[a] == -CUDART_INF_F ? 0.0f : expf(runningMax[a] - newMax);
            float sum = 0.0f;
            for (int b = 0; b < PerThread; b++) {
                const float prob = logit[a][b] == -CUDART_INF_F ? 0.0f : expf(logit[a][b] - newMax);
                probs[(ty + 16 * a) * TileStride + tx + 16 * b] = prob;
                sum += prob;
            }
            runningSum[a] = runningSum[a] * scale + rowSum(sum);
            runningMax[a] = newMax;
            if (tx == 0)
                rowScale[ty + 16 * a] = scale;
        }
        __syncthreads();

        // accumulated[row][col] = scale_row * accumulated[row][col] + sum_j prob[row][j] value[j][col]
        for (int col0 = 0; col0 < valueChunk; col0 += 16 * PerThread) {
            float sum[PerThread][PerThread] = {};
            for (int j = 0; j < TileKeys; j++) {
                float pa[PerThread], vb[PerThread];
                for (int a = 0; a < PerThread; a++)
                    pa[a] = probs[(ty + 16 * a) * TileStride + j];
                for (int b = 0; b < PerThread; b++) {
                    const int col = col0 + tx + 16 * b;
                    vb[b] = col < valueChunk ? values[j * valueChunk + col] : 0.0f;
                }
                for (int a = 0; a < PerThread; a++)
                    for (int b = 0; b < PerThread; b++)
                        sum[a][b] = fmaf(pa[a], vb[b], sum[a][b]);
            }
            for (int a = 0; a < PerThread; a++)
                for (int b = 0; b < PerThread; b++) {
                    const int r = ty + 16 * a, col = col0 + tx + 16 * b;
                    if (col < valueChunk)
                        accumulated[r * valueChunk + col] = accumulated[r * valueChunk + col] * rowScale[r] + sum[a][b];
                }
        }
    }

    for (int a = 0; a < PerThread; a++) {
        const int r = ty + 16 * a, row = row0 + r;
        if (row >= p.rows)
            continue;
        const float inverse = runningSum[a] > 0.0f ? 1.0f / runningSum[a] : 0.0f;
        for (int col = tx; col < chunkColumns; col += 16)
            out[((size_t) row * p.heads + head) * valueWidth + chunk0 + col] = accumulated[r * valueChunk + col] * inverse;
        if (blockIdx.z == 0 && tx == 0)
            logSumExp[(size_t) row * p.heads + head] = runningSum[a] > 0.0f ? runningMax[a] + logf(runningSum[a]) : 0.0f;
    }
}

/** Value columns per block: all of them when shared memory allows, else equal chunks (multiples of 16). */
int valueChunkFor(const FusedAttentionProblem& p) {
    constexpr int MaxChunk = 256;
    const int width = p.liftedValueDim();
    const int chunks = (width + MaxChunk - 1) / MaxChunk;
    const int chunk = (width + chunks - 1) / chunks;
    return (chunk + 15) / 16 * 16;
}

template <typename T>
void launchForward(const FusedAttentionProblem& p, float* out, float* logSumExp, cudaStream_t stream) {
    const int valueChunk = valueChunkFor(p);
    const int chunks = (p.liftedValueDim() + valueChunk - 1) / valueChunk;
    const size_t floats = 2 * ColumnChunk * TileStride + 2 * 3 * p.queryPoints * TileStride + TileRows * TileStride +
                          (size_t) (TileKeys + TileRows) * valueChunk;
    const size_t bytes = floats * sizeof(float);
    auto kernel = fusedAttentionForward<T>;
    allowSharedMemory(kernel, bytes, "forward: shared memory");
    const dim3 grid((p.rows + TileRows - 1) / TileRows, p.heads, chunks);
    kernel<<<grid, TileThreads, bytes, stream>>>(p, valueChunk, out, logSumExp);
    checkLaunch(cudaGetLastError(), "forward");
}

} // namespace

void launchFusedAttentionForward(const FusedAttentionProblem& p, float* out, float* logSumExp, cudaStream_t stream) {
    validateProblem(p);
    if (p.rows == 0)
        return;
    if (p.element == ElementType::Float16)
        launchForward<__half>(p, out, logSumExp, stream);
    else
        launchForward<float>(p, out, logSumExp, stream);
}

} // namespace kernels
} // namespace FlashIPAPlugin
