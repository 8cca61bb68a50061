// The GPU packing kernels (models/kernels/OperandPacking.cu) against the LibTorch packing they replaced,
// which stays as the reference (its layouts are checked against index formulas on the CPU in
// TestTensorCorePacking). Every packed tensor of both passes and both layouts: the fp16 operands, centres,
// segments and ranges must agree bit for bit (same fp32 arithmetic, one rounding); the point sums and the
// backward's dOut sums to fp32 rounding (1e-6 relative: the kernels sum in another order). Structures sit
// 100 nm from the origin, so a centre taken from the wrong tile or a lost hi/lo residual shows.
#include "TensorCorePacking.h"
#include "TestRequireGPU.h"
#include <gtest/gtest.h>

using namespace FlashIPAPlugin;

namespace {

struct Widths {
    int64_t H, c, Rb, Pq, Pv, r, dz;
};

/** fp16 inputs for chains of the given lengths plus one padding row, points around (100, -50, 80) nm. */
FusedAttentionInputs inputs(const Widths& w, const std::vector<int64_t>& lengths) {
    torch::manual_seed(3);
    int64_t N = 1;
    for (int64_t n : lengths)
        N += n;
    auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
    auto features = [&](std::vector<int64_t> shape) { return torch::randn(shape, opts).to(torch::kHalf); };
    const torch::Tensor offset = torch::tensor({100.0f, -50.0f, 80.0f}, opts);
    auto points = [&](int64_t count) { return torch::randn({N, w.H, count, 3}, opts) * 1.5 + offset; };
    FusedAttentionInputs in;
    in.q = features({N, w.H, w.c}), in.k = features({N, w.H, w.c}), in.v = features({N, w.H, w.c});
    if (w.Rb > 0)
        in.biasLeft = features({N, w.H, w.Rb}), in.biasRight = features({N, w.H, w.Rb});
    in.queryPoints = points(w.Pq), in.keyPoints = points(w.Pq), in.valuePoints = points(w.Pv);
    if (w.r > 0)
        in.pairValues = features({N, w.r, w.dz});
    in.pointWeight = torch::rand({w.H}, opts) * 0.3 + 0.05;
    std::vector<int> segment;
    for (size_t s = 0; s < lengths.size(); s++)
        segment.insert(segment.end(), lengths[s], (int) s);
    segment.push_back(-1);
    in.segment = torch::tensor(segment, torch::kInt32).to(torch::kCUDA);
    return in;
}

void expectSamePacks(const FusedAttentionInputs& in, bool backward, bool tiles) {
    SCOPED_TRACE(std::string(backward ? "backward" : "forward") + (tiles ? ", core-matrix tiles" : ", rows"));
    auto [gpu, reference] = packing::packedOperandsTwoWays(in, 0.2, 0.6, backward, tiles);
    ASSERT_EQ(gpu.size(), reference.size());
    for (size_t i = 0; i < gpu.size(); i++) {
        SCOPED_TRACE("packed tensor " + std::to_string(i));
        const torch::Tensor got = gpu[i].flatten().cpu(), want = reference[i].contiguous().flatten().cpu();
        ASSERT_EQ(got.scalar_type(), want.scalar_type());
        ASSERT_EQ(got.numel(), want.numel());
        if (got.scalar_type() == torch::kFloat32) {
            const double scale = want.abs().max().item<double>() + 1e-30;
            EXPECT_LE((got - want).abs().max().item<double>(), 1e-6 * scale);
        } else {
            EXPECT_TRUE(torch::equal(got, want)) << (got != want).sum().item<int64_t>() << " of " << got.numel() << " elements differ";
        }
    }
}

void expectSamePacks(const Widths& w, const std::vector<int64_t>& lengths) {
    const FusedAttentionInputs in = inputs(w, lengths);
    for (bool backward : {false, true})
        for (bool tiles : {false, true})
            expectSamePacks(in, backward, tiles);
}

} // namespace

// Several chains whose boundaries fall inside and between tiles, a ragged last tile, a padding row.
TEST(OperandPacking, KernelsMatchLibTorchPacking) {
    REQUIRE_GPU();
    expectSamePacks({3, 8, 3, 4, 2, 2, 5}, {5, 70, 131, 300});
}

// The published layer's widths: 144 scalar columns, three point blocks of 24, value rows of 228.
TEST(OperandPacking, KernelsMatchAtPublishedWidths) {
    REQUIRE_GPU();
    expectSamePacks({8, 128, 2, 8, 12, 2, 32}, {700});
}

// Without bias factors or pair values, and one query point (3 coordinates in point blocks of 8 columns).
TEST(OperandPacking, KernelsMatchWithoutOptionalParts) {
    REQUIRE_GPU();
    expectSamePacks({2, 16, 0, 1, 3, 0, 1}, {100, 29});
}

// Float32 features have no fp16 pack: refused with a message, not packed wrongly.
TEST(OperandPacking, RefusesFloat32Features) {
    REQUIRE_GPU();
    FusedAttentionInputs in = inputs({2, 8, 0, 2, 2, 0, 1}, {10});
    in.q = in.q.to(torch::kFloat32), in.k = in.k.to(torch::kFloat32), in.v = in.v.to(torch::kFloat32);
    EXPECT_THROW(packing::packedOperandsTwoWays(in, 1.0, 1.0, false, true), std::invalid_argument);
}
