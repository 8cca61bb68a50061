// Forward pass of the fused FlashIPA attention on tensor cores (fp16 operands, mma.sync m16n8k16,
// fp32 accumulation). One block of 8 warps owns 128 query rows of one head and a chunk of value
// columns; each warp owns 16 rows and streams key tiles of 64 through shared memory, copied as
// 16-byte vectors from the operands packed once per call (TensorCorePack).
//
// What runs where, and why it stays exact far from the origin (docs/MATH.md §5):
//  - scalar logits q.k and bl.br: fp16 operands on tensor cores (invariant features: how they round
//    does not depend on where the structure is);
//  - point logits. Each query point is stored relative to its query tile's centre, a = x - c_q, each
//    key point relative to its key tile's centre, b = y - c_k. With d = c_q - c_k,
//        sum_p |x_p - y_p|^2 = sum|a|^2 + sum|b|^2 + P d.d - 2 sum a.b + 2 d.sum a - 2 d.sum b.
//    Only the cross term sum a.b runs on tensor cores, with each fp32 operand split into fp16
//    hi + lo parts (a_hi b_hi + a_lo b_hi + a_hi b_lo: about 22 mantissa bits of |a| |b|); the rest
//    is fp32 per row, per key and per tile pair. Consecutive residues are neighbours in space, so
//    |a| and |b| are the size of a tile's neighbourhood wherever the structure sits and however large
//    it is; pairs of distant tiles get large errors in absolute terms only where their weights
//    underflow anyway;
//  - value points: relative to their key tile's centre c (fp16: the size of a tile's neighbourhood,
//    rounded like every other fp16 operand), plus the centre's share from extra value columns
//    [1 | c_hi | c_lo] (TensorCorePack), all normalised by the sum of the same fp16 probabilities:
//    the weights sum to one exactly, so the output moves with the structure to fp32 precision.
//    (Global coordinates packed as hi + lo instead would need twice the value-point products, and
//    the probabilities' rounding would still multiply coordinates of 100 nm.)
// Why fp16 and not bf16 operands: docs/DESIGN-DECISIONS.md ("Operand precision of the fused attention").
// The online softmax follows FlashAttention-2: probabilities stay in registers and are re-packed as
// the A operand of the P.V product (the accumulator layout of m16n8k16 matches the operand layout).
#include "FusedAttentionForwardSteps.cuh"

namespace FlashIPAPlugin {
namespace kernels {

namespace {

constexpr int Warps = 8;
constexpr int BlockRows = TensorCoreQueryTile; // 16 rows per warp
constexpr int BlockKeys = TensorCoreKeyTile;
constexpr int Threads = 32 * Warps;
constexpr int MaxValueTiles = 32;
constexpr int ValueStride = paddedWords(BlockKeys / 2); // value tiles: rows are value columns, 64 keys each
static_assert(BlockRows == 16 * Warps, "one warp per 16 query rows");

/**
 * Shared-memory geometry (offsets in 32-bit words). The key and value tiles are double-buffered:
 * the next tile is copied (cp.async) while the current one is multiplied.
 */
struct Layout {
    int keyStride, valueStride, bufferWords;
    int queryOffset, keyOffset, valueOffset, keyStatsOffset, keySegmentOffset, words;

    __host__ __device__ Layout(const TensorCorePack& pack, int valueTiles) {
        keyStride = paddedWords(pack.keyColumns / 2);
        valueStride = ValueStride;
        queryOffset = 0;
        keyOffset = queryOffset + BlockRows * keyStride;
        valueOffset = keyOffset + BlockKeys * keyStride;
        keyStatsOffset = valueOffset + 8 * valueTiles * valueStride;
        keySegmentOffset = keyStatsOffset + 4 * BlockKeys;
        bufferWords = keySegmentOffset + BlockKeys - keyOffset; // one buffer: key and value tiles, key stats, segments
        words = keyOffset + 2 * bufferWords;
    }
};

template <int ValueTiles>
__global__ void __launch_bounds__(Threads) fusedAttentionForwardTensorCore(FusedAttentionProblem p, TensorCorePack pack, float* out,
                                                                           float* logSumExp) {
    extern __shared__ uint4 sharedVectors[];
    uint32_t* words = reinterpret_cast<uint32_t*>(sharedVectors);
    __shared__ QueryRows rows;
    __shared__ __align__(16) float keyTermScratch[Warps][TensorCoreKeyTile]; // read as float2
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int queryTile = blockIdx.x, row0 = queryTile * BlockRows, head = blockIdx.y;
    const int chunk0 = 8 * ValueTiles * blockIdx.z;
    const Layout layout(pack, ValueTiles);
    uint32_t* queryWords = words + layout.queryOffset;
    const FragmentLanes keyLanes(layout.keyStride), valueLanes(ValueStride);
    const unsigned queryFragments = sharedAddress(queryWords);
    const float pointWeight = p.pointWeight[head];
    const int H = p.heads, vectorsPerRow = pack.keyColumns / 8;
    const float* queryCentreGlobal = pack.queryCentres + ((size_t) queryTile * H + head) * 3;
    const float queryCentre[3] = {queryCentreGlobal[0], queryCentreGlobal[1], queryCentreGlobal[2]};

    copyRows<Threads>(queryWords, layout.keyStride, static_cast<const uint4*>(pack.queries) + ((size_t) row0 * H + head) * vectorsPerRow,
             (size_t) H * vectorsPerRow, BlockRows, vectorsPerRow);
    const KeySpan span = describeQueryRows<Threads>(p, row0, BlockKeys, rows);
    const int keySteps = pack.keyColumns / 16;
    RowSoftmax softmax(pack, H, head, row0, warp, g);

    float acc[ValueTiles][4] = {};
    const uint4* values = static_cast<const uint4*>(pack.values) + (size_t) head * pack.valueColumns * (pack.paddedRows / 8);
    const int vectorsPerColumn = pack.paddedRows / 8;

    // Starts copying one key tile into a buffer: keys, values, the keys' point sums
    // and segments (cp.async, one commit group; nothing in the loop waits on a global load).
    auto stageTile = [&](int tile, int buffer) {
        uint32_t* base = words + layout.keyOffset + buffer * layout.bufferWords;
        const int key0 = tile * BlockKeys;
        copyRows<Threads>(base, layout.keyStride, static_cast<const uint4*>(pack.keys) + ((size_t) key0 * H + head) * vectorsPerRow,
                 (size_t) H * vectorsPerRow, BlockKeys, vectorsPerRow);
        copyRows<Threads>(base + layout.valueOffset - layout.keyOffset, layout.valueStride, values + (size_t) chunk0 * vectorsPerColumn + key0 / 8,
                 vectorsPerColumn, 8 * ValueTiles, BlockKeys / 8); // whole chunk: the packing zero-pads it
        copyRows<Threads>(base + layout.keyStatsOffset - layout.keyOffset, 4, static_cast<const uint4*>(static_cast<const void*>(pack.keyStats)) + (size_t) key0 * H + head,
                 H, BlockKeys, 1);
        copyRows<Threads>(base + layout.keySegmentOffset - layout.keyOffset, 0, static_cast<const uint4*>(static_cast<const void*>(pack.segments + key0)), 0, 1,
                 BlockKeys / 4);
        commitCopies();
    };
    if (span.firstTile < span.lastTile)
        stageTile(span.firstTile, 0);
    else
        commitCopies(); // the query tile's copies

    KeyTileFacts next;
    if (span.firstTile < span.lastTile)
        next.load(pack, span.firstTile, H, head);
    for (int tile = span.firstTile; tile < span.lastTile; tile++) {
        const KeyTileFacts facts = next;
        if (tile + 1 < span.lastTile)
            next.load(pack, tile + 1, H, head);
        const int key0 = tile * BlockKeys, buffer = (tile - span.firstTile) & 1;
        waitCopies();
        __syncthreads(); // this tile has landed, and every warp is done with the other buffer
        if (tile + 1 < span.lastTile)
            stageTile(tile + 1, buffer ^ 1);
        const uint32_t* base = words + layout.keyOffset + buffer * layout.bufferWords;
        const unsigned keyTile = sharedAddress(base), valueTile = keyTile + 4u * (layout.valueOffset - layout.keyOffset);
        const float4* keyStats = reinterpret_cast<const float4*>(base + layout.keyStatsOffset - layout.keyOffset);
        const int* keySegment = reinterpret_cast<const int*>(base + layout.keySegmentOffset - layout.keyOffset);
        const float d[3] = {queryCentre[0] - facts.centre[0], queryCentre[1] - facts.centre[1], queryCentre[2] - facts.centre[2]};

        // Logits for this warp's 16 rows x 64 keys (fragments through ldmatrix).
        float s[8][4] = {};
#pragma unroll 1
        for (int ks = 0; ks < keySteps; ks++) {
            uint32_t a[4];
            loadA(a, queryFragments, keyLanes, layout.keyStride, warp * 16, ks);
            multiplyKStep(s, a, keyTile, keyLanes, layout.keyStride, ks);
        }
        float scales[2];
        softmax.update(s, scales, keyStats, keySegment, keyTermScratch[warp], rows, key0, span.covers(key0, BlockKeys, facts.segment), d, pointWeight,
                       (float) p.queryPoints, t);
        rescale(acc, scales);
        // acc += P V: P re-packed from the logit accumulators as fp16 A operands.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[4];
            probabilityFragment(a, s, kk);
            multiplyKStep(acc, a, valueTile, valueLanes, ValueStride, kk);
        }
    }

    waitCopies(); // nothing may still be landing when the block ends
    writeOutput(p, softmax, acc, row0, head, chunk0, out, logSumExp, t);
}

template <int ValueTiles>
void launch(const FusedAttentionProblem& p, const TensorCorePack& pack, float* out, float* logSumExp, cudaStream_t stream) {
    const int chunks = (tensorCoreForwardValueWidth(p) + 8 * ValueTiles - 1) / (8 * ValueTiles);
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
    const DeviceFacts device = currentDeviceFacts();
    const int major = device.major, limit = device.sharedMemoryOptin;
    if (major < 8 || p.element != ElementType::Float16)
        return false;
    const int chunk = forwardValueChunk(p);
    if (chunk == 0)
        return false;
    TensorCorePack pack; // the widths the packing will choose
    pack.keyColumns = tensorCoreForwardKeyColumns(p);
    // Dynamic plus static shared memory must fit the per-block limit.
    const size_t bytes = (size_t) Layout(pack, chunk / 8).words * 4 + forwardStaticSharedBytes(Warps);
    return bytes <= (size_t) limit;
}

bool launchFusedAttentionForwardTensorCore(const FusedAttentionProblem& p, const TensorCorePack& pack, float* out, float* logSumExp,
                                           cudaStream_t stream) {
    validateProblem(p);
    if (pack.layout != TensorCorePack::Layout::Rows)
        throw std::invalid_argument("fused FlashIPA attention: the mma.sync forward reads row-major packed operands");
    if (p.rows == 0 || !tensorCoreForwardApplies(p))
        return false;
    switch (forwardValueChunk(p)) {
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
