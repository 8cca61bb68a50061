// Forward pass of the fused FlashIPA attention with Hopper warpgroup products (wgmma, sm_90a). Same
// work, tiles and arithmetic as the mma.sync forward (FusedAttentionForwardTensorCore.cu, whose header
// explains the exact point terms), issued differently:
//  - a block of 8 warps is two warpgroups of 64 query rows; per 64-key tile each warpgroup computes its
//    logits with one wgmma per 16-column k-step, A (queries) and B (keys) read by the tensor cores
//    straight from shared memory: no ldmatrix, no fragment registers;
//  - the probabilities stay in registers as the A operand of P.V (the wgmma accumulator layout per
//    warp is the mma.sync one), B (values, transposed) again from shared memory, 64 columns per wgmma;
//  - the operands are packed tile by tile in the tensor cores' core-matrix order
//    (TensorCorePack::Layout::CoreMatrixTiles), so staging a tile is a few contiguous copies.
// The two warpgroups run independently between the per-tile barriers, so one's softmax overlaps the
// other's products.
#include "FusedAttentionForwardSteps.cuh"
#include "FusedAttentionWgmma.cuh"

namespace FlashIPAPlugin {
namespace kernels {

namespace {

constexpr int Warps = 8;
constexpr int Threads = 32 * Warps;
constexpr int BlockRows = TensorCoreQueryTile;
constexpr int BlockKeys = TensorCoreKeyTile;
constexpr int MaxValueTiles = 32;
static_assert(BlockRows == 2 * 64, "two warpgroups of 64 rows");
static_assert(BlockKeys == 64, "one 64-column wgmma per logit tile, four k-steps per P.V");

/** Shared-memory geometry in bytes: the query tile, then two buffers of (keys, values, key stats, segments). */
struct Layout {
    int queryBytes, valueOffset, statsOffset, segmentOffset, bufferBytes, bytes;

    __host__ __device__ Layout(const TensorCorePack& pack, int valueTiles) {
        queryBytes = BlockRows * pack.keyColumns * 2;
        valueOffset = BlockKeys * pack.keyColumns * 2;
        statsOffset = valueOffset + 8 * valueTiles * BlockKeys * 2;
        segmentOffset = statsOffset + 16 * BlockKeys;
        bufferBytes = segmentOffset + 4 * BlockKeys;
        bytes = queryBytes + 2 * bufferBytes;
    }
};

template <int ValueTiles>
__global__ void __launch_bounds__(Threads, 1) fusedAttentionForwardWgmma(FusedAttentionProblem p, TensorCorePack pack, float* out,
                                                                         float* logSumExp) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(128) uint4 sharedVectors[];
    char* shared = reinterpret_cast<char*>(sharedVectors);
    const unsigned base = sharedAddress(shared);
    __shared__ QueryRows rows;
    __shared__ __align__(16) float keyTermScratch[Warps][TensorCoreKeyTile]; // read as float2
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warpgroup = warpUniform(warp / 4); // descriptors derived from it stay in uniform registers
    const int queryTile = blockIdx.x, row0 = queryTile * BlockRows, head = blockIdx.y;
    const int chunk0 = 8 * ValueTiles * blockIdx.z;
    const Layout layout(pack, ValueTiles);
    const int H = p.heads, keyColumns = pack.keyColumns, keyTiles = pack.paddedRows / BlockKeys;
    const float pointWeight = p.pointWeight[head];
    const float* queryCentreGlobal = pack.queryCentres + ((size_t) queryTile * H + head) * 3;
    const float queryCentre[3] = {queryCentreGlobal[0], queryCentreGlobal[1], queryCentreGlobal[2]};

    copyContiguous<Threads>(base, static_cast<const uint4*>(pack.queries) + (size_t) (queryTile * H + head) * BlockRows * keyColumns / 8,
                            BlockRows * keyColumns / 8);
    const KeySpan span = describeQueryRows<Threads>(p, row0, BlockKeys, rows);
    RowSoftmax softmax(pack, H, head, row0, warp, g);
    const uint64_t queryDescriptor = tileDescriptor(base + warpgroup * 64 * keyColumns * 2, keyColumns);
    const int keySteps = keyColumns / 16;

    float acc[ValueTiles][4] = {};
    // Per key tile: keys [tile, head], this chunk of the values [head, tile, chunk].
    const size_t keyVectors = (size_t) BlockKeys * keyColumns / 8, valueVectors = (size_t) pack.valueColumns * BlockKeys / 8;
    const uint4* keys = static_cast<const uint4*>(pack.keys) + head * keyVectors;
    const uint4* values = static_cast<const uint4*>(pack.values) + (size_t) head * keyTiles * valueVectors + chunk0 * BlockKeys / 8;

    // Starts copying one key tile into a buffer (cp.async, one commit group).
    auto stageTile = [&](int tile, int buffer) {
        const int offset = layout.queryBytes + buffer * layout.bufferBytes;
        copyContiguous<Threads>(base + offset, keys + (size_t) tile * H * keyVectors, (int) keyVectors);
        copyContiguous<Threads>(base + offset + layout.valueOffset, values + tile * valueVectors, ValueTiles * BlockKeys);
        copyRows<Threads>(reinterpret_cast<uint32_t*>(shared + offset + layout.statsOffset), 4,
                          static_cast<const uint4*>(static_cast<const void*>(pack.keyStats)) + (size_t) tile * BlockKeys * H + head, H, BlockKeys, 1);
        copyContiguous<Threads>(base + offset + layout.segmentOffset, static_cast<const uint4*>(static_cast<const void*>(pack.segments + tile * BlockKeys)),
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
        fenceSharedForTensorCores(); // the copies are read by the tensor cores next
        __syncthreads();             // this tile has landed, and every warpgroup is done with the other buffer
        if (tile + 1 < span.lastTile)
            stageTile(tile + 1, buffer ^ 1);
        const int offset = layout.queryBytes + buffer * layout.bufferBytes;
        const float4* keyStats = reinterpret_cast<const float4*>(shared + offset + layout.statsOffset);
        const int* keySegment = reinterpret_cast<const int*>(shared + offset + layout.segmentOffset);
        const float d[3] = {queryCentre[0] - facts.centre[0], queryCentre[1] - facts.centre[1], queryCentre[2] - facts.centre[2]};

        // Logits of this warpgroup's 64 rows x 64 keys: one wgmma per k-step.
        float s[8][4];
        float(&logits)[32] = *reinterpret_cast<float(*)[32]>(&s[0][0]);
        const uint64_t keyDescriptor = tileDescriptor(base + offset, keyColumns);
        wgmmaFence();
#pragma unroll 2
        for (int ks = 0; ks < keySteps; ks++)
            wgmma64x64(logits, advance(queryDescriptor, 256u * ks), advance(keyDescriptor, 256u * ks), ks > 0);
        wgmmaCommit();
        wgmmaWait<0>();
        fenceRegisters(logits);

        float scales[2];
        softmax.update(s, scales, keyStats, keySegment, keyTermScratch[warp], rows, key0, span.covers(key0, BlockKeys, facts.segment), d, pointWeight,
                       (float) p.queryPoints, t);
        rescale(acc, scales);

        // acc += P V, 64 value columns per wgmma.
        const uint64_t valueDescriptor = tileDescriptor(base + offset + layout.valueOffset, BlockKeys);
        wgmmaFence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            uint32_t a[4];
            probabilityFragment(a, s, kk);
#pragma unroll
            for (int c = 0; c < ValueTiles / 8; c++)
                wgmmaRegisterA<0>(*reinterpret_cast<float(*)[32]>(&acc[8 * c][0]), a[0], a[1], a[2], a[3],
                           advance(valueDescriptor, 64u * BlockKeys * 2 * c + 256u * kk));
        }
        wgmmaCommit();
        wgmmaWait<0>();
#pragma unroll
        for (int nv = 0; nv < ValueTiles; nv++)
            fenceRegisters(acc[nv]);
    }

    waitCopies(); // nothing may still be landing when the block ends
    writeOutput(p, softmax, acc, row0, head, chunk0, out, logSumExp, t);
#else
    __trap(); // built for sm_90a only; wgmmaForwardApplies keeps other devices away
#endif
}

template <int ValueTiles>
void launch(const FusedAttentionProblem& p, const TensorCorePack& pack, float* out, float* logSumExp, cudaStream_t stream) {
    const int chunks = (tensorCoreForwardValueWidth(p) + 8 * ValueTiles - 1) / (8 * ValueTiles);
    const size_t bytes = (size_t) Layout(pack, ValueTiles).bytes;
    auto kernel = fusedAttentionForwardWgmma<ValueTiles>;
    allowSharedMemory(kernel, bytes, "wgmma forward: shared memory");
    const dim3 grid(pack.paddedRows / BlockRows, p.heads, chunks);
    kernel<<<grid, Threads, bytes, stream>>>(p, pack, out, logSumExp);
    checkLaunch(cudaGetLastError(), "wgmma forward");
}

} // namespace

bool wgmmaForwardApplies(const FusedAttentionProblem& p) {
    const DeviceFacts device = currentDeviceFacts();
    if (device.major != 9 || device.minor != 0 || p.element != ElementType::Float16)
        return false;
    const int chunk = forwardValueChunk(p);
    if (chunk == 0)
        return false;
    TensorCorePack pack; // the widths the packing will choose
    pack.keyColumns = tensorCoreForwardKeyColumns(p);
    // Dynamic plus static shared memory must fit the per-block limit.
    const size_t bytes = (size_t) Layout(pack, chunk / 8).bytes + forwardStaticSharedBytes(Warps);
    return bytes <= (size_t) device.sharedMemoryOptin;
}

bool launchFusedAttentionForwardWgmma(const FusedAttentionProblem& p, const TensorCorePack& pack, float* out, float* logSumExp,
                                      cudaStream_t stream) {
    validateProblem(p);
    if (pack.layout != TensorCorePack::Layout::CoreMatrixTiles)
        throw std::invalid_argument("fused FlashIPA attention: the wgmma forward reads operands packed as core-matrix tiles");
    if (p.rows == 0 || !wgmmaForwardApplies(p))
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
