// The layouts of the fused kernels' packed operands (models/src/TensorCorePacking.h), on the CPU, against
// index formulas written out here from the kernels' documented shared-memory order: an element (row r,
// column c) of a tile with C columns sits at ((r / 8) * (C / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8
// (FusedAttentionWgmma.cuh: 8 x 8 core matrices of 128 bytes). A wrong permutation here would feed the
// wgmma forward wrong operands; the GPU tests would catch it only on a Hopper GPU.
#include "TensorCorePacking.h"
#include <climits>
#include <gtest/gtest.h>

using namespace FlashIPAPlugin;

namespace {

/** [R, H, C] with every element distinct (its row-major index). */
torch::Tensor numbered(int64_t R, int64_t H, int64_t C) {
    return torch::arange(R * H * C, torch::kInt64).view({R, H, C});
}

/**
 * Checks that `packed` (flattened) holds element (r, h, c) of x [R, H, C] at position(r, h, c), for every
 * element: a permutation test, since every element of `numbered` is distinct.
 */
template <typename Position>
void expectPlacement(const torch::Tensor& x, const torch::Tensor& packed, Position position) {
    ASSERT_EQ(packed.numel(), x.numel());
    auto source = x.accessor<int64_t, 3>();
    const torch::Tensor flat = packed.flatten();
    auto target = flat.accessor<int64_t, 1>();
    for (int64_t r = 0; r < x.size(0); r++)
        for (int64_t h = 0; h < x.size(1); h++)
            for (int64_t c = 0; c < x.size(2); c++)
                ASSERT_EQ(target[position(r, h, c)], source[r][h][c]) << "row " << r << " head " << h << " column " << c;
}

} // namespace

TEST(TensorCorePacking, CoreMatrixTilesPlaceEachElementWhereTheDescriptorsLook) {
    const int64_t tile = 64, R = 3 * tile, H = 2, C = 24;
    torch::Tensor x = numbered(R, H, C);
    expectPlacement(x, packing::coreMatrixTiles(x, tile), [&](int64_t r, int64_t h, int64_t c) {
        const int64_t local = r % tile;
        const int64_t inTile = ((local / 8) * (C / 8) + c / 8) * 64 + (local % 8) * 8 + c % 8;
        return ((r / tile) * H + h) * tile * C + inTile;
    });
}

TEST(TensorCorePacking, TransposedTilesHoldValueColumnsAsRowsOfKeys) {
    // The P.V operand: per (head, key tile) a tile whose rows are value columns and whose columns are keys.
    const int64_t tile = 64, R = 2 * tile, H = 3, C = 16;
    torch::Tensor x = numbered(R, H, C);
    expectPlacement(x, packing::transposedCoreMatrixTiles(x, tile), [&](int64_t r, int64_t h, int64_t c) {
        const int64_t key = r % tile; // the tile's column
        const int64_t inTile = ((c / 8) * (tile / 8) + key / 8) * 64 + (c % 8) * 8 + key % 8;
        return (h * (R / tile) + r / tile) * C * tile + inTile;
    });
}

TEST(TensorCorePacking, CommonSegmentPerTileMarksMixedTiles) {
    torch::Tensor segments = torch::tensor({0, 0, 0, 0, 1, 1, 2, 2, -1, -1, -1, -1}, torch::kInt32);
    torch::Tensor common = packing::commonSegmentPerTile(segments, 4);
    ASSERT_EQ(common.numel(), 3);
    EXPECT_EQ(common[0].item<int>(), 0);
    EXPECT_EQ(common[1].item<int>(), INT_MIN); // two segments in one tile: masked
    EXPECT_EQ(common[2].item<int>(), -1);      // padding only
}

TEST(TensorCorePacking, SplitHalfKeepsTwentyTwoBits) {
    torch::manual_seed(3);
    torch::Tensor x = torch::randn({1000}, torch::kFloat64).mul(100.0).to(torch::kFloat32);
    auto [hi, lo] = packing::splitHalf(x);
    EXPECT_EQ(hi.scalar_type(), torch::kHalf);
    EXPECT_TRUE(torch::equal(hi, x.to(torch::kHalf)));
    torch::Tensor exact = x.to(torch::kFloat64);
    torch::Tensor error = (hi.to(torch::kFloat64) + lo.to(torch::kFloat64) - exact).abs();
    // hi carries 11 significant bits, lo the next 11: |error| <= 2^-22 |x| (2^-21 with margin for lo's
    // rounding), or half of fp16's subnormal spacing (2^-25) where lo is that small.
    EXPECT_TRUE((error <= torch::clamp_min(exact.abs() * std::ldexp(1.0, -21), std::ldexp(1.0, -25))).all().item<bool>());
}

TEST(TensorCorePacking, RelativeToTileUsesTheMiddleRowsFirstPoint) {
    torch::manual_seed(4);
    const int64_t N = 10, H = 2, P = 3, tile = 4, padded = 12;
    torch::Tensor points = torch::randn({N, H, P, 3}) * 50.0;
    torch::Tensor centres;
    torch::Tensor relative = packing::relativeToTile(points, points, tile, padded, centres);
    ASSERT_EQ(centres.sizes(), (std::vector<int64_t>{padded / tile, H, 3}));
    for (int64_t i = 0; i < N; i++) {
        const int64_t middle = std::min<int64_t>((i / tile) * tile + tile / 2, N - 1); // the last tile is ragged
        torch::Tensor centre = points[middle].select(1, 0); // [H, 3]
        EXPECT_TRUE(torch::allclose(centres[i / tile], centre));
        EXPECT_TRUE(torch::allclose(relative[i], points[i] - centre.unsqueeze(1)));
    }
}
