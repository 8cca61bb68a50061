// Backward pass of the fused FlashIPA attention with Hopper warpgroup products (wgmma, sm_90a). The
// algorithm, the three launches and the exact treatment of points far from the origin are those of the
// mma.sync backward (FusedAttentionBackwardTensorCore.cu, whose header derives them); what changes is how
// the products are issued, as in the wgmma forward (FusedAttentionForwardWgmma.cu):
//  - a block owns 128 rows of one side, a warpgroup of 4 warps per 64 rows (one query tile on the query
//    side; one key tile, with its own centre, per warpgroup on the key and value sides), and streams the
//    other side in tiles of 64 rows (a key tile, or half a query tile);
//  - the logits, the point cross term and dP = dOut . V are wgmma with both operands read from shared
//    memory (the own tile and the other side's tile, K-major core-matrix tiles); dP is issued behind the
//    logits and runs on the tensor cores while the probabilities are computed;
//  - the gradient products (dS or P) . (other rows) take dS from registers and read the other side's
//    tile N-major, the same bytes the logits read K-major: one packed copy of every operand serves both.
// Shared memory: the own rows (operands of both products) stay for the whole block; the other side's key
// rows and per-row facts are double-buffered, its value (or dOut) rows double-buffered where that fits
// (the value side) and single-buffered on the query and key sides, refilled once every warpgroup's dP has
// read them.
#include "FusedAttentionForwardSteps.cuh"
#include "FusedAttentionWgmma.cuh"

namespace FlashIPAPlugin {
namespace kernels {

namespace {

constexpr int Warps = 8;
constexpr int Threads = 32 * Warps;
constexpr int OwnRows = 128;  // two warpgroups of 64
constexpr int OtherRows = 64; // one 64-column wgmma per logit tile, four k-steps per gradient product
constexpr int MaxPointTiles = 4;
static_assert(OwnRows == TensorCoreQueryTile && OtherRows == TensorCoreKeyTile, "tiles are the forward's centre tiles");

enum class Side { Query, Key, Value };

/** Per-row facts of a staged tile of the other side, copied by cp.async from the pack's row arrays. */
struct OtherRowInfo {
    float4 stat[OtherRows];     // sum |p|^2, sum p (x, y, z) relative to the row's tile centre
    float4 terms[OtherRows][2]; // log-sum-exp, delta, sum over value points of dOut (x, y, z), 0, 0, 0
    int4 range[OtherRows];      // segment (-1: padding), key range begin, end, 0
};
static_assert(sizeof(OtherRowInfo) % 128 == 0, "keeps the next buffer aligned for the tensor cores");

/** Shared-memory geometry in bytes. */
struct Layout {
    int keyTileBytes, valueTileBytes;
    int ownKey, ownValue, keyBuffers, keyBufferBytes, info, valueBuffers, bytes;

    __host__ __device__ Layout(const TensorCoreBackwardPack& pack, Side side, int valueBufferCount) {
        keyTileBytes = OtherRows * pack.keyColumns * 2;
        valueTileBytes = OtherRows * pack.valueColumns * 2;
        ownKey = 0;
        ownValue = ownKey + 2 * keyTileBytes;
        keyBuffers = ownValue + (side == Side::Value ? 0 : 2 * valueTileBytes);
        info = keyTileBytes; // inside a key buffer
        keyBufferBytes = keyTileBytes + (int) sizeof(OtherRowInfo);
        valueBuffers = keyBuffers + 2 * keyBufferBytes;
        bytes = valueBuffers + valueBufferCount * valueTileBytes;
    }
};

/** The accumulators of n-tiles first .. first + 8 N / 64 - 1 as the register array of one 64 x N wgmma. */
template <int N, int Tiles>
__device__ __forceinline__ float (&tilesOf(float (&acc)[Tiles][4], int first))[N / 2] {
    return *reinterpret_cast<float(*)[N / 2]>(&acc[first][0]);
}

/** acc (64 x 8 Tiles) += A (registers) x columns column0 .. of an N-major tile, in wgmma of 64 columns and a 16-column tail. */
template <int Tiles>
__device__ __forceinline__ void multiplyColumns(float (&acc)[Tiles][4], const uint32_t (&a)[4], uint64_t tile) {
    static_assert(Tiles % 8 == 0 || Tiles % 8 == 2, "64-column products and at most one 16-column tail");
#pragma unroll
    for (int c = 0; c < Tiles / 8; c++)
        wgmmaRegisterA<1>(tilesOf<64>(acc, 8 * c), a[0], a[1], a[2], a[3], advance(tile, 64u * 16u * c));
    if constexpr (Tiles % 8 == 2)
        wgmmaRegisterA<1>(tilesOf<16>(acc, Tiles - 2), a[0], a[1], a[2], a[3], advance(tile, 64u * 16u * (Tiles / 8)));
}

/** pointAcc (64 x 8 tiles) += A x the point columns at `tile`: one wgmma of 8, 16, 24 or 32 columns. */
[[maybe_unused]] __device__ __forceinline__ void multiplyPoints(float (&pointAcc)[MaxPointTiles][4], const uint32_t (&a)[4], uint64_t tile, int tiles) {
    switch (tiles) {
    case 1:
        wgmmaRegisterA<1>(tilesOf<8>(pointAcc, 0), a[0], a[1], a[2], a[3], tile);
        break;
    case 2:
        wgmmaRegisterA<1>(tilesOf<16>(pointAcc, 0), a[0], a[1], a[2], a[3], tile);
        break;
    case 3:
        wgmmaRegisterA<1>(tilesOf<24>(pointAcc, 0), a[0], a[1], a[2], a[3], tile);
        break;
    case 4:
        wgmmaRegisterA<1>(tilesOf<32>(pointAcc, 0), a[0], a[1], a[2], a[3], tile);
        break;
    default:
        break; // no query points
    }
}

template <Side side, int AccTiles>
__global__ void __launch_bounds__(Threads, 1) fusedAttentionBackwardWgmma(FusedAttentionProblem p, TensorCoreBackwardPack pack,
                                                                          FusedAttentionGradients grads, int valueBufferCount) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr bool querySide = side == Side::Query, valueSide = side == Side::Value;
    extern __shared__ __align__(128) uint4 sharedVectors[];
    char* shared = reinterpret_cast<char*>(sharedVectors);
    const unsigned base = sharedAddress(shared);
    __shared__ int range[7]; // min begin, max end, max begin, min end, min segment, max segment, real rows
    __shared__ float warpSums[Warps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warpgroup = warpUniform(warp / 4);
    const int own0 = blockIdx.x * OwnRows, head = blockIdx.y, H = p.heads;
    const int width = p.liftedValueDim();
    const Layout layout(pack, side, valueBufferCount);
    const int keyColumns = pack.keyColumns, valueColumns = pack.valueColumns;
    const float w = p.pointWeight[head], pointCount = (float) p.queryPoints;
    const int keyTileVectors = layout.keyTileBytes / 16, valueTileVectors = layout.valueTileBytes / 16;
    // Packed operands are [rows / 64, H, tile]: tile `tile` of this head.
    auto keyTile = [&](const void* packed, int tile) { return static_cast<const uint4*>(packed) + ((size_t) tile * H + head) * keyTileVectors; };
    auto valueTile = [&](const void* packed, int tile) { return static_cast<const uint4*>(packed) + ((size_t) tile * H + head) * valueTileVectors; };
    const void* ownKeys = querySide ? pack.queries : pack.keys;
    const void* otherKeys = querySide ? pack.keys : pack.queries;
    const void* ownValues = querySide ? pack.gradOut : pack.values;
    const void* otherValues = querySide ? pack.values : pack.gradOut;

    if (threadIdx.x == 0) {
        range[0] = range[3] = range[4] = INT_MAX;
        range[1] = range[2] = range[5] = INT_MIN;
        range[6] = 0;
    }
    __syncthreads();
    for (int half = 0; half < 2; half++) {
        copyContiguous<Threads>(base + layout.ownKey + half * layout.keyTileBytes, keyTile(ownKeys, own0 / OtherRows + half), keyTileVectors);
        if (!valueSide)
            copyContiguous<Threads>(base + layout.ownValue + half * layout.valueTileBytes, valueTile(ownValues, own0 / OtherRows + half),
                                    valueTileVectors);
    }
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

    // This thread's own rows: g and g + 8 of its warp's 16 (warp w of the block holds rows 16 w ..).
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
    // The query side's rows share one centre; on the key sides each warpgroup's 64 keys are one key tile.
    const float* ownCentre = querySide ? pack.queryCentres + ((size_t) (own0 / TensorCoreQueryTile) * H + head) * 3
                                       : pack.keyCentres + ((size_t) (own0 / TensorCoreKeyTile + warpgroup) * H + head) * 3;
    const float ownC[3] = {ownCentre[0], ownCentre[1], ownCentre[2]};
    __syncthreads();
    const int firstTile = range[0] == INT_MAX ? 0 : range[0] / OtherRows;
    const int lastTile = range[0] == INT_MAX ? 0 : (range[1] + OtherRows - 1) / OtherRows;
    // All own rows real, of one segment and one key range: tiles of that segment need no mask.
    const bool uniformRows = range[6] == OwnRows && range[4] == range[5] && range[0] == range[2] && range[1] == range[3];
    const int uniformBegin = range[0], uniformEnd = range[1], uniformSegment = range[4];

    // Starts copying the other side's key rows and row facts of a tile into a key buffer (one commit group).
    auto stageKeys = [&](int tile, int buffer) {
        const int offset = layout.keyBuffers + buffer * layout.keyBufferBytes;
        const int other0 = tile * OtherRows;
        copyContiguous<Threads>(base + offset, keyTile(otherKeys, tile), keyTileVectors);
        OtherRowInfo* info = reinterpret_cast<OtherRowInfo*>(shared + offset + layout.info);
        const float* stats = querySide ? pack.keyStats : pack.queryStats;
        copyRows<Threads>(reinterpret_cast<uint32_t*>(info->stat), 4, reinterpret_cast<const uint4*>(stats) + (size_t) other0 * H + head, H,
                          OtherRows, 1);
        if (!querySide)
            copyRows<Threads>(reinterpret_cast<uint32_t*>(info->terms), 8, reinterpret_cast<const uint4*>(pack.rowTerms) + ((size_t) other0 * H + head) * 2,
                              (size_t) H * 2, OtherRows, 2);
        copyRows<Threads>(reinterpret_cast<uint32_t*>(info->range), 0, reinterpret_cast<const uint4*>(pack.rowRanges) + other0, 0, 1, OtherRows);
        commitCopies();
    };
    // Starts copying the other side's value (or dOut) rows of a tile into a value buffer (one commit group).
    auto stageValues = [&](int tile, int buffer) {
        copyContiguous<Threads>(base + layout.valueBuffers + buffer * layout.valueTileBytes, valueTile(otherValues, tile), valueTileVectors);
        commitCopies();
    };
    if (firstTile < lastTile) {
        stageKeys(firstTile, 0);
        stageValues(firstTile, 0);
    }

    float acc[AccTiles][4] = {};
    float pointAcc[MaxPointTiles][4] = {};
    float rowSum[2] = {0.0f, 0.0f}, centreSum[2][3] = {}, weightGrad = 0.0f;
    const int pointTiles = pack.pointBlock / 8;
    const int scalarSteps = pack.scalarColumns / 16, keySteps = keyColumns / 16, valueSteps = (width + 15) / 16;
    const uint64_t ownKeyDescriptor = tileDescriptor(base + layout.ownKey + warpgroup * layout.keyTileBytes, keyColumns);
    const uint64_t ownValueDescriptor = tileDescriptor(base + layout.ownValue + warpgroup * layout.valueTileBytes, valueColumns);
    const unsigned hiColumn = pack.scalarColumns, loColumn = pack.scalarColumns + (querySide ? 2 : 1) * pack.pointBlock;

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
        const int other0 = tile * OtherRows, buffer = (tile - firstTile) & 1, valueBuffer = valueBufferCount == 2 ? buffer : 0;
        const float otherCentre[3] = {nextCentre[0], nextCentre[1], nextCentre[2]};
        const int tileSegment = nextSegment;
        if (tile + 1 < lastTile)
            loadTileFacts(tile + 1);
        waitCopies();
        fenceSharedForTensorCores(); // the copies are read by the tensor cores next
        __syncthreads();             // this tile has landed, and every warpgroup is done with the other key buffer
        if (tile + 1 < lastTile) {
            stageKeys(tile + 1, buffer ^ 1);
            if (valueBufferCount == 2)
                stageValues(tile + 1, buffer ^ 1);
        }
        const int keyOffset = layout.keyBuffers + buffer * layout.keyBufferBytes;
        const unsigned otherKey = base + keyOffset, otherValue = base + layout.valueBuffers + valueBuffer * layout.valueTileBytes;
        const OtherRowInfo& info = *reinterpret_cast<const OtherRowInfo*>(shared + keyOffset + layout.info);
        float d[3], keyCentre[3];
        for (int k = 0; k < 3; k++) {
            const float other = otherCentre[k];
            d[k] = querySide ? ownC[k] - other : other - ownC[k]; // query tile centre - key tile centre
            keyCentre[k] = querySide ? other : ownC[k];
        }
        const float dd = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];

        // Scalar logits and the point cross term a.b (64 own x 64 other rows per warpgroup), then dP
        // behind them: the tensor cores compute dP while the probabilities are formed.
        float s[8][4], cross[8][4], dp[8][4];
        float(&logits)[32] = tilesOf<64>(s, 0);
        float(&crossTerms)[32] = tilesOf<64>(cross, 0);
        const uint64_t otherKeyDescriptor = tileDescriptor(otherKey, keyColumns);
        if (keySteps == scalarSteps)
#pragma unroll
            for (int i = 0; i < 32; i++)
                crossTerms[i] = 0.0f; // no query points
        wgmmaFence();
#pragma unroll 1
        for (int ks = 0; ks < scalarSteps; ks++)
            wgmma64x64(logits, advance(ownKeyDescriptor, 256u * ks), advance(otherKeyDescriptor, 256u * ks), ks > 0);
#pragma unroll 1
        for (int ks = scalarSteps; ks < keySteps; ks++)
            wgmma64x64(crossTerms, advance(ownKeyDescriptor, 256u * ks), advance(otherKeyDescriptor, 256u * ks), ks > scalarSteps);
        wgmmaCommit();
        if constexpr (!valueSide) {
            float(&valueProducts)[32] = tilesOf<64>(dp, 0);
            const uint64_t otherValueDescriptor = tileDescriptor(otherValue, valueColumns);
#pragma unroll 1
            for (int ks = 0; ks < valueSteps; ks++)
                wgmma64x64(valueProducts, advance(ownValueDescriptor, 256u * ks), advance(otherValueDescriptor, 256u * ks), ks > 0);
            wgmmaCommit();
            wgmmaWait<1>(); // the logits; dP may still run
        } else {
            wgmmaWait<0>();
        }
        fenceRegisters(logits);
        fenceRegisters(crossTerms);

        // Probabilities (into s) and -D/2 (into cross). Rows of the accumulators are own rows; bit
        // 16 h + 2 nt + e of `valid` says whether element (h, nt, e) is a pair that attends.
        const bool wholeTile = uniformRows && tileSegment == uniformSegment && (!querySide || (other0 >= uniformBegin && other0 + OtherRows <= uniformEnd));
        unsigned valid = 0;
        float ownTerm[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            // The own row's share of -D/2: the query part carries P d.d.
            const float ownDot = d[0] * ownStat[h][1] + d[1] * ownStat[h][2] + d[2] * ownStat[h][3];
            ownTerm[h] = querySide ? -0.5f * (ownStat[h][0] + pointCount * dd + 2.0f * ownDot) : -0.5f * (ownStat[h][0] - 2.0f * ownDot);
        }
        // Other rows outermost: each one's staged facts are read once for both own rows.
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
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
                    valid |= (ok ? 1u : 0u) << (16 * h + 2 * nt + e);
                    float& x = s[nt][2 * h + e];
                    float& halfNegD = cross[nt][2 * h + e];
                    halfNegD += ownTerm[h] + otherTerm;
                    const float lse = querySide ? ownLse[h] : otherLse;
                    x = ok ? exp2Flushed(Log2E * (x + w * halfNegD - lse)) : 0.0f;
                }
            }

        if constexpr (!valueSide) {
            wgmmaWait<0>();
            fenceRegisters(tilesOf<64>(dp, 0));
            if (valueBufferCount == 1 && tile + 1 < lastTile) {
                __syncthreads(); // every warpgroup's dP has read the value buffer
                stageValues(tile + 1, 0);
            }
            // dS = P (dP + the value points' centre share - delta) into s.
            float partial[2] = {0.0f, 0.0f};
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
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
                        const bool ok = (valid >> (16 * h + 2 * nt + e)) & 1u;
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

        // acc += (dS or P) . (other rows), the other tile read N-major; k = the other tile's rows.
        wgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[4];
            probabilityFragment(a, s, kk);
            if constexpr (valueSide) {
                multiplyColumns(acc, a, advance(transposedTileDescriptor(otherValue, valueColumns), 32u * valueColumns * kk));
            } else {
                const uint64_t rows = advance(transposedTileDescriptor(otherKey, keyColumns), 32u * keyColumns * kk);
                multiplyColumns(acc, a, rows);
                // Points of the other side: hi and lo blocks ([b_hi | b_hi | b_lo] or [a_hi | a_lo | a_hi]).
                multiplyPoints(pointAcc, a, advance(rows, 16u * hiColumn), pointTiles);
                multiplyPoints(pointAcc, a, advance(rows, 16u * loColumn), pointTiles);
            }
        }
        wgmmaCommit();
        wgmmaWait<0>();
#pragma unroll
        for (int nt = 0; nt < AccTiles; nt++)
            fenceRegisters(acc[nt]);
#pragma unroll
        for (int pt = 0; pt < MaxPointTiles; pt++)
            fenceRegisters(pointAcc[pt]);
    }
    waitCopies(); // nothing may still be landing when the block ends

    if constexpr (valueSide) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            if (ownRow[h] >= p.rows)
                continue;
            float* target = grads.liftedValue + ((size_t) ownRow[h] * H + head) * width;
#pragma unroll
            for (int nt = 0; nt < AccTiles; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = nt * 8 + 2 * t + e;
                    if (col < width)
                        target[col] = acc[nt][2 * h + e];
                }
        }
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
    }
#else
    __trap(); // built for sm_90a only; wgmmaBackwardApplies keeps other devices away
#endif
}

/** Value buffers that fit: two where the block's shared memory allows, else one (0: the launch does not fit). */
int valueBuffersThatFit(const TensorCoreBackwardPack& pack, Side side, int limit) {
    const size_t staticBytes = 7 * sizeof(int) + Warps * sizeof(float) + 1024; // range, warpSums and a margin
    for (int count : {2, 1})
        if ((size_t) Layout(pack, side, count).bytes + staticBytes <= (size_t) limit)
            return count;
    return 0;
}

template <Side side, int AccTiles>
void launchSide(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack, const FusedAttentionGradients& g, cudaStream_t stream) {
    const int buffers = valueBuffersThatFit(pack, side, currentDeviceFacts().sharedMemoryOptin);
    const size_t bytes = (size_t) Layout(pack, side, buffers).bytes;
    auto kernel = fusedAttentionBackwardWgmma<side, AccTiles>;
    allowSharedMemory(kernel, bytes, "wgmma backward: shared memory");
    const dim3 grid(pack.paddedRows / OwnRows, p.heads);
    kernel<<<grid, Threads, bytes, stream>>>(p, pack, g, buffers);
    checkLaunch(cudaGetLastError(), "wgmma backward");
}

template <int ScalarTiles>
void launchKeySides(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack, const FusedAttentionGradients& g, cudaStream_t stream) {
    launchSide<Side::Query, ScalarTiles>(p, pack, g, stream);
    launchSide<Side::Key, ScalarTiles>(p, pack, g, stream);
}

} // namespace

int wgmmaBackwardValueColumns(int liftedValueDim) {
    const int columns = (liftedValueDim + 63) / 64 * 64;
    return columns <= 256 ? columns : 0;
}

bool wgmmaBackwardApplies(const FusedAttentionProblem& p) {
    const DeviceFacts device = currentDeviceFacts();
    if (device.major != 9 || device.minor != 0 || p.element != ElementType::Float16 || tensorCoreBackwardScalarColumns(p.liftedKeyDim()) == 0 ||
        3 * p.queryPoints > 8 * MaxPointTiles || wgmmaBackwardValueColumns(p.liftedValueDim()) == 0)
        return false;
    TensorCoreBackwardPack pack; // the widths the packing will choose
    pack.scalarColumns = tensorCoreBackwardScalarColumns(p.liftedKeyDim());
    pack.pointBlock = (3 * p.queryPoints + 7) / 8 * 8;
    pack.keyColumns = pack.scalarColumns + (3 * pack.pointBlock + 15) / 16 * 16;
    pack.valueColumns = wgmmaBackwardValueColumns(p.liftedValueDim());
    for (Side side : {Side::Query, Side::Key, Side::Value})
        if (valueBuffersThatFit(pack, side, device.sharedMemoryOptin) == 0)
            return false;
    return true;
}

bool launchFusedAttentionBackwardWgmma(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack, const FusedAttentionGradients& g,
                                       cudaStream_t stream) {
    validateProblem(p);
    if (pack.layout != TensorCoreBackwardPack::Layout::CoreMatrixTiles)
        throw std::invalid_argument("fused FlashIPA attention: the wgmma backward reads operands packed as core-matrix tiles");
    if (p.rows == 0 || !wgmmaBackwardApplies(p))
        return false;
    switch (pack.scalarColumns / 8) {
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
    switch (pack.valueColumns / 8) {
    case 8:
        launchSide<Side::Value, 8>(p, pack, g, stream);
        break;
    case 16:
        launchSide<Side::Value, 16>(p, pack, g, stream);
        break;
    case 24:
        launchSide<Side::Value, 24>(p, pack, g, stream);
        break;
    default:
        launchSide<Side::Value, 32>(p, pack, g, stream);
    }
    return true;
}

} // namespace kernels
} // namespace FlashIPAPlugin
