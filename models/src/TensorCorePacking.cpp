// LibTorch helpers for the fused kernels' packed operands (see TensorCorePacking.h).
#include "TensorCorePacking.h"
#include <climits>

namespace FlashIPAPlugin {
namespace packing {

/** Pads dimension 0 of x with zero rows up to `rows`. */
torch::Tensor padRows(const torch::Tensor& x, int64_t rows) {
    std::vector<int64_t> pad(2 * x.dim(), 0);
    pad.back() = rows - x.size(0); // the last pair pads dimension 0 at its end
    return torch::constant_pad_nd(x, pad).contiguous();
}

/**
 * Points [N, H, P, 3] relative to the centre of their tile of `tile` rows; the centre of a tile is the
 * first point of `centreSource` in the tile's middle row ([padded / tile, H, 3]; zeros without points).
 */
torch::Tensor relativeToTile(const torch::Tensor& points, const torch::Tensor& centreSource, int64_t tile, int64_t padded,
                             torch::Tensor& centres) {
    const int64_t N = points.size(0), H = points.size(1), tiles = padded / tile;
    const auto indices = points.options().dtype(torch::kInt64);
    torch::Tensor middle = (torch::arange(tiles, indices) * tile + tile / 2).clamp_max(N - 1);
    centres = centreSource.size(2) > 0 ? centreSource.select(2, 0).index_select(0, middle).contiguous()
                                      : torch::zeros({tiles, H, 3}, points.options());
    torch::Tensor tileOfRow = torch::arange(N, indices).floor_divide(tile);
    return points - centres.index_select(0, tileOfRow).unsqueeze(2);
}

/** Per-row point sums of relative points [N, H, P, 3]: sum_p |a_p|^2, sum_p a_p; padded rows. */
torch::Tensor pointStats(const torch::Tensor& relative, int64_t padded) {
    return padRows(torch::cat({relative.pow(2).sum({2, 3}).unsqueeze(-1), relative.sum(2)}, -1), padded);
}

/** fp32 -> fp16 hi part and fp16 residual. */
std::pair<torch::Tensor, torch::Tensor> splitHalf(const torch::Tensor& x) {
    torch::Tensor hi = x.to(torch::kHalf);
    return {hi, (x - hi.to(torch::kFloat32)).to(torch::kHalf)};
}

/**
 * Per tile of `tile` consecutive rows, the segment id all its rows share, or INT_MIN where they differ
 * (the kernels skip the mask on tiles inside one segment). `segments` is padded to a multiple of tile.
 */
torch::Tensor commonSegmentPerTile(const torch::Tensor& segments, int64_t tile) {
    torch::Tensor perTile = segments.reshape({-1, tile});
    torch::Tensor lowest = std::get<0>(perTile.min(1)), highest = std::get<0>(perTile.max(1));
    return torch::where(lowest == highest, lowest, torch::full({}, INT_MIN, lowest.options())).contiguous();
}

/**
 * Row-major packed rows [R, H, C] (R a multiple of tile) in core-matrix tile order, the wgmma kernel's
 * shared-memory layout: [R / tile, H, tile / 8, C / 8, 8 rows, 8 columns] (FusedAttentionWgmma.cuh).
 */
torch::Tensor coreMatrixTiles(const torch::Tensor& x, int64_t tile) {
    const int64_t R = x.size(0), H = x.size(1), C = x.size(2);
    return x.reshape({R / tile, tile / 8, 8, H, C / 8, 8}).permute({0, 3, 1, 4, 2, 5}).contiguous();
}

/**
 * Value rows [R, H, C] as the transposed B operand of P.V in core-matrix tile order:
 * [H, R / tile, C / 8, tile / 8, 8 columns, 8 rows] (a key tile's columns are 8 x 8 blocks of keys).
 */
torch::Tensor transposedCoreMatrixTiles(const torch::Tensor& x, int64_t tile) {
    const int64_t R = x.size(0), H = x.size(1), C = x.size(2);
    return x.reshape({R / tile, tile / 8, 8, H, C / 8, 8}).permute({3, 0, 4, 1, 5, 2}).contiguous();
}

} // namespace packing
} // namespace FlashIPAPlugin
