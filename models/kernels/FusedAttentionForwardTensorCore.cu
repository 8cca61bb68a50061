// Forward pass of the fused FlashIPA attention on tensor cores (bf16 operands, mma.sync m16n8k16,
// fp32 accumulation). One block of 8 warps owns 128 query rows of one head and a chunk of value
// columns; each warp owns 16 rows and streams key tiles of 64 through shared memory, copied as
// 16-byte vectors from the operands packed once per call (TensorCorePack).
//
// What runs where, and why it stays exact far from the origin (DESIGN 2.5):
//  - scalar logits q.k and bl.br: bf16 operands on tensor cores (invariant features: how they round
//    does not depend on where the structure is);
//  - point logits. Each query point is stored relative to its query tile's centre, a = x - c_q, each
//    key point relative to its key tile's centre, b = y - c_k. With d = c_q - c_k,
//        sum_p |x_p - y_p|^2 = sum|a|^2 + sum|b|^2 + P d.d - 2 sum a.b + 2 d.sum a - 2 d.sum b.
//    Only the cross term sum a.b runs on tensor cores, with each fp32 operand split into bf16
//    hi + lo parts (a_hi b_hi + a_lo b_hi + a_hi b_lo: about 16 mantissa bits of |a| |b|); the rest
//    is fp32 per row, per key and per tile pair. Consecutive residues are neighbours in space, so
//    |a| and |b| are the size of a tile's neighbourhood wherever the structure sits and however large
//    it is; pairs of distant tiles get large errors in absolute terms only where their weights
//    underflow anyway;
//  - value points: global coordinates as bf16 hi + lo parts accumulated into the same fp32
//    accumulators (two mma per column tile), about 16 bits whatever their magnitude.
// The online softmax follows FlashAttention-2: probabilities stay in registers and are re-packed as
// the A operand of the P.V product (the accumulator layout of m16n8k16 matches the operand layout).
#include "FusedAttentionMma.cuh"

namespace FlashIPAPlugin {
namespace kernels {

namespace {

constexpr int Warps = 8;
constexpr int BlockRows = TensorCoreQueryTile; // 16 rows per warp
constexpr int BlockKeys = TensorCoreKeyTile;
constexpr int Threads = 32 * Warps;
constexpr int MaxValueTiles = 32;
constexpr float Log2E = 1.4426950408889634f;
constexpr int ValueStride = paddedWords(BlockKeys / 2); // value tiles: rows are value columns, 64 keys each
constexpr int MaxLoTiles = 8; // value-point residual tiles: 3 P_v <= 64
static_assert(MaxLoTiles <= 8, "the residual tiles fit in the first chunk (at least 8 tiles)");
static_assert(BlockRows == 16 * Warps, "one warp per 16 query rows");

/**
 * Shared-memory geometry (offsets in 32-bit words). The key, value and value-residual tiles are
 * double-buffered: the next tile is copied (cp.async) while the current one is multiplied.
 */
struct Layout {
    int keyStride, valueStride, loTiles, bufferWords;
    int queryOffset, keyOffset, valueOffset, valueLoOffset, keyStatsOffset, keySegmentOffset, words;

    __host__ __device__ Layout(const TensorCorePack& pack, int valueTiles) {
        keyStride = paddedWords(pack.keyColumns / 2);
        valueStride = ValueStride;
        loTiles = pack.loTiles; // all in the first chunk (value points come first)
        queryOffset = 0;
        keyOffset = queryOffset + BlockRows * keyStride;
        valueOffset = keyOffset + BlockKeys * keyStride;
        valueLoOffset = valueOffset + 8 * valueTiles * valueStride;
        keyStatsOffset = valueLoOffset + 8 * loTiles * valueStride;
        keySegmentOffset = keyStatsOffset + 4 * BlockKeys;
        bufferWords = keySegmentOffset + BlockKeys - keyOffset; // one buffer: key, value, residual tiles, key stats, segments
        words = keyOffset + 2 * bufferWords;
    }
};

template <int ValueTiles>
__global__ void __launch_bounds__(Threads) fusedAttentionForwardTensorCore(FusedAttentionProblem p, TensorCorePack pack, float* out,
                                                                           float* logSumExp) {
    extern __shared__ uint4 sharedVectors[];
    uint32_t* words = reinterpret_cast<uint32_t*>(sharedVectors);
    __shared__ int rowSegment[BlockRows], rowBegin[BlockRows], rowEnd[BlockRows];
    __shared__ int range[7]; // min begin, max end, max begin, min end, min segment, max segment, real rows
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int queryTile = blockIdx.x, row0 = queryTile * BlockRows, head = blockIdx.y;
    const int chunkTile0 = blockIdx.z * ValueTiles, chunk0 = 8 * chunkTile0;
    const int valueWidth = p.liftedValueDim(), chunkColumns = min(8 * ValueTiles, valueWidth - chunk0);
    const Layout layout(pack, ValueTiles);
    uint32_t* queryWords = words + layout.queryOffset;
    const FragmentLanes keyLanes(layout.keyStride), valueLanes(ValueStride);
    const unsigned queryFragments = sharedAddress(queryWords);
    const float pointWeight = p.pointWeight[head];
    const int H = p.heads, vectorsPerRow = pack.keyColumns / 8;
    const float* queryCentre = pack.queryCentres + ((size_t) queryTile * H + head) * 3;

    if (threadIdx.x == 0) {
        range[0] = range[3] = range[4] = INT_MAX;
        range[1] = range[2] = range[5] = INT_MIN;
        range[6] = 0;
    }
    __syncthreads();
    copyRows<Threads>(queryWords, layout.keyStride, static_cast<const uint4*>(pack.queries) + ((size_t) row0 * H + head) * vectorsPerRow,
             (size_t) H * vectorsPerRow, BlockRows, vectorsPerRow);
    for (int r = threadIdx.x; r < BlockRows; r += Threads) {
        const int row = row0 + r;
        const bool real = row < p.rows && p.segment[row] >= 0;
        rowSegment[r] = real ? p.segment[row] : -1;
        rowBegin[r] = real ? p.keyBegin[row] : 0;
        rowEnd[r] = real ? p.keyEnd[row] : 0;
        if (real) {
            atomicMin(&range[0], rowBegin[r]);
            atomicMax(&range[1], rowEnd[r]);
            atomicMax(&range[2], rowBegin[r]);
            atomicMin(&range[3], rowEnd[r]);
            atomicMin(&range[4], rowSegment[r]);
            atomicMax(&range[5], rowSegment[r]);
            atomicAdd(&range[6], 1);
        }
    }
    __syncthreads();
    const int firstTile = range[0] == INT_MAX ? 0 : range[0] / BlockKeys;
    const int lastTile = range[0] == INT_MAX ? 0 : (range[1] + BlockKeys - 1) / BlockKeys;
    // All rows real, of one segment and one key range: whole key tiles inside it need no mask.
    const bool uniformRows = range[6] == BlockRows && range[4] == range[5] && range[0] == range[2] && range[1] == range[3];
    const int uniformBegin = range[0], uniformEnd = range[1], uniformSegment = range[4], keySteps = pack.keyColumns / 16;
    const int myRow[2] = {warp * 16 + g, warp * 16 + g + 8};
    float rowStats[2][4];
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 4; k++)
            rowStats[h][k] = pack.queryStats[((size_t) (row0 + myRow[h]) * H + head) * 4 + k];

    float acc[ValueTiles][4] = {};
    float runningMax[2] = {-CUDART_INF_F, -CUDART_INF_F}, runningSum[2] = {0.0f, 0.0f};
    const uint4* values = static_cast<const uint4*>(pack.values) + (size_t) head * pack.valueColumns * (pack.paddedRows / 8);
    const uint4* valuesLo = static_cast<const uint4*>(pack.valuesLo) + (size_t) head * 8 * pack.loTiles * (pack.paddedRows / 8);
    const int loTiles = blockIdx.z == 0 ? pack.loTiles : 0; // value-point residual tiles in this chunk
    const int vectorsPerColumn = pack.paddedRows / 8;

    // Starts copying one key tile into a buffer: keys, values, value residuals, the keys' point sums
    // and segments (cp.async, one commit group; nothing in the loop waits on a global load).
    auto stageTile = [&](int tile, int buffer) {
        uint32_t* base = words + layout.keyOffset + buffer * layout.bufferWords;
        const int key0 = tile * BlockKeys;
        copyRows<Threads>(base, layout.keyStride, static_cast<const uint4*>(pack.keys) + ((size_t) key0 * H + head) * vectorsPerRow,
                 (size_t) H * vectorsPerRow, BlockKeys, vectorsPerRow);
        copyRows<Threads>(base + layout.valueOffset - layout.keyOffset, layout.valueStride, values + (size_t) chunk0 * vectorsPerColumn + key0 / 8,
                 vectorsPerColumn, 8 * ValueTiles, BlockKeys / 8); // whole chunk: the packing zero-pads it
        if (loTiles > 0)
            copyRows<Threads>(base + layout.valueLoOffset - layout.keyOffset, layout.valueStride, valuesLo + key0 / 8, vectorsPerColumn, 8 * loTiles,
                     BlockKeys / 8);
        copyRows<Threads>(base + layout.keyStatsOffset - layout.keyOffset, 4, static_cast<const uint4*>(static_cast<const void*>(pack.keyStats)) + (size_t) key0 * H + head,
                 H, BlockKeys, 1);
        copyRows<Threads>(base + layout.keySegmentOffset - layout.keyOffset, 0, static_cast<const uint4*>(static_cast<const void*>(pack.segments + key0)), 0, 1,
                 BlockKeys / 4);
        commitCopies();
    };
    if (firstTile < lastTile)
        stageTile(firstTile, 0);
    else
        commitCopies(); // the query tile's copies

    for (int tile = firstTile; tile < lastTile; tile++) {
        const int key0 = tile * BlockKeys, buffer = (tile - firstTile) & 1;
        waitCopies();
        __syncthreads(); // this tile has landed, and every warp is done with the other buffer
        if (tile + 1 < lastTile)
            stageTile(tile + 1, buffer ^ 1);
        const uint32_t* base = words + layout.keyOffset + buffer * layout.bufferWords;
        const unsigned keyTile = sharedAddress(base), valueTile = keyTile + 4u * (layout.valueOffset - layout.keyOffset),
                       valueLoTile = keyTile + 4u * (layout.valueLoOffset - layout.keyOffset);
        const float4* keyStats = reinterpret_cast<const float4*>(base + layout.keyStatsOffset - layout.keyOffset);
        const int* keySegment = reinterpret_cast<const int*>(base + layout.keySegmentOffset - layout.keyOffset);
        const int tileSegment = pack.tileSegments[tile]; // used after the logits: its latency is hidden
        const float* keyCentre = pack.keyCentres + ((size_t) tile * H + head) * 3;
        const float d[3] = {queryCentre[0] - keyCentre[0], queryCentre[1] - keyCentre[1], queryCentre[2] - keyCentre[2]};

        // Logits for this warp's 16 rows x 64 keys (fragments through ldmatrix).
        float s[8][4] = {};
#pragma unroll 1
        for (int ks = 0; ks < keySteps; ks++) {
            uint32_t a[4];
            loadA(a, queryFragments, keyLanes, layout.keyStride, warp * 16, ks);
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t b[4];
                loadB(b, keyTile, keyLanes, layout.keyStride, 16 * np, ks);
                mma(s[2 * np], a[0], a[1], a[2], a[3], b[0], b[1]);
                mma(s[2 * np + 1], a[0], a[1], a[2], a[3], b[2], b[3]);
            }
        }
        const float pointCount = (float) p.queryPoints, dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
        // Tiles wholly inside every row's key range (and so inside one segment) skip the mask.
        const bool wholeTile = uniformRows && key0 >= uniformBegin && key0 + BlockKeys <= uniformEnd && tileSegment == uniformSegment;
        // This thread's 16 keys' terms -(w/2)(sum|b|^2 - 2 d.sum b), d = c_q - c_k, in log2 units like
        // everything below (exp2 is one instruction).
        float keyTerms[8][2];
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float4 stats = keyStats[nt * 8 + 2 * t + e];
                keyTerms[nt][e] = -0.5f * Log2E * pointWeight * (stats.x - 2.0f * (d[0] * stats.y + d[1] * stats.z + d[2] * stats.w));
            }
        // Row terms, mask, online softmax (rows g and g + 8 of the warp; 4 lanes share a row).
        float scales[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = myRow[h];
            const float rowTerm = -0.5f * Log2E * pointWeight *
                                  (rowStats[h][0] + pointCount * dd + 2.0f * (d[0] * rowStats[h][1] + d[1] * rowStats[h][2] + d[2] * rowStats[h][3]));
            float tileMax = -CUDART_INF_F;
            if (wholeTile) {
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        float& x = s[nt][2 * h + e];
                        x = fmaf(x, Log2E, rowTerm + keyTerms[nt][e]);
                        tileMax = fmaxf(tileMax, x);
                    }
            } else {
                const int segment = rowSegment[r], begin = rowBegin[r], end = rowEnd[r];
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = nt * 8 + 2 * t + e, key = key0 + j;
                        const bool valid = segment >= 0 && key >= begin && key < end && keySegment[j] == segment;
                        float& x = s[nt][2 * h + e];
                        x = valid ? fmaf(x, Log2E, rowTerm + keyTerms[nt][e]) : -CUDART_INF_F;
                        tileMax = fmaxf(tileMax, x);
                    }
            }
            tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, 1));
            tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, 2));
            const float newMax = fmaxf(runningMax[h], tileMax);
            // A row with nothing valid yet keeps max -inf: its probabilities are exp2(-inf) = 0.
            const float shift = newMax == -CUDART_INF_F ? 0.0f : newMax;
            const float scale = exp2f(runningMax[h] - shift);
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float& x = s[nt][2 * h + e];
                    x = exp2f(x - shift);
                    sum += x;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            runningSum[h] = runningSum[h] * scale + sum;
            runningMax[h] = newMax;
            scales[h] = scale;
        }
        // Rescale the accumulators only when a row's maximum moved (rare after the first tiles).
        if (__any_sync(0xffffffffu, scales[0] != 1.0f || scales[1] != 1.0f)) {
#pragma unroll
            for (int nv = 0; nv < ValueTiles; nv++) {
                acc[nv][0] *= scales[0];
                acc[nv][1] *= scales[0];
                acc[nv][2] *= scales[1];
                acc[nv][3] *= scales[1];
            }
        }
        // acc += P V: P re-packed from the logit accumulators as bf16 A operands; the value points'
        // residual tiles after all the main tiles, so that no mma waits on the one before it.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const uint32_t a0 = packBf16(s[2 * kk][0], s[2 * kk][1]), a1 = packBf16(s[2 * kk][2], s[2 * kk][3]);
            const uint32_t a2 = packBf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), a3 = packBf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int np = 0; np < ValueTiles / 2; np++) {
                uint32_t b[4];
                loadB(b, valueTile, valueLanes, ValueStride, 16 * np, kk);
                mma(acc[2 * np], a0, a1, a2, a3, b[0], b[1]);
                mma(acc[2 * np + 1], a0, a1, a2, a3, b[2], b[3]);
            }
#pragma unroll
            for (int l = 0; l < MaxLoTiles; l++) {
                if (l < loTiles) {
                    uint32_t b[2];
                    loadBOne(b, valueLoTile, valueLanes, ValueStride, 8 * l, kk);
                    mma(acc[l], a0, a1, a2, a3, b[0], b[1]);
                }
            }
        }
    }

    waitCopies(); // nothing may still be landing when the block ends
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = row0 + myRow[h];
        if (row >= p.rows)
            continue;
        const float inverse = runningSum[h] > 0.0f ? 1.0f / runningSum[h] : 0.0f;
        const int pointColumns = 3 * p.valuePoints; // packed first, written after v
        float* outRow = out + ((size_t) row * p.heads + head) * valueWidth;
#pragma unroll
        for (int nv = 0; nv < ValueTiles; nv++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = nv * 8 + 2 * t + e, packed = chunk0 + col;
                if (col < chunkColumns)
                    outRow[packed < pointColumns ? p.headDim + packed : (packed < pointColumns + p.headDim ? packed - pointColumns : packed)] =
                        acc[nv][2 * h + e] * inverse;
            }
        if (blockIdx.z == 0 && t == 0)
            logSumExp[(size_t) row * p.heads + head] = runningSum[h] > 0.0f ? runningMax[h] / Log2E + logf(runningSum[h]) : 0.0f;
    }
}

template <int ValueTiles>
void launch(const FusedAttentionProblem& p, const TensorCorePack& pack, float* out, float* logSumExp, cudaStream_t stream) {
    const int chunks = (p.liftedValueDim() + 8 * ValueTiles - 1) / (8 * ValueTiles);
    const size_t bytes = (size_t) Layout(pack, ValueTiles).words * 4;
    auto kernel = fusedAttentionForwardTensorCore<ValueTiles>;
    allowSharedMemory(kernel, bytes, "tensor-core forward: shared memory");
    const dim3 grid(pack.paddedRows / BlockRows, p.heads, chunks);
    kernel<<<grid, Threads, bytes, stream>>>(p, pack, out, logSumExp);
    checkLaunch(cudaGetLastError(), "tensor-core forward");
}

} // namespace

int tensorCoreValueChunk(int width) {
    // Value tiles of 8 columns kept in registers per block: 8, 16 or 32 (wider rows are chunked).
    return width <= 64 ? 64 : (width <= 128 ? 128 : 8 * MaxValueTiles);
}

bool tensorCoreForwardApplies(const FusedAttentionProblem& p) {
    int device = 0, major = 0, limit = 0;
    checkLaunch(cudaGetDevice(&device), "device");
    checkLaunch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
    checkLaunch(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory limit");
    if (major < 8 || p.element != ElementType::BFloat16)
        return false;
    // Shared memory at the widest packing this problem can have.
    TensorCorePack pack;
    pack.keyColumns = (p.liftedKeyDim() + 15) / 16 * 16 + (9 * p.queryPoints + 15) / 16 * 16;
    pack.loTiles = (3 * p.valuePoints + 7) / 8;
    if (pack.loTiles > MaxLoTiles)
        return false;
    const int tiles = tensorCoreValueChunk(p.liftedValueDim()) / 8;
    const size_t bytes = (size_t) Layout(pack, tiles).words * 4 + 2048;
    return bytes <= (size_t) limit;
}

bool launchFusedAttentionForwardTensorCore(const FusedAttentionProblem& p, const TensorCorePack& pack, float* out, float* logSumExp,
                                           cudaStream_t stream) {
    validateProblem(p);
    if (p.rows == 0 || !tensorCoreForwardApplies(p))
        return false;
    switch (tensorCoreValueChunk(p.liftedValueDim())) {
    case 64:
        launch<8>(p, pack, out, logSumExp, stream);
        break;
    case 128:
        launch<16>(p, pack, out, logSumExp, stream);
        break;
    default:
        launch<MaxValueTiles>(p, pack, out, logSumExp, stream);
    }
    return true;
}

} // namespace kernels
} // namespace FlashIPAPlugin
