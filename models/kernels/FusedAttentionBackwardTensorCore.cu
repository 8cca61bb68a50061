// Backward pass of the fused FlashIPA attention on tensor cores (fp16 operands, fp32 accumulators),
// for the fp16 mode. Three launches of one kernel, each block owning 128 rows of one side (8 warps x
// 16 rows) and streaming 32-row tiles of the other side through double-buffered shared memory:
//  - Side::Query: dS = P (dP - delta) per tile pair, then d[q | bl] += dS [s k | s br], the query-point
//    gradients and the point weight's gradient;
//  - Side::Key:   the same pair tiles transposed (keys as rows), d[s k | s br] += dS^T [q | bl] and the
//    key-point gradients;
//  - Side::Value: P^T dOut into d(lifted values), in value chunks like the forward.
// Each block owns what it writes: no atomics except one per block for the point weight. Logits are
// recomputed as in the forward (FusedAttentionForwardTensorCore.cu) and the probabilities come from
// the forward's log-sum-exp.
//
// Exactness far from the origin (docs/MATH.md §5), the forward's re-centring carried through the gradients:
//  - the point logit per pair is -(w/2) D with D = sum|a|^2 + sum|b|^2 + P d.d - 2 a.b + 2 d.sum a - 2 d.sum b
//    (a, b relative to the query and key tile centres, d = c_q - c_k); -D/2 is also d logit / d w;
//  - d logit / d x_i = -w (a_i - b_j + d) and d logit / d y_j = w (a_i - b_j + d), so the point
//    gradients are -w (a_i sum_j dS_ij - sum_j dS_ij b_j + sum_j dS_ij d) and the mirror image: the
//    products dS b and dS^T a run on tensor cores with small relative coordinates (split fp16 hi + lo),
//    the row sums and the d terms in fp32;
//  - dP_ij = dOut_i . V_j has value points in it. They are packed relative to their key tile's centre
//    c_k, and the centre's share dOut_i . c_k (sum over the value points of the row's gradient, dotted
//    with c_k) is added in fp32: rounding dOut to fp16 then never multiplies a coordinate of 100 nm.
//    delta_i = dOut_i . out_i is exact fp32, so dP - delta cancels the centre's share to fp32 precision.
#include "FusedAttentionMma.cuh"

namespace FlashIPAPlugin {
namespace kernels {

namespace {

constexpr int Warps = 8;
constexpr int OwnRows = 16 * Warps; // one query tile of the forward (its centre is one centre)
constexpr int OtherRows = TensorCoreBackwardTile; // half a key tile of the forward (its centre is the key tile's)
constexpr int Threads = 32 * Warps;
constexpr int MaxPointTiles = 4;    // 3 P_q <= 32
static_assert(OwnRows == TensorCoreQueryTile && TensorCoreKeyTile % OtherRows == 0 && TensorCoreKeyTile % 16 == 0,
              "tiles nest in the forward's centre tiles");

enum class Side { Query, Key, Value };

/** Per-row values of a staged tile of the other side, copied by cp.async from the pack's row arrays. */
struct OtherRowInfo {
    float4 stat[OtherRows];     // sum |p|^2, sum p (x, y, z) relative to the row's tile centre
    float4 terms[OtherRows][2]; // log-sum-exp, delta, sum over value points of dOut (x, y, z), 0, 0, 0
    int4 range[OtherRows];      // segment (-1: padding), key range begin, end, 0
};
static_assert(sizeof(OtherRowInfo) % 16 == 0, "keeps the next buffer 16-byte aligned");

/** Shared-memory geometry in 32-bit words: own rows staged once, the other side's tiles double-buffered. */
struct BackwardLayout {
    int keyStride, ownValueStride, otherValueStride;
    int ownKey, ownValue, buffers, otherValue, info, bufferWords, words;

    __host__ __device__ BackwardLayout(const TensorCoreBackwardPack& pack, int valueWidth, Side side, int accTiles) {
        keyStride = paddedWords(pack.keyColumns / 2);
        const int valueWords = (valueWidth + 15) / 16 * 8; // the columns dP reads
        ownValueStride = side == Side::Value ? 0 : paddedWords(valueWords);
        otherValueStride = side == Side::Value ? paddedWords(4 * accTiles) : ownValueStride;
        ownKey = 0;
        ownValue = ownKey + OwnRows * keyStride;
        buffers = ownValue + OwnRows * ownValueStride;
        otherValue = OtherRows * keyStride; // offsets inside a buffer
        info = otherValue + OtherRows * otherValueStride;
        bufferWords = info + (int) (sizeof(OtherRowInfo) / 4);
        words = buffers + 2 * bufferWords;
    }
};

template <Side side, int AccTiles>
__global__ void __launch_bounds__(Threads) fusedAttentionBackwardTensorCore(FusedAttentionProblem p, TensorCoreBackwardPack pack,
                                                                            FusedAttentionGradients grads) {
    constexpr bool querySide = side == Side::Query, valueSide = side == Side::Value;
    extern __shared__ uint4 sharedVectors[];
    uint32_t* words = reinterpret_cast<uint32_t*>(sharedVectors);
    __shared__ int range[7]; // min begin, max end, max begin, min end, min segment, max segment, real rows
    __shared__ float warpSums[Warps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int own0 = blockIdx.x * OwnRows, head = blockIdx.y, H = p.heads;
    const int width = p.liftedValueDim();
    const BackwardLayout layout(pack, width, side, AccTiles);
    const int chunk0 = valueSide ? blockIdx.z * 8 * AccTiles : 0;
    const float w = p.pointWeight[head], pointCount = (float) p.queryPoints;
    const int keyVectors = pack.keyColumns / 8, valueVectors = pack.valueColumns / 8;
    const int usedValueVectors = (width + 15) / 16 * 2;
    const uint4* ownKeySource = static_cast<const uint4*>(querySide ? pack.queries : pack.keys);
    const uint4* otherKeySource = static_cast<const uint4*>(querySide ? pack.keys : pack.queries);
    const uint4* ownValueSource = static_cast<const uint4*>(querySide ? pack.gradOut : pack.values);
    const uint4* otherValueSource = static_cast<const uint4*>(querySide ? pack.values : pack.gradOut);
    uint32_t* ownKey = words + layout.ownKey;
    uint32_t* ownValue = words + layout.ownValue;

    if (threadIdx.x == 0) {
        range[0] = range[3] = range[4] = INT_MAX;
        range[1] = range[2] = range[5] = INT_MIN;
        range[6] = 0;
    }
    __syncthreads();
    const int keyCopies = keyVectors, valueCopies = valueSide ? AccTiles : usedValueVectors; // 16-byte vectors per row
    copyRows<Threads>(ownKey, layout.keyStride, ownKeySource + (size_t) own0 * H * keyVectors + (size_t) head * keyVectors, (size_t) H * keyVectors,
             OwnRows, keyCopies);
    if (!valueSide)
        copyRows<Threads>(ownValue, layout.ownValueStride, ownValueSource + (size_t) own0 * H * valueVectors + (size_t) head * valueVectors,
                 (size_t) H * valueVectors, OwnRows, valueCopies);
    commitCopies();
    // The other side's rows that meet an own row: a query sees [keyBegin, keyEnd); segments are
    // contiguous runs, so the queries that see a key are those of the same range.
    for (int r = threadIdx.x; r < OwnRows; r += Threads) {
        const int4 rowRange = reinterpret_cast<const int4*>(pack.rowRanges)[own0 + r];
        if (rowRange.x >= 0) {
            atomicMin(&range[0], rowRange.y);
            atomicMax(&range[1], rowRange.z);
            atomicMax(&range[2], rowRange.y);
            atomicMin(&range[3], rowRange.z);
            atomicMin(&range[4], rowRange.x);
            atomicMax(&range[5], rowRange.x);
            atomicAdd(&range[6], 1);
        }
    }

    // This thread's own rows (g and g + 8 of its warp).
    const int ownRow[2] = {own0 + warp * 16 + g, own0 + warp * 16 + g + 8};
    float ownStat[2][4], ownLse[2] = {0.0f, 0.0f}, ownDelta[2] = {0.0f, 0.0f}, ownGradSum[2][3] = {};
    int ownSegment[2], ownBegin[2], ownEnd[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = ownRow[h];
        const size_t index = (size_t) row * H + head;
        const int4 rowRange = reinterpret_cast<const int4*>(pack.rowRanges)[row];
        ownSegment[h] = rowRange.x;
        ownBegin[h] = rowRange.y;
        ownEnd[h] = rowRange.z;
        const float* stats = querySide ? pack.queryStats : pack.keyStats;
        for (int k = 0; k < 4; k++)
            ownStat[h][k] = stats[index * 4 + k];
        if (querySide) {
            const float* terms = pack.rowTerms + index * 8;
            ownLse[h] = terms[0];
            ownDelta[h] = terms[1];
            for (int k = 0; k < 3; k++)
                ownGradSum[h][k] = terms[2 + k];
        }
    }
    // The query side's rows share one centre; a key-side warp's 16 keys lie in one key tile.
    const float* ownCentre = querySide ? pack.queryCentres + ((size_t) (own0 / TensorCoreQueryTile) * H + head) * 3
                                       : pack.keyCentres + ((size_t) ((own0 + warp * 16) / TensorCoreKeyTile) * H + head) * 3;
    const float ownC[3] = {ownCentre[0], ownCentre[1], ownCentre[2]};
    __syncthreads();
    const int firstTile = range[0] == INT_MAX ? 0 : range[0] / OtherRows;
    const int lastTile = range[0] == INT_MAX ? 0 : (range[1] + OtherRows - 1) / OtherRows;
    // All own rows real, of one segment and one key range: tiles of that segment need no mask.
    const bool uniformRows = range[6] == OwnRows && range[4] == range[5] && range[0] == range[2] && range[1] == range[3];
    const int uniformBegin = range[0], uniformEnd = range[1], uniformSegment = range[4];

    auto stageTile = [&](int tile, int buffer) {
        uint32_t* base = words + layout.buffers + buffer * layout.bufferWords;
        const int other0 = tile * OtherRows;
        copyRows<Threads>(base, layout.keyStride, otherKeySource + (size_t) other0 * H * keyVectors + (size_t) head * keyVectors,
                 (size_t) H * keyVectors, OtherRows, keyCopies);
        copyRows<Threads>(base + layout.otherValue, layout.otherValueStride,
                 otherValueSource + (size_t) other0 * H * valueVectors + (size_t) head * valueVectors + chunk0 / 8, (size_t) H * valueVectors,
                 OtherRows, valueCopies);
        OtherRowInfo* info = reinterpret_cast<OtherRowInfo*>(base + layout.info);
        const float* stats = querySide ? pack.keyStats : pack.queryStats;
        copyRows<Threads>(reinterpret_cast<uint32_t*>(info->stat), 4, reinterpret_cast<const uint4*>(stats) + (size_t) other0 * H + head, H,
                          OtherRows, 1);
        if (!querySide)
            copyRows<Threads>(reinterpret_cast<uint32_t*>(info->terms), 8, reinterpret_cast<const uint4*>(pack.rowTerms) + ((size_t) other0 * H + head) * 2,
                              (size_t) H * 2, OtherRows, 2);
        copyRows<Threads>(reinterpret_cast<uint32_t*>(info->range), 0, reinterpret_cast<const uint4*>(pack.rowRanges) + other0, 0, 1, OtherRows);
        commitCopies();
    };
    if (firstTile < lastTile)
        stageTile(firstTile, 0);

    float acc[AccTiles][4] = {};
    float pointAcc[MaxPointTiles][4] = {};
    float rowSum[2] = {0.0f, 0.0f}, centreSum[2][3] = {}, weightGrad = 0.0f;
    const int pointTiles = pack.pointBlock / 8;
    const int scalarSteps = pack.scalarColumns / 16, keySteps = pack.keyColumns / 16, valueSteps = (width + 15) / 16;
    const FragmentLanes keyLanes(layout.keyStride), ownValueLanes(layout.ownValueStride), otherValueLanes(layout.otherValueStride);
    const unsigned ownKeyFragments = sharedAddress(ownKey), ownValueFragments = sharedAddress(ownValue);

    // The other tile's centre and common segment, loaded one tile ahead: no global load latency between
    // a tile's barrier and its products.
    float nextCentre[3] = {0.0f, 0.0f, 0.0f};
    int nextSegment = INT_MIN;
    auto loadTileFacts = [&](int tile) {
        const int other0 = tile * OtherRows;
        const float* centre = querySide ? pack.keyCentres + ((size_t) (other0 / TensorCoreKeyTile) * H + head) * 3
                                        : pack.queryCentres + ((size_t) (other0 / TensorCoreQueryTile) * H + head) * 3;
        for (int k = 0; k < 3; k++)
            nextCentre[k] = centre[k];
        nextSegment = pack.tileSegments[tile];
    };
    if (firstTile < lastTile)
        loadTileFacts(firstTile);

    for (int tile = firstTile; tile < lastTile; tile++) {
        const int other0 = tile * OtherRows, buffer = (tile - firstTile) & 1;
        const float otherCentre[3] = {nextCentre[0], nextCentre[1], nextCentre[2]};
        const int tileSegment = nextSegment;
        if (tile + 1 < lastTile)
            loadTileFacts(tile + 1);
        waitCopies();
        __syncthreads(); // this tile has landed, and every warp is done with the other buffer
        if (tile + 1 < lastTile)
            stageTile(tile + 1, buffer ^ 1);
        const uint32_t* otherKeyWords = words + layout.buffers + buffer * layout.bufferWords;
        const unsigned otherKey = sharedAddress(otherKeyWords), otherValue = otherKey + 4u * layout.otherValue;
        const OtherRowInfo& info = *reinterpret_cast<const OtherRowInfo*>(otherKeyWords + layout.info);
        float d[3], keyCentre[3];
        for (int k = 0; k < 3; k++) {
            const float other = otherCentre[k];
            d[k] = querySide ? ownC[k] - other : other - ownC[k]; // query tile centre - key tile centre
            keyCentre[k] = querySide ? other : ownC[k];
        }
        const float dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];

        // Scalar logits and the point cross term a.b, each 16 own rows x 32 other rows per warp.
        float s[4][4] = {}, cross[4][4] = {};
        auto multiplyKeyStep = [&](float(&target)[4][4], int ks) {
            uint32_t a[4];
            loadA(a, ownKeyFragments, keyLanes, layout.keyStride, warp * 16, ks);
            multiplyKStep(target, a, otherKey, keyLanes, layout.keyStride, ks);
        };
        for (int ks = 0; ks < scalarSteps; ks++)
            multiplyKeyStep(s, ks);
        for (int ks = scalarSteps; ks < keySteps; ks++)
            multiplyKeyStep(cross, ks);
        // Probabilities (into s) and -D/2 (into cross). Rows of the accumulators are own rows; bit
        // 8 h + 2 nt + e of `valid` says whether element (h, nt, e) is a pair that attends.
        const bool wholeTile = uniformRows && tileSegment == uniformSegment && (!querySide || (other0 >= uniformBegin && other0 + OtherRows <= uniformEnd));
        unsigned valid = 0;
        float ownTerm[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            // The own row's share of -D/2: the query part carries P d.d.
            const float ownDot = d[0] * ownStat[h][1] + d[1] * ownStat[h][2] + d[2] * ownStat[h][3];
            ownTerm[h] = querySide ? -0.5f * (ownStat[h][0] + pointCount * dd + 2.0f * ownDot) : -0.5f * (ownStat[h][0] - 2.0f * ownDot);
        }
        // Other rows outermost: each one's staged values are read once for both own rows.
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = nt * 8 + 2 * t + e;
                const float4 stat = info.stat[j];
                const float otherDot = d[0] * stat.y + d[1] * stat.z + d[2] * stat.w;
                const float otherTerm = querySide ? -0.5f * (stat.x - 2.0f * otherDot) : -0.5f * (stat.x + pointCount * dd + 2.0f * otherDot);
                const int4 otherRange = wholeTile ? make_int4(0, 0, 0, 0) : info.range[j];
                const float otherLse = querySide ? 0.0f : info.terms[j][0].x;
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    bool ok = true;
                    if (!wholeTile) {
                        const int querySegment = querySide ? ownSegment[h] : otherRange.x;
                        const int begin = querySide ? ownBegin[h] : otherRange.y, end = querySide ? ownEnd[h] : otherRange.z;
                        const int key = querySide ? other0 + j : ownRow[h];
                        const int keySegment = querySide ? otherRange.x : ownSegment[h];
                        ok = querySegment >= 0 && key >= begin && key < end && keySegment == querySegment;
                    }
                    valid |= (ok ? 1u : 0u) << (8 * h + 2 * nt + e);
                    float& x = s[nt][2 * h + e];
                    float& halfNegD = cross[nt][2 * h + e];
                    halfNegD += ownTerm[h] + otherTerm;
                    const float lse = querySide ? ownLse[h] : otherLse;
                    x = ok ? exp2Flushed(Log2E * (x + w * halfNegD - lse)) : 0.0f;
                }
            }

        if (!valueSide) {
            // dP = dOut . V (the value points' centre share in fp32), then dS = P (dP - delta) into s.
            float dp[4][4] = {};
            for (int ks = 0; ks < valueSteps; ks++) {
                uint32_t a[4];
                loadA(a, ownValueFragments, ownValueLanes, layout.ownValueStride, warp * 16, ks);
                multiplyKStep(dp, a, otherValue, otherValueLanes, layout.otherValueStride, ks);
            }
            float partial[2] = {0.0f, 0.0f};
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int j = nt * 8 + 2 * t + e;
                    float otherShare = 0.0f, otherDelta = 0.0f;
                    if (!querySide) {
                        const float4 first = info.terms[j][0], second = info.terms[j][1];
                        otherShare = first.z * keyCentre[0] + first.w * keyCentre[1] + second.x * keyCentre[2];
                        otherDelta = first.y;
                    }
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const float share = querySide ? ownGradSum[h][0] * keyCentre[0] + ownGradSum[h][1] * keyCentre[1] + ownGradSum[h][2] * keyCentre[2]
                                                      : otherShare;
                        const float rowDelta = querySide ? ownDelta[h] : otherDelta;
                        const bool ok = (valid >> (8 * h + 2 * nt + e)) & 1u;
                        float& x = s[nt][2 * h + e];
                        x = ok ? x * (dp[nt][2 * h + e] + share - rowDelta) : 0.0f;
                        partial[h] += x;
                        if (querySide && ok)
                            weightGrad = fmaf(x, cross[nt][2 * h + e], weightGrad);
                    }
                }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                rowSum[h] += partial[h];
                for (int k = 0; k < 3; k++)
                    centreSum[h][k] = fmaf(partial[h], d[k], centreSum[h][k]);
            }
        }

        // acc += (dS or P) . (other rows): the accumulators re-packed as A operands, k = other rows.
        const unsigned productTile = valueSide ? otherValue : otherKey;
        const int productStride = valueSide ? layout.otherValueStride : layout.keyStride;
        const FragmentLanes& productLanes = valueSide ? otherValueLanes : keyLanes;
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            const uint32_t a0 = packHalf2(s[2 * kk][0], s[2 * kk][1]), a1 = packHalf2(s[2 * kk][2], s[2 * kk][3]);
            const uint32_t a2 = packHalf2(s[2 * kk + 1][0], s[2 * kk + 1][1]), a3 = packHalf2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int np = 0; np < AccTiles / 2; np++) {
                uint32_t b[4];
                loadBTransposed(b, productTile, productLanes, productStride, 16 * kk, 16 * np);
                mma(acc[2 * np], a0, a1, a2, a3, b[0], b[1]);
                mma(acc[2 * np + 1], a0, a1, a2, a3, b[2], b[3]);
            }
            if (!valueSide) {
                // Points of the other side: hi and lo blocks ([b_hi | b_hi | b_lo] or [a_hi | a_lo | a_hi]).
                const int hiColumn = pack.scalarColumns, loColumn = pack.scalarColumns + (querySide ? 2 : 1) * pack.pointBlock;
#pragma unroll
                for (int pt = 0; pt < MaxPointTiles; pt++)
                    if (pt < pointTiles) {
                        uint32_t b[2];
                        loadBTransposedOne(b, otherKey, keyLanes, layout.keyStride, 16 * kk, hiColumn + 8 * pt);
                        mma(pointAcc[pt], a0, a1, a2, a3, b[0], b[1]);
                        loadBTransposedOne(b, otherKey, keyLanes, layout.keyStride, 16 * kk, loColumn + 8 * pt);
                        mma(pointAcc[pt], a0, a1, a2, a3, b[0], b[1]);
                    }
            }
        }
    }
    waitCopies(); // nothing may still be landing when the block ends

    if constexpr (valueSide) {
        const int chunkColumns = min(8 * AccTiles, width - chunk0);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (ownRow[h] >= p.rows)
                continue;
            float* target = grads.liftedValue + ((size_t) ownRow[h] * H + head) * width + chunk0;
#pragma unroll
            for (int nt = 0; nt < AccTiles; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = nt * 8 + 2 * t + e;
                    if (col < chunkColumns)
                        target[col] = acc[nt][2 * h + e];
                }
        }
        return;
    } else {
    // Row sums over the four lanes that share a row.
#pragma unroll
    for (int h = 0; h < 2; h++)
        for (int offset = 1; offset <= 2; offset <<= 1) {
            rowSum[h] += __shfl_xor_sync(0xffffffffu, rowSum[h], offset);
            for (int k = 0; k < 3; k++)
                centreSum[h][k] += __shfl_xor_sync(0xffffffffu, centreSum[h][k], offset);
        }
    const int keyWidth = p.liftedKeyDim(), coordinates = 3 * p.queryPoints;
    float* liftedGrad = querySide ? grads.liftedQuery : grads.liftedKey;
    float* pointGrad = querySide ? grads.queryPoints : grads.keyPoints;
    const float* points = querySide ? p.queryPointsGlobal : p.keyPointsGlobal;
    const float sign = querySide ? 1.0f : -1.0f;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (ownSegment[h] < 0)
            continue;
        const size_t index = (size_t) ownRow[h] * H + head;
#pragma unroll
        for (int nt = 0; nt < AccTiles; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = nt * 8 + 2 * t + e;
                if (col < keyWidth)
                    liftedGrad[index * keyWidth + col] = acc[nt][2 * h + e];
            }
        // -w (own_rel * rowSum - sum dS other_rel + sign * sum dS d), sign +1 for queries, -1 for keys.
#pragma unroll
        for (int pt = 0; pt < MaxPointTiles; pt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = pt * 8 + 2 * t + e;
                if (pt < pointTiles && col < coordinates) {
                    // Selects, not a run-time index: register arrays stay in registers.
                    const int axis = col % 3;
                    const float centre = axis == 0 ? ownC[0] : (axis == 1 ? ownC[1] : ownC[2]);
                    const float shift = axis == 0 ? centreSum[h][0] : (axis == 1 ? centreSum[h][1] : centreSum[h][2]);
                    const float relative = points[index * coordinates + col] - centre;
                    pointGrad[index * coordinates + col] = -w * (relative * rowSum[h] - pointAcc[pt][2 * h + e] + sign * shift);
                }
            }
    }
    if (querySide) {
        for (int offset = 16; offset > 0; offset >>= 1)
            weightGrad += __shfl_xor_sync(0xffffffffu, weightGrad, offset);
        if (lane == 0)
            warpSums[warp] = weightGrad;
        __syncthreads();
        if (threadIdx.x == 0) {
            float sum = 0.0f;
            for (int i = 0; i < Warps; i++)
                sum += warpSums[i];
            atomicAdd(grads.pointWeight + head, sum);
        }
    }
    } // the query and key sides
}

int scalarTiles(int liftedKeyDim) {
    const int columns = tensorCoreBackwardScalarColumns(liftedKeyDim);
    return columns / 8;
}

template <Side side, int AccTiles>
void launchSide(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack,
                const FusedAttentionGradients& g, cudaStream_t stream, int chunks) {
    const size_t bytes = (size_t) BackwardLayout(pack, p.liftedValueDim(), side, AccTiles).words * 4;
    auto kernel = fusedAttentionBackwardTensorCore<side, AccTiles>;
    allowSharedMemory(kernel, bytes, "tensor-core backward: shared memory");
    const dim3 grid(pack.paddedRows / OwnRows, p.heads, chunks);
    kernel<<<grid, Threads, bytes, stream>>>(p, pack, g);
    checkLaunch(cudaGetLastError(), "tensor-core backward");
}

template <int ScalarTiles>
void launchKeySides(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack,
                    const FusedAttentionGradients& g, cudaStream_t stream) {
    launchSide<Side::Query, ScalarTiles>(p, pack, g, stream, 1);
    launchSide<Side::Key, ScalarTiles>(p, pack, g, stream, 1);
}

template <int ValueTiles>
void launchValueSide(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack,
                     const FusedAttentionGradients& g, cudaStream_t stream) {
    const int chunks = (p.liftedValueDim() + 8 * ValueTiles - 1) / (8 * ValueTiles);
    launchSide<Side::Value, ValueTiles>(p, pack, g, stream, chunks);
}

/** Shared memory of the widest of the three launches. */
size_t backwardBytes(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack) {
    const int width = p.liftedValueDim(), valueTiles = tensorCoreValueChunk(width) / 8;
    const size_t keySides = (size_t) BackwardLayout(pack, width, Side::Query, scalarTiles(p.liftedKeyDim())).words * 4;
    const size_t values = (size_t) BackwardLayout(pack, width, Side::Value, valueTiles).words * 4;
    return keySides > values ? keySides : values;
}

} // namespace

int tensorCoreBackwardScalarColumns(int liftedKeyDim) {
    // Accumulator tiles are compile-time: 8, 16, 18 (the published c + Rb = 130) or 24 tiles of 8 columns.
    for (int tiles : {8, 16, 18, 24})
        if (liftedKeyDim <= 8 * tiles)
            return 8 * tiles;
    return 0;
}

bool tensorCoreBackwardApplies(const FusedAttentionProblem& p) {
    const DeviceFacts device = currentDeviceFacts();
    const int major = device.major, limit = device.sharedMemoryOptin;
    if (major < 8 || p.element != ElementType::Float16 || tensorCoreBackwardScalarColumns(p.liftedKeyDim()) == 0 ||
        3 * p.queryPoints > 8 * MaxPointTiles)
        return false;
    TensorCoreBackwardPack pack; // the packing's widths, as packForTensorCoreBackward chooses them
    pack.scalarColumns = tensorCoreBackwardScalarColumns(p.liftedKeyDim());
    pack.pointBlock = (3 * p.queryPoints + 7) / 8 * 8;
    pack.keyColumns = pack.scalarColumns + (3 * pack.pointBlock + 15) / 16 * 16;
    return backwardBytes(p, pack) + 1024 <= (size_t) limit;
}

bool launchFusedAttentionBackwardTensorCore(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack, const FusedAttentionGradients& g,
                                            cudaStream_t stream) {
    validateProblem(p);
    if (pack.layout != TensorCoreBackwardPack::Layout::Rows)
        throw std::invalid_argument("fused FlashIPA attention: the mma.sync backward reads operands packed as rows");
    if (p.rows == 0 || !tensorCoreBackwardApplies(p))
        return false;
    switch (scalarTiles(p.liftedKeyDim())) {
    case 8:
        launchKeySides<8>(p, pack, g, stream);
        break;
    case 16:
        launchKeySides<16>(p, pack, g, stream);
        break;
    case 18:
        launchKeySides<18>(p, pack, g, stream);
        break;
    default:
        launchKeySides<24>(p, pack, g, stream);
    }
    switch (tensorCoreValueChunk(p.liftedValueDim())) {
    case 64:
        launchValueSide<8>(p, pack, g, stream);
        break;
    case 128:
        launchValueSide<16>(p, pack, g, stream);
        break;
    default:
        launchValueSide<32>(p, pack, g, stream);
    }
    return true;
}

} // namespace kernels
} // namespace FlashIPAPlugin
