#ifndef FLASHIPA_TENSOR_CORE_PACKING_H_
#define FLASHIPA_TENSOR_CORE_PACKING_H_

// LibTorch helpers that build the fused kernels' packed operands (TensorCorePack and
// TensorCoreBackwardPack in models/kernels/FusedAttentionProblem.h): padding, tile re-centring, fp16
// splitting and the tensor cores' core-matrix tile order. They are plain tensor ops on any device, so
// the layouts the kernels rely on are tested on the CPU (tests/cpp/TestTensorCorePacking.cpp), not
// only through the kernels on a GPU. Internal to the model library.
#include "flashipa/FusedAttention.h"
#include <torch/torch.h>
#include <utility>
#include <vector>

namespace FlashIPAPlugin {
namespace packing {

/** Pads dimension 0 of x with zero rows up to `rows`. */
torch::Tensor padRows(const torch::Tensor& x, int64_t rows);

/**
 * Points [N, H, P, 3] relative to the centre of their tile of `tile` rows; the centre of a tile is the
 * first point of `centreSource` in the tile's middle row ([padded / tile, H, 3]; zeros without points).
 */
torch::Tensor relativeToTile(const torch::Tensor& points, const torch::Tensor& centreSource, int64_t tile, int64_t padded,
                             torch::Tensor& centres);

/** Per-row point sums of relative points [N, H, P, 3]: sum_p |a_p|^2, sum_p a_p; padded rows. */
torch::Tensor pointStats(const torch::Tensor& relative, int64_t padded);

/** fp32 -> fp16 hi part and fp16 residual. */
std::pair<torch::Tensor, torch::Tensor> splitHalf(const torch::Tensor& x);

/**
 * Per tile of `tile` consecutive rows, the segment id all its rows share, or INT_MIN where they differ
 * (the kernels skip the mask on tiles inside one segment). `segments` is padded to a multiple of tile.
 */
torch::Tensor commonSegmentPerTile(const torch::Tensor& segments, int64_t tile);

/**
 * Row-major packed rows [R, H, C] (R a multiple of tile) in core-matrix tile order, the wgmma kernel's
 * shared-memory layout: [R / tile, H, tile / 8, C / 8, 8 rows, 8 columns] (FusedAttentionWgmma.cuh).
 */
torch::Tensor coreMatrixTiles(const torch::Tensor& x, int64_t tile);

/**
 * Value rows [R, H, C] as the transposed B operand of P.V in core-matrix tile order:
 * [H, R / tile, C / 8, tile / 8, 8 columns, 8 rows] (a key tile's columns are 8 x 8 blocks of keys).
 */
torch::Tensor transposedCoreMatrixTiles(const torch::Tensor& x, int64_t tile);

/**
 * For tests: the packed operands of the tensor-core kernels for these (fp16) inputs, built twice, by the
 * GPU packing kernels (first) and by the LibTorch reference (second), each list in the order of the pack's
 * pointers (TensorCorePack, or TensorCoreBackwardPack with a random output gradient, log-sum-exp and delta).
 * Throws std::invalid_argument in a build without the CUDA kernels.
 */
std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> packedOperandsTwoWays(const FusedAttentionInputs& inputs, double scalarScale,
                                                                                      double biasScale, bool backward, bool coreMatrixTiles);

} // namespace packing
} // namespace FlashIPAPlugin

#endif
