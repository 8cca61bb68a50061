// The tensor-core kernels' packed operands (TensorCorePack, TensorCoreBackwardPack), built on the GPU in a
// few element-wise kernels. The same packing written with LibTorch ops (models/src/FusedAttention.cpp,
// helpers in TensorCorePacking.h) took about 90 launches per forward and more per backward, which bound the
// layer at short lengths (benchmarks/results/fused_kernel_ncu_h100.md); it stays as the tests' oracle.
//
// Two kinds of kernel per pass:
//  - row facts, one thread per (row, head): tile centres, point sums, segments, per-tile common segments
//    (and the backward's log-sum-exp, delta and dOut sums). They run first: the operand kernels read the
//    centres they write.
//  - operands, one thread per 16 bytes of output: an element function says what column `col` of a packed
//    row holds (OperandElements below), a layout says where 8 consecutive elements go (OperandLayout).
// Every value is computed with the same fp32 operations as the LibTorch packing and rounded once to fp16,
// so the fp16 operands agree bit for bit; the point sums agree to fp32 rounding (summation order).
#include "FusedAttentionLaunch.cuh"
#include <climits>
#include <cuda_fp16.h>

namespace FlashIPAPlugin {
namespace kernels {

namespace {

constexpr int Threads = 256;

/** Where a packed operand's elements go (TensorCorePacking.h documents each order). */
enum class OperandLayout {
    Rows,                    ///< [R, H, C]
    RowsTransposed,          ///< [H, C, R] (the mma.sync forward's values)
    CoreMatrixTiles,         ///< [R / tile, H, tile / 8, C / 8, 8 rows, 8 columns]
    TransposedCoreMatrixTiles ///< [H, R / tile, C / 8, tile / 8, 8 columns, 8 rows] (the wgmma forward's values)
};

__device__ __forceinline__ float halfAt(const void* base, size_t index) {
    return __half2float(static_cast<const __half*>(base)[index]);
}

__device__ __forceinline__ float halfHi(float x) {
    return __half2float(__float2half_rn(x));
}

/** Point 0 of the middle row of tile `tileIndex` (clamped to the last row), or the origin without points. */
__device__ __forceinline__ float3 tileCentre(const float* points, int pointCount, int rows, int H, int head, int tileIndex, int tile) {
    if (pointCount == 0)
        return make_float3(0.0f, 0.0f, 0.0f);
    const int middle = min(tileIndex * tile + tile / 2, rows - 1);
    const float* x = points + ((size_t) middle * H + head) * pointCount * 3;
    return make_float3(x[0], x[1], x[2]);
}

__device__ __forceinline__ float component(const float3& v, int axis) {
    return axis == 0 ? v.x : (axis == 1 ? v.y : v.z);
}

__device__ __forceinline__ float3 centreAt(const float* centres, size_t index) {
    return make_float3(centres[index * 3], centres[index * 3 + 1], centres[index * 3 + 2]);
}

/** Point columns [hi | lo | hi] or [hi | hi | lo] of relative points scaled by `scale`, blocks of `block` columns. */
__device__ __forceinline__ float splitPointColumn(float relative, int part, bool loInMiddle) {
    const float hi = halfHi(relative);
    const bool lo = loInMiddle ? part == 1 : part == 2;
    return lo ? relative - hi : hi;
}

/**
 * What column `col` of a packed row holds, for rows < N (the writer pads the others with zeros).
 * Kind selects the operand; the forward's and backward's differ in order, padding and the point weight.
 */
enum class Operand { ForwardQueries, ForwardKeys, ForwardValues, BackwardQueries, BackwardKeys, BackwardValues, BackwardGradOut };

struct OperandElements {
    FusedAttentionProblem p;
    Operand operand;
    const float* queryCentres; // [R / 128, H, 3]
    const float* keyCentres;   // [R / 64, H, 3]
    int scalarColumns;         // the backward's padded [q | bl] width
    int pointBlock;            // the backward's padded 3 P_q
    const float* gradOut;      // [N, H, liftedValueDim] (BackwardGradOut)

    __device__ float operator()(int row, int head, int col) const {
        const int H = p.heads, c = p.headDim, Rb = p.biasRank, coordinates = 3 * p.queryPoints;
        const size_t index = (size_t) row * H + head;
        const bool forward = operand == Operand::ForwardQueries || operand == Operand::ForwardKeys || operand == Operand::ForwardValues;
        if (operand == Operand::ForwardValues || operand == Operand::BackwardValues) {
            const float3 centre = centreAt(keyCentres, (size_t) (row / TensorCoreKeyTile) * H + head);
            if (forward) {
                // [1 | centre hi | centre lo | 0 | value points - centre | v | pair values]
                if (col == 0)
                    return 1.0f;
                if (col < 4)
                    return halfHi(component(centre, col - 1));
                if (col < 7) {
                    const float x = component(centre, col - 4);
                    return x - halfHi(x);
                }
                if (col < TensorCoreValueExtras)
                    return 0.0f;
                col -= TensorCoreValueExtras;
            }
            // [value points - centre | v | pair values] (forward) or [v | value points - centre | pair values] (backward)
            const int pointColumns = 3 * p.valuePoints;
            const int pointsFrom = forward ? 0 : c, scalarFrom = forward ? pointColumns : 0;
            if (col >= pointsFrom && col < pointsFrom + pointColumns) {
                const int k = col - pointsFrom;
                return p.valuePointsGlobal[index * pointColumns + k] - component(centre, k % 3);
            }
            if (col >= scalarFrom && col < scalarFrom + c)
                return halfAt(p.v, index * c + col - scalarFrom);
            const int pairColumns = p.pairRank * p.pairValueDim, pairFrom = c + pointColumns;
            if (col >= pairFrom && col < pairFrom + pairColumns)
                return halfAt(p.pairValues, (size_t) row * pairColumns + col - pairFrom);
            return 0.0f;
        }
        if (operand == Operand::BackwardGradOut) {
            const int width = p.liftedValueDim();
            return col < width ? gradOut[index * width + col] : 0.0f;
        }
        const bool queries = operand == Operand::ForwardQueries || operand == Operand::BackwardQueries;
        if (col < c)
            return queries ? halfAt(p.q, index * c + col) : halfAt(p.k, index * c + col) * p.scalarScale;
        if (col < c + Rb)
            return queries ? halfAt(p.biasLeft, index * Rb + col - c) : halfAt(p.biasRight, index * Rb + col - c) * p.biasScale;
        // Point columns: three blocks of the relative points (forward: 3 P_q wide, right after the scalar
        // columns; backward: pointBlock wide, after scalarColumns).
        const int pointsFrom = forward ? c + Rb : scalarColumns, block = forward ? coordinates : pointBlock;
        if (col < pointsFrom || col >= pointsFrom + 3 * block)
            return 0.0f;
        const int part = (col - pointsFrom) / block, k = (col - pointsFrom) % block;
        if (k >= coordinates)
            return 0.0f;
        const float3 centre = queries ? centreAt(queryCentres, (size_t) (row / TensorCoreQueryTile) * H + head)
                                      : centreAt(keyCentres, (size_t) (row / TensorCoreKeyTile) * H + head);
        const float* points = queries ? p.queryPointsGlobal : p.keyPointsGlobal;
        float relative = points[index * coordinates + k] - component(centre, k % 3);
        if (!queries && forward)
            relative *= p.pointWeight[head]; // the forward's keys carry w b
        return splitPointColumn(relative, part, queries);
    }
};

/** One thread per 16 bytes of output: 8 consecutive elements along a row (or, transposed, along a column). */
__global__ void packOperand(OperandElements elements, __half* out, int paddedRows, int columns, OperandLayout layout, int tile) {
    const int H = elements.p.heads, rows = elements.p.rows;
    const size_t vectors = (size_t) paddedRows * H * columns / 8;
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < vectors; i += (size_t) gridDim.x * blockDim.x) {
        int row, col, head;
        bool alongRows = false;
        size_t rest = i;
        switch (layout) {
        case OperandLayout::Rows: { // [R, H, C / 8]
            col = (int) (rest % (columns / 8)) * 8;
            rest /= columns / 8;
            head = (int) (rest % H);
            row = (int) (rest / H);
            break;
        }
        case OperandLayout::RowsTransposed: { // [H, C, R / 8]
            row = (int) (rest % (paddedRows / 8)) * 8;
            rest /= paddedRows / 8;
            col = (int) (rest % columns);
            head = (int) (rest / columns);
            alongRows = true;
            break;
        }
        case OperandLayout::CoreMatrixTiles: { // [R / tile, H, tile / 8, C / 8, 8 rows]
            const int r8 = (int) (rest % 8);
            rest /= 8;
            col = (int) (rest % (columns / 8)) * 8;
            rest /= columns / 8;
            const int rowGroup = (int) (rest % (tile / 8));
            rest /= tile / 8;
            head = (int) (rest % H);
            row = (int) (rest / H) * tile + rowGroup * 8 + r8;
            break;
        }
        default: { // TransposedCoreMatrixTiles: [H, R / tile, C / 8, tile / 8, 8 columns]
            const int c8 = (int) (rest % 8);
            rest /= 8;
            const int rowGroup = (int) (rest % (tile / 8));
            rest /= tile / 8;
            col = (int) (rest % (columns / 8)) * 8 + c8;
            rest /= columns / 8;
            const int tileIndex = (int) (rest % (paddedRows / tile));
            head = (int) (rest / (paddedRows / tile));
            row = tileIndex * tile + rowGroup * 8;
            alongRows = true;
            break;
        }
        }
        __align__(16) __half packed[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int r = alongRows ? row + e : row, k = alongRows ? col : col + e;
            packed[e] = __float2half_rn(r < rows ? elements(r, head, k) : 0.0f);
        }
        reinterpret_cast<uint4*>(out)[i] = *reinterpret_cast<const uint4*>(packed);
    }
}

/** Per-row facts shared by both passes' packs. */
struct RowFactTargets {
    float* queryCentres;
    float* keyCentres;
    float* queryStats;
    float* keyStats;
    int* tileSegments;
    int segmentTile;
    int* segments;      // forward: [R] segment ids, -1 on padding
    int* rowRanges;     // backward: [R, 4] segment, begin, end, 0
    float* rowTerms;    // backward: [R, H, 8] lse, delta, dOut sums, 0, 0, 0
    const float* logSumExp;
    const float* delta;
    const float* gradOut;
};

/** Sum |a|^2 and sum a of points relative to a centre, as float4 (fp32, the LibTorch packing's pointStats). */
__device__ __forceinline__ float4 pointStats(const float* points, int count, const float3& centre) {
    float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int k = 0; k < count; k++) {
        const float x = points[3 * k] - centre.x, y = points[3 * k + 1] - centre.y, z = points[3 * k + 2] - centre.z;
        s.x += x * x + y * y + z * z;
        s.y += x;
        s.z += y;
        s.w += z;
    }
    return s;
}

__global__ void packRowFacts(FusedAttentionProblem p, int paddedRows, RowFactTargets out) {
    const int H = p.heads, N = p.rows, Pq = p.queryPoints;
    // Key tiles are centred on their key points, or on their value points where there are no key points.
    const float* keyCentreSource = Pq > 0 ? p.keyPointsGlobal : p.valuePointsGlobal;
    const int keyCentreCount = Pq > 0 ? Pq : p.valuePoints;
    const size_t items = (size_t) paddedRows * H;
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < items; i += (size_t) gridDim.x * blockDim.x) {
        const int row = (int) (i / H), head = (int) (i % H);
        const float3 queryCentre = tileCentre(p.queryPointsGlobal, Pq, N, H, head, row / TensorCoreQueryTile, TensorCoreQueryTile);
        const float3 keyCentre = tileCentre(keyCentreSource, keyCentreCount, N, H, head, row / TensorCoreKeyTile, TensorCoreKeyTile);
        if (row % TensorCoreQueryTile == 0) {
            float* centre = out.queryCentres + ((size_t) (row / TensorCoreQueryTile) * H + head) * 3;
            centre[0] = queryCentre.x, centre[1] = queryCentre.y, centre[2] = queryCentre.z;
        }
        if (row % TensorCoreKeyTile == 0) {
            float* centre = out.keyCentres + ((size_t) (row / TensorCoreKeyTile) * H + head) * 3;
            centre[0] = keyCentre.x, centre[1] = keyCentre.y, centre[2] = keyCentre.z;
        }
        const bool real = row < N;
        const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        reinterpret_cast<float4*>(out.queryStats)[i] = real ? pointStats(p.queryPointsGlobal + i * 3 * Pq, Pq, queryCentre) : zero;
        reinterpret_cast<float4*>(out.keyStats)[i] = real ? pointStats(p.keyPointsGlobal + i * 3 * Pq, Pq, keyCentre) : zero;
        if (out.rowTerms) {
            float terms[8] = {};
            if (real) {
                const int width = p.liftedValueDim();
                terms[0] = out.logSumExp[i];
                terms[1] = out.delta[i];
                for (int k = 0; k < p.valuePoints; k++)
                    for (int axis = 0; axis < 3; axis++)
                        terms[2 + axis] += out.gradOut[i * width + p.headDim + 3 * k + axis];
            }
            for (int k = 0; k < 8; k++)
                out.rowTerms[i * 8 + k] = terms[k];
        }
        if (head != 0)
            continue;
        const int segment = real ? p.segment[row] : -1;
        if (out.segments)
            out.segments[row] = segment;
        if (out.rowRanges) {
            int* range = out.rowRanges + (size_t) row * 4;
            range[0] = segment, range[1] = real ? p.keyBegin[row] : 0, range[2] = real ? p.keyEnd[row] : 0, range[3] = 0;
        }
        if (row % out.segmentTile == 0) {
            int lowest = INT_MAX, highest = INT_MIN;
            for (int r = row; r < row + out.segmentTile; r++) {
                const int s = r < N ? p.segment[r] : -1;
                lowest = min(lowest, s);
                highest = max(highest, s);
            }
            out.tileSegments[row / out.segmentTile] = lowest == highest ? lowest : INT_MIN;
        }
    }
}

int gridFor(size_t items) {
    const size_t blocks = (items + Threads - 1) / Threads;
    return (int) (blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

void launchOperand(const OperandElements& elements, const void* out, int paddedRows, int columns, OperandLayout layout, int tile, cudaStream_t stream) {
    const size_t vectors = (size_t) paddedRows * elements.p.heads * columns / 8;
    // The pack's pointers are const for the attention kernels, which only read them; here they are the outputs.
    packOperand<<<gridFor(vectors), Threads, 0, stream>>>(elements, static_cast<__half*>(const_cast<void*>(out)), paddedRows, columns,
                                                          layout, tile);
    checkLaunch(cudaGetLastError(), "operand packing");
}

} // namespace

void launchForwardPacking(const FusedAttentionProblem& p, const TensorCorePack& pack, cudaStream_t stream) {
    validateProblem(p);
    if (p.rows == 0)
        return;
    RowFactTargets facts = {};
    facts.queryCentres = const_cast<float*>(pack.queryCentres);
    facts.keyCentres = const_cast<float*>(pack.keyCentres);
    facts.queryStats = const_cast<float*>(pack.queryStats);
    facts.keyStats = const_cast<float*>(pack.keyStats);
    facts.tileSegments = const_cast<int*>(pack.tileSegments);
    facts.segmentTile = TensorCoreKeyTile;
    facts.segments = const_cast<int*>(pack.segments);
    packRowFacts<<<gridFor((size_t) pack.paddedRows * p.heads), Threads, 0, stream>>>(p, pack.paddedRows, facts);
    checkLaunch(cudaGetLastError(), "operand packing: row facts");
    const bool tiled = pack.layout == TensorCorePack::Layout::CoreMatrixTiles;
    OperandElements elements = {p, Operand::ForwardQueries, pack.queryCentres, pack.keyCentres, 0, 0, nullptr};
    launchOperand(elements, pack.queries, pack.paddedRows, pack.keyColumns, tiled ? OperandLayout::CoreMatrixTiles : OperandLayout::Rows,
         TensorCoreQueryTile, stream);
    elements.operand = Operand::ForwardKeys;
    launchOperand(elements, pack.keys, pack.paddedRows, pack.keyColumns, tiled ? OperandLayout::CoreMatrixTiles : OperandLayout::Rows, TensorCoreKeyTile,
         stream);
    elements.operand = Operand::ForwardValues;
    launchOperand(elements, pack.values, pack.paddedRows, pack.valueColumns, tiled ? OperandLayout::TransposedCoreMatrixTiles : OperandLayout::RowsTransposed,
         TensorCoreKeyTile, stream);
}

void launchBackwardPacking(const FusedAttentionProblem& p, const TensorCoreBackwardPack& pack, const float* gradOut, const float* logSumExp,
                           const float* delta, cudaStream_t stream) {
    validateProblem(p);
    if (p.rows == 0)
        return;
    const bool tiled = pack.layout == TensorCoreBackwardPack::Layout::CoreMatrixTiles;
    RowFactTargets facts = {};
    facts.queryCentres = const_cast<float*>(pack.queryCentres);
    facts.keyCentres = const_cast<float*>(pack.keyCentres);
    facts.queryStats = const_cast<float*>(pack.queryStats);
    facts.keyStats = const_cast<float*>(pack.keyStats);
    facts.tileSegments = const_cast<int*>(pack.tileSegments);
    facts.segmentTile = tiled ? TensorCoreKeyTile : TensorCoreBackwardTile;
    facts.rowRanges = const_cast<int*>(pack.rowRanges);
    facts.rowTerms = const_cast<float*>(pack.rowTerms);
    facts.logSumExp = logSumExp;
    facts.delta = delta;
    facts.gradOut = gradOut;
    packRowFacts<<<gridFor((size_t) pack.paddedRows * p.heads), Threads, 0, stream>>>(p, pack.paddedRows, facts);
    checkLaunch(cudaGetLastError(), "operand packing: row facts");
    const OperandLayout layout = tiled ? OperandLayout::CoreMatrixTiles : OperandLayout::Rows;
    OperandElements elements = {p, Operand::BackwardQueries, pack.queryCentres, pack.keyCentres, pack.scalarColumns, pack.pointBlock, gradOut};
    launchOperand(elements, pack.queries, pack.paddedRows, pack.keyColumns, layout, TensorCoreKeyTile, stream);
    elements.operand = Operand::BackwardKeys;
    launchOperand(elements, pack.keys, pack.paddedRows, pack.keyColumns, layout, TensorCoreKeyTile, stream);
    elements.operand = Operand::BackwardValues;
    launchOperand(elements, pack.values, pack.paddedRows, pack.valueColumns, layout, TensorCoreKeyTile, stream);
    elements.operand = Operand::BackwardGradOut;
    launchOperand(elements, pack.gradOut, pack.paddedRows, pack.valueColumns, layout, TensorCoreKeyTile, stream);
}

} // namespace kernels
} // namespace FlashIPAPlugin
