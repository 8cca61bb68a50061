#ifndef FLASHIPA_FUSED_ATTENTION_PROBLEM_H_
#define FLASHIPA_FUSED_ATTENTION_PROBLEM_H_

// The host-side description of one fused FlashIPA attention call (docs/MATH.md §4) and the launchers of
// its kernels. Plain pointers and sizes only, so this header is shared by nvcc (the kernels) and the
// C++ compiler (the LibTorch operator in models/src/FusedAttention.cpp).
//
// Rows are residues packed over structures: row i attends to keys j in [keyBegin_i, keyEnd_i) with
// segment_j == segment_i; segment < 0 marks padding (no output, no gradient). Per head h:
//
//   logit_ij = scalarScale q_i.k_j + biasScale bl_i.br_j - (w_h / 2) sum_p |x_ip - y_jp|^2
//   out_i    = sum_j softmax_j(logit_ij) [v_j | value points_j | pair values_j]
//
// Everything the kernels read stays in the layer's own tensors ([N, H, width] row-major); the lifted
// query/key/value rows of docs/MATH.md §4 are assembled tile by tile in shared memory, never in global memory.

#include <cuda_runtime_api.h>

#ifdef __CUDACC__
#define FLASHIPA_HOST_DEVICE __host__ __device__
#else
#define FLASHIPA_HOST_DEVICE
#endif

namespace FlashIPAPlugin {
namespace kernels {

enum class ElementType { Float32, Float16 };

struct FusedAttentionProblem {
    int rows = 0;          ///< N: residues over all structures in the call
    int heads = 0;         ///< H
    int headDim = 0;       ///< c: scalar width of q, k, v
    int biasRank = 0;      ///< Rb: width of the bias factors (0: none)
    int queryPoints = 0;   ///< P_q
    int valuePoints = 0;   ///< P_v
    int pairRank = 0;      ///< r (0: no pair values)
    int pairValueDim = 0;  ///< c_z / 4
    float scalarScale = 1; ///< multiplies q.k  (w_L / sqrt(c))
    float biasScale = 1;   ///< multiplies bl.br (w_L)
    ElementType element = ElementType::Float32; ///< storage type of q, k, v, biases and pair values

    const void* q = nullptr;          ///< [N, H, c]
    const void* k = nullptr;          ///< [N, H, c]
    const void* v = nullptr;          ///< [N, H, c]
    const void* biasLeft = nullptr;   ///< [N, H, Rb]
    const void* biasRight = nullptr;  ///< [N, H, Rb]
    const void* pairValues = nullptr; ///< [N, r * c_z/4], shared by all heads
    const float* queryPointsGlobal = nullptr; ///< [N, H, P_q * 3], fp32 always
    const float* keyPointsGlobal = nullptr;   ///< [N, H, P_q * 3]
    const float* valuePointsGlobal = nullptr; ///< [N, H, P_v * 3]
    const float* pointWeight = nullptr;       ///< [H]: w_h = gamma_h w_L w_C
    const int* segment = nullptr;             ///< [N]
    const int* keyBegin = nullptr;            ///< [N]
    const int* keyEnd = nullptr;              ///< [N]

    /** Width of a lifted scalar query/key row: q (or k) then the bias factors. */
    FLASHIPA_HOST_DEVICE int liftedKeyDim() const { return headDim + biasRank; }
    /** Width of a lifted value row: v, then the value points (x, y, z each), then the pair values. */
    FLASHIPA_HOST_DEVICE int liftedValueDim() const { return headDim + 3 * valuePoints + pairRank * pairValueDim; }
};

/** Gradients of the backward pass; every buffer is fp32 and must be zeroed by the caller. */
struct FusedAttentionGradients {
    float* liftedQuery = nullptr;  ///< [N, H, c + Rb]: d/d[q | bl]
    float* liftedKey = nullptr;    ///< [N, H, c + Rb]: d/d[scalarScale k | biasScale br]
    float* liftedValue = nullptr;  ///< [N, H, liftedValueDim]
    float* queryPoints = nullptr;  ///< [N, H, P_q * 3]
    float* keyPoints = nullptr;    ///< [N, H, P_q * 3]
    float* pointWeight = nullptr;  ///< [H]
};

/**
 * Operands of the tensor-core forward, packed once per call in fp16 so that each tile is a plain
 * 16-byte copy (element-wise staging with conversions cost ten times the matrix products). Rows are
 * padded to a multiple of 128 with zeros. Points enter re-centred on the centre of their own tile
 * (query tiles of 128 rows, key tiles of 64 keys); the kernel restores exact pair distances from
 * the per-row sums below (see FusedAttentionForwardTensorCore.cu).
 *
 * Value rows start with TensorCoreValueExtras columns that the P.V product turns into per-row sums:
 * [1 | c_hi (x y z) | c_lo (x y z) | 0], c = c_hi + c_lo the key tile's centre split into fp16 parts.
 * Value points follow relative to that centre (fp16), then v and the pair values. The kernel's output
 * for a value point is (sum_j p_j (y_j - c_j) + sum_j p_j c_j) / sum_j p_j with every sum taken over
 * the same fp16-rounded probabilities, so a translation of the structure moves the output by exactly
 * the translation (to fp32 rounding), wherever the structure sits.
 */
struct TensorCorePack {
    /**
     * Rows: each packed tensor row-major as documented below (the mma.sync kernel). CoreMatrixTiles:
     * the same elements tile by tile in the wgmma kernel's shared-memory order (FusedAttentionWgmma.cuh):
     * queries [paddedRows / 128, H, 16, keyColumns / 8, 8, 8], keys [paddedRows / 64, H, 8, keyColumns / 8, 8, 8],
     * values [H, paddedRows / 64, valueColumns / 8, 8, 8 columns, 8 keys].
     */
    enum class Layout { Rows, CoreMatrixTiles } layout = Layout::Rows;
    int paddedRows = 0;    ///< N rounded up to 128
    int keyColumns = 0;    ///< width of a packed query/key row: c + Rb + 9 P_q rounded up to 16
    int valueColumns = 0;  ///< packed value columns: extras + lifted value row, rounded up to the value chunk
    const void* queries = nullptr;       ///< [paddedRows, H, keyColumns] fp16: [q | bl | a_hi | a_lo | a_hi | 0]
    const float* queryStats = nullptr;   ///< [paddedRows, H, 4]: sum_p |a_p|^2, sum_p a_p (a = x - query tile centre)
    const void* keys = nullptr;          ///< [paddedRows, H, keyColumns] fp16: [s k | s br | w b_hi | w b_hi | w b_lo | 0]
    const float* keyStats = nullptr;     ///< [paddedRows, H, 4]: sum_p |b_p|^2, sum_p b_p (b = y - key tile centre)
    const float* queryCentres = nullptr; ///< [paddedRows / 128, H, 3]
    const float* keyCentres = nullptr;   ///< [paddedRows / 64, H, 3]
    const void* values = nullptr;        ///< [H, valueColumns, paddedRows] fp16: [extras | value points - c | v | pair values], transposed
    const int* segments = nullptr;       ///< [paddedRows]: segment ids, -1 on padding rows
    const int* tileSegments = nullptr;   ///< [paddedRows / 64]: the common segment of a key tile's keys, or INT_MIN
};

/** Leading columns of a packed value row of the tensor-core forward: [1 | centre hi | centre lo | 0]. */
constexpr int TensorCoreValueExtras = 8;

/** Width of a packed query/key row of the tensor-core forward: [q | bl | point columns] rounded up to 16. */
inline FLASHIPA_HOST_DEVICE int tensorCoreForwardKeyColumns(const FusedAttentionProblem& p) {
    return (p.liftedKeyDim() + 9 * p.queryPoints + 15) / 16 * 16;
}

/** Width of a packed value row of the tensor-core forward before padding to the chunk. */
inline FLASHIPA_HOST_DEVICE int tensorCoreForwardValueWidth(const FusedAttentionProblem& p) {
    return TensorCoreValueExtras + p.liftedValueDim();
}

/** Rows per query tile and keys per key tile of the tensor-core forward. */
constexpr int TensorCoreQueryTile = 128;
constexpr int TensorCoreKeyTile = 64;
/**
 * Value columns one block keeps in registers (wider rows are split into chunks of this many), for a
 * packed value width (the forward's: TensorCoreValueExtras + liftedValueDim; the backward's: liftedValueDim).
 */
int tensorCoreValueChunk(int packedValueWidth);

/**
 * The tensor-core forward for fp16 problems on sm_80 or newer; returns false, launching nothing,
 * where it does not apply (then launchFusedAttentionForward runs the fp32 SIMT kernel).
 */
bool launchFusedAttentionForwardTensorCore(const FusedAttentionProblem& problem, const TensorCorePack& pack, float* out,
                                           float* logSumExp, cudaStream_t stream);

/** True when the tensor-core forward can run for this problem on the current device. */
bool tensorCoreForwardApplies(const FusedAttentionProblem& problem);

/**
 * True when the wgmma forward (FusedAttentionForwardWgmma.cu, built for sm_90a only) can run for this
 * problem on the current device: a compute capability 9.0 GPU, fp16, and the tiles fit shared memory.
 */
bool wgmmaForwardApplies(const FusedAttentionProblem& problem);

/** The wgmma forward; needs a pack with Layout::CoreMatrixTiles. Returns false, launching nothing, where it does not apply. */
bool launchFusedAttentionForwardWgmma(const FusedAttentionProblem& problem, const TensorCorePack& pack, float* out, float* logSumExp,
                                      cudaStream_t stream);

/**
 * Operands of the tensor-core backward (FusedAttentionBackwardTensorCore.cu), packed once per backward
 * call in fp16, rows padded to a multiple of 128. Unlike the forward's, key points are not multiplied
 * by the point weight: the backward needs the squared distances themselves for the weight's gradient.
 * Each point block (a_hi, a_lo, b_hi, b_lo) is padded to pointBlock columns, a multiple of 8, so that
 * ldmatrix can read it as the B operand of the point-gradient products.
 */
struct TensorCoreBackwardPack {
    /**
     * Rows: each packed tensor [paddedRows, H, columns] row-major (the mma.sync backward). CoreMatrixTiles:
     * queries, keys, gradOut and values as tiles of 64 rows in core-matrix order, [paddedRows / 64, H, 8,
     * columns / 8, 8, 8] (the wgmma backward, which reads each tile both K-major and N-major).
     */
    enum class Layout { Rows, CoreMatrixTiles } layout = Layout::Rows;
    int paddedRows = 0;    ///< N rounded up to 128
    int scalarColumns = 0; ///< [q | bl] (or [scalarScale k | biasScale br]) padded to tensorCoreBackwardScalarColumns
    int pointBlock = 0;    ///< 3 P_q rounded up to 8
    int keyColumns = 0;    ///< scalarColumns + three point blocks, rounded up to 16
    int valueColumns = 0;  ///< packed value (and gradient) columns: liftedValueDim rounded up to the value chunk (Rows) or to 64 (CoreMatrixTiles)
    const void* queries = nullptr;      ///< [paddedRows, H, keyColumns] fp16: [q | bl | 0 | a_hi | a_lo | a_hi | 0]
    const void* keys = nullptr;         ///< [paddedRows, H, keyColumns] fp16: [s k | s br | 0 | b_hi | b_hi | b_lo | 0]
    const float* queryStats = nullptr;  ///< [paddedRows, H, 4]: sum_p |a_p|^2, sum_p a_p (a = x - query tile centre)
    const float* keyStats = nullptr;    ///< [paddedRows, H, 4]: sum_p |b_p|^2, sum_p b_p (b = y - key tile centre)
    const float* queryCentres = nullptr; ///< [paddedRows / 128, H, 3]
    const float* keyCentres = nullptr;   ///< [paddedRows / 64, H, 3]; value points are re-centred on these too
    const void* gradOut = nullptr;       ///< [paddedRows, H, valueColumns] fp16: dOut
    const void* values = nullptr;        ///< [paddedRows, H, valueColumns] fp16: [v | value points - key tile centre | pair values]
    const float* rowTerms = nullptr;     ///< [paddedRows, H, 8]: log-sum-exp, delta, sum_p dOut of value point p (x, y, z), 0, 0, 0
    const int* rowRanges = nullptr;      ///< [paddedRows, 4]: segment (-1 on padding), key range begin, end, 0
    const int* tileSegments = nullptr;   ///< per tile of 32 rows (Rows) or 64 rows (CoreMatrixTiles): the rows' common segment, or INT_MIN
};

/** Rows of the other side's tiles in the tensor-core backward (the unit of TensorCoreBackwardPack::tileSegments). */
constexpr int TensorCoreBackwardTile = 32;

/** Scalar columns the tensor-core backward uses for a lifted key width (0: too wide, the SIMT backward runs). */
int tensorCoreBackwardScalarColumns(int liftedKeyDim);

/** True when the tensor-core backward can run for this problem on the current device. */
bool tensorCoreBackwardApplies(const FusedAttentionProblem& problem);

/**
 * The tensor-core backward for fp16 problems; returns false, launching nothing, where it does not
 * apply. Same contract as launchFusedAttentionBackward (the gradient buffers must be zeroed); the
 * log-sum-exp and delta travel in pack.rowTerms.
 */
bool launchFusedAttentionBackwardTensorCore(const FusedAttentionProblem& problem, const TensorCoreBackwardPack& pack,
                                            const FusedAttentionGradients& gradients, cudaStream_t stream);

/** Packed value columns of the wgmma backward for a lifted value width: rounded up to 64, or 0 above 256 (it does not apply). */
int wgmmaBackwardValueColumns(int liftedValueDim);

/**
 * True when the wgmma backward (FusedAttentionBackwardWgmma.cu, built for sm_90a only) can run for this
 * problem on the current device: a compute capability 9.0 GPU, fp16, the mma.sync backward's widths, lifted
 * value rows of at most 256 columns, and the tiles fit shared memory.
 */
bool wgmmaBackwardApplies(const FusedAttentionProblem& problem);

/** The wgmma backward; needs a pack with Layout::CoreMatrixTiles. Returns false, launching nothing, where it does not apply. */
bool launchFusedAttentionBackwardWgmma(const FusedAttentionProblem& problem, const TensorCoreBackwardPack& pack,
                                       const FusedAttentionGradients& gradients, cudaStream_t stream);

/**
 * Builds a forward pack on the GPU (OperandPacking.cu): `pack` holds the widths, the layout and pointers to
 * device buffers of the documented sizes, which this fills (centres, stats and segments first, then the
 * operands). Same contents as the LibTorch packing in FusedAttention.cpp, in four launches.
 */
void launchForwardPacking(const FusedAttentionProblem& problem, const TensorCorePack& pack, cudaStream_t stream);

/**
 * Builds a backward pack on the GPU likewise, from the forward's log-sum-exp [N, H], delta [N, H] and the
 * gradient of the output [N, H, liftedValueDim] (fp32); five launches.
 */
void launchBackwardPacking(const FusedAttentionProblem& problem, const TensorCoreBackwardPack& pack, const float* gradOut,
                           const float* logSumExp, const float* delta, cudaStream_t stream);

/**
 * Forward: out [N, H, liftedValueDim] (fp32, value points in the global frame) and the log-sum-exp
 * of each row's logits, lse [N, H]. Throws std::runtime_error on a launch failure.
 */
void launchFusedAttentionForward(const FusedAttentionProblem& problem, float* out, float* logSumExp, cudaStream_t stream);

/**
 * Backward, given the forward's log-sum-exp, the gradient of out and delta_i = sum_col gradOut.out
 * per row and head. Accumulates into the (zeroed) gradient buffers.
 */
void launchFusedAttentionBackward(const FusedAttentionProblem& problem, const float* logSumExp, const float* gradOut,
                                  const float* delta, const FusedAttentionGradients& gradients, cudaStream_t stream);

} // namespace kernels
} // namespace FlashIPAPlugin

#endif
