// The FlashIPA layer: the SDPA (lifted) path against the math path, and both against a tiny case
// worked out by hand from docs/MATH.md §2.
#include "TestStructures.h"
#include "flashipa/EnergyModel.h"
#include "flashipa/FusedAttention.h"
#include <gtest/gtest.h>

using namespace FlashIPAPlugin;
using namespace FlashIPATest;

namespace {

IPAInputs randomInputs(const ModelConfig& config, int L, unsigned seed, torch::Dtype dtype) {
    torch::manual_seed(seed);
    IPAInputs in;
    in.nodes = torch::randn({1, L, config.nodeDim}, dtype);
    if (config.pairRank > 0) {
        in.pairLeft = torch::randn({1, L, config.pairRank, config.pairDim}, dtype);
        in.pairRight = torch::randn({1, L, config.pairRank, config.pairDim}, dtype);
    }
    in.frames = FrameBuilder::build(helixAtoms(L, seed, dtype));
    in.positions = torch::arange(L, dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32).unsqueeze(0);
    return in;
}

struct LayerCase {
    int L, rank, relPos, headDim;
};

/** How GoogleTest (and so CTest's test names) print a case. */
void PrintTo(const LayerCase& c, std::ostream* os) {
    *os << "L=" << c.L << " rank=" << c.rank << " relPos=" << c.relPos << " headDim=" << c.headDim;
}

class MathVersusSDPA : public ::testing::TestWithParam<LayerCase> {};

TEST_P(MathVersusSDPA, SameFunctionInFloat32) {
    const LayerCase& tc = GetParam();
    ModelConfig config;
    config.nodeDim = 32;
    config.headDim = tc.headDim;
    config.numHeads = 3;
    config.queryPoints = 4;
    config.valuePoints = 5;
    config.pairRank = tc.rank;
    config.pairDim = 8;
    config.relPosFrequencies = tc.relPos;
    FlashIPALayer layer(config);
    randomizeParameters(*layer, 7 + tc.L, 1.0);
    layer->to(torch::kFloat32);
    IPAInputs in = randomInputs(config, tc.L, 11 + tc.rank, torch::kFloat32);
    torch::Tensor math = layer->forward(in, AttentionBackend::Math);
    torch::Tensor sdpa = layer->forward(in, AttentionBackend::SDPA);
    ASSERT_EQ(math.sizes(), sdpa.sizes());
    EXPECT_LT(relativeError(sdpa, math), 1e-5) << "L=" << tc.L << " r=" << tc.rank << " headDim=" << tc.headDim
                                               << " lifted width=" << layer->liftedKeyDim();
    EXPECT_GT(math.abs().max().item<double>(), 1e-3); // the comparison is not between zeros
}

INSTANTIATE_TEST_SUITE_P(Lengths, MathVersusSDPA,
                         ::testing::Values(LayerCase{1, 2, 4, 16}, LayerCase{7, 2, 4, 16}, LayerCase{64, 2, 4, 16},
                                           LayerCase{300, 2, 4, 16}, LayerCase{64, 0, 0, 16}, LayerCase{64, 1, 0, 16},
                                           LayerCase{64, 8, 4, 16}, LayerCase{7, 0, 4, 16},
                                           // lifted head width above 256 (256 + 5*4 + 2*2 + ...)
                                           LayerCase{64, 2, 2, 256}, LayerCase{7, 8, 4, 300}),
                         [](const ::testing::TestParamInfo<LayerCase>& info) {
                             const LayerCase& c = info.param;
                             return "L" + std::to_string(c.L) + "_rank" + std::to_string(c.rank) + "_relpos" + std::to_string(c.relPos) +
                                    "_c" + std::to_string(c.headDim);
                         });

TEST(FlashIPALayer, HeadWidthAbove256) {
    ModelConfig config;
    config.headDim = 256;
    FlashIPALayer layer(config);
    EXPECT_GT(layer->liftedKeyDim(), 256);
}

TEST(FlashIPALayer, MaskedResiduesDoNotChangeRealOnes) {
    // Padding a structure with masked residues leaves the outputs of the real residues unchanged.
    ModelConfig config;
    FlashIPALayer layer(config);
    randomizeParameters(*layer, 3, 1.0);
    layer->to(torch::kFloat64);
    IPAInputs in = randomInputs(config, 12, 5, torch::kFloat64);
    IPAInputs padded = randomInputs(config, 16, 5, torch::kFloat64);
    using torch::indexing::Slice;
    padded.nodes.index_put_({Slice(), Slice(0, 12)}, in.nodes);
    padded.pairLeft.index_put_({Slice(), Slice(0, 12)}, in.pairLeft);
    padded.pairRight.index_put_({Slice(), Slice(0, 12)}, in.pairRight);
    padded.mask = torch::arange(16).lt(12).unsqueeze(0);
    for (AttentionBackend backend : {AttentionBackend::Math, AttentionBackend::SDPA}) {
        torch::Tensor full = layer->forward(in, backend);
        torch::Tensor part = layer->forward(padded, backend).index({Slice(), Slice(0, 12)});
        EXPECT_LT(relativeError(part, full), 1e-12) << attentionBackendName(backend);
    }
}

TEST(FlashIPALayer, FusedBackendIsRefusedOnCPU) {
    ModelConfig config;
    FlashIPALayer layer(config);
    IPAInputs in = randomInputs(config, 4, 1, torch::kFloat32);
    EXPECT_THROW(layer->forward(in, AttentionBackend::Fused), std::invalid_argument);
    EXPECT_THROW(layer->forward(in, AttentionBackend::FusedFP32), std::invalid_argument);
}

// The math path is O(L^2) in memory; beyond half of physical memory it must refuse with a message (the OOM
// killer gives none). 100,000 residues need ~1.5 TB in double; sdpa's memory is linear and still runs.
TEST(FlashIPALayer, MathBackendRefusesWhatCannotFit) {
    ModelConfig config;
    FlashIPALayer layer(config);
    layer->to(torch::kFloat64);
    IPAInputs in = randomInputs(config, 100000, 2, torch::kFloat64);
    try {
        layer->forward(in, AttentionBackend::Math);
        ADD_FAILURE() << "the math backend accepted 100,000 residues";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("use \"sdpa\""), std::string::npos) << e.what();
    }
    IPAInputs small = randomInputs(config, 300, 2, torch::kFloat64);
    EXPECT_NO_THROW(layer->forward(small, AttentionBackend::Math));
}

// "auto" is the default everywhere: on CPU tensors (and in float64) it is the SDPA path, bit for bit.
TEST(FlashIPALayer, AutoBackendIsSDPAOnCPU) {
    ModelConfig config;
    FlashIPALayer layer(config);
    randomizeParameters(*layer, 5, 1.0);
    for (torch::Dtype dtype : {torch::kFloat32, torch::kFloat64}) {
        layer->to(dtype);
        IPAInputs in = randomInputs(config, 9, 2, dtype);
        EXPECT_TRUE(torch::equal(layer->forward(in, AttentionBackend::Auto), layer->forward(in, AttentionBackend::SDPA)));
    }
    EXPECT_EQ(resolveAttentionBackend(AttentionBackend::Auto, false, false), AttentionBackend::SDPA);
    EXPECT_EQ(resolveAttentionBackend(AttentionBackend::Auto, true, true), AttentionBackend::SDPA);
    EXPECT_EQ(resolveAttentionBackend(AttentionBackend::Auto, true, false),
              fusedAttentionAvailable() ? AttentionBackend::Fused : AttentionBackend::SDPA);
    EXPECT_EQ(resolveAttentionBackend(AttentionBackend::Math, true, false), AttentionBackend::Math);
    for (const char* name : {"auto", "fused", "fused-fp32", "sdpa", "math"})
        EXPECT_EQ(attentionBackendName(parseAttentionBackend(name)), name);
}

// L = 2, one head, one query point, one value point, no pair terms: every quantity of docs/MATH.md §2
// computed by hand with plain doubles (no tensors), then compared with both backends.
TEST(FlashIPALayer, TinyCaseByHand) {
    ModelConfig config;
    config.nodeDim = 5;
    config.headDim = 1;
    config.numHeads = 1;
    config.queryPoints = 1;
    config.valuePoints = 1;
    config.pairRank = 0;
    config.relPosFrequencies = 0;
    FlashIPALayer layer(config);
    layer->to(torch::kFloat64);
    // Node features and hand-chosen projections: q = s0, k = s1, v = s2,
    // local points q_pt = (s0, s1, 0), k_pt = (0, s2, s3), v_pt = (s3, 0, s4); theta = 0.3.
    const double s[2][5] = {{0.5, -1.0, 2.0, 0.3, -0.7}, {1.5, 0.25, -0.5, 1.0, 0.8}};
    {
        torch::NoGradGuard noGrad;
        for (auto& p : layer->parameters())
            p.zero_();
        auto set = [](torch::Tensor w, std::vector<std::array<int, 2>> ones) {
            for (auto [row, col] : ones)
                w.index_put_({row, col}, 1.0);
        };
        set(layer->linearQ->weight, {{0, 0}});
        set(layer->linearK->weight, {{0, 1}});
        set(layer->linearV->weight, {{0, 2}});
        set(layer->linearQPoints->weight, {{0, 0}, {1, 1}});
        set(layer->linearKPoints->weight, {{1, 2}, {2, 3}});
        set(layer->linearVPoints->weight, {{0, 3}, {2, 4}});
        layer->linearOut->weight.copy_(torch::eye(5, torch::kFloat64)); // output = the concatenated features
        layer->headWeights.fill_(0.3);
    }
    // Frames: residue 0 at the origin, unrotated; residue 1 rotated 90 degrees about z, at (1, 2, 0).
    const double R[2][3][3] = {{{1, 0, 0}, {0, 1, 0}, {0, 0, 1}}, {{0, -1, 0}, {1, 0, 0}, {0, 0, 1}}};
    const double t[2][3] = {{0, 0, 0}, {1, 2, 0}};

    // --- by hand ---
    auto apply = [&](int i, const double local[3], double out[3]) {
        for (int a = 0; a < 3; a++)
            out[a] = t[i][a] + R[i][a][0] * local[0] + R[i][a][1] * local[1] + R[i][a][2] * local[2];
    };
    const double wL = std::sqrt(1.0 / 3.0), wC = std::sqrt(2.0 / 9.0), gamma = std::log1p(std::exp(0.3));
    double qg[2][3], kg[2][3], vg[2][3];
    for (int i = 0; i < 2; i++) {
        const double ql[3] = {s[i][0], s[i][1], 0}, kl[3] = {0, s[i][2], s[i][3]}, vl[3] = {s[i][3], 0, s[i][4]};
        apply(i, ql, qg[i]);
        apply(i, kl, kg[i]);
        apply(i, vl, vg[i]);
    }
    double expected[2][5];
    for (int i = 0; i < 2; i++) {
        double logit[2];
        for (int j = 0; j < 2; j++) {
            double d2 = 0;
            for (int a = 0; a < 3; a++)
                d2 += (qg[i][a] - kg[j][a]) * (qg[i][a] - kg[j][a]);
            logit[j] = wL * (s[i][0] * s[j][1] / 1.0 - gamma * wC / 2 * d2);
        }
        double m = std::max(logit[0], logit[1]);
        double e0 = std::exp(logit[0] - m), e1 = std::exp(logit[1] - m);
        double a[2] = {e0 / (e0 + e1), e1 / (e0 + e1)};
        double o = a[0] * s[0][2] + a[1] * s[1][2];
        double global[3], local[3];
        for (int x = 0; x < 3; x++)
            global[x] = a[0] * vg[0][x] + a[1] * vg[1][x] - t[i][x];
        for (int x = 0; x < 3; x++) // R^T (global - t)
            local[x] = R[i][0][x] * global[0] + R[i][1][x] * global[1] + R[i][2][x] * global[2];
        expected[i][0] = o;
        for (int x = 0; x < 3; x++)
            expected[i][1 + x] = local[x];
        expected[i][4] = std::sqrt(local[0] * local[0] + local[1] * local[1] + local[2] * local[2] + 1e-8);
    }

    IPAInputs in;
    in.nodes = torch::tensor(std::vector<double>(&s[0][0], &s[0][0] + 10), torch::kFloat64).view({1, 2, 5});
    in.frames.rotations = torch::tensor(std::vector<double>(&R[0][0][0], &R[0][0][0] + 18), torch::kFloat64).view({1, 2, 3, 3});
    in.frames.translations = torch::tensor(std::vector<double>(&t[0][0], &t[0][0] + 6), torch::kFloat64).view({1, 2, 3});
    in.positions = torch::arange(2, torch::kFloat64).unsqueeze(0);
    torch::Tensor want = torch::tensor(std::vector<double>(&expected[0][0], &expected[0][0] + 10), torch::kFloat64).view({1, 2, 5});
    for (AttentionBackend backend : {AttentionBackend::Math, AttentionBackend::SDPA}) {
        torch::Tensor got = layer->forward(in, backend);
        EXPECT_LT(relativeError(got, want), 1e-12) << attentionBackendName(backend) << "\n" << got << "\n" << want;
    }
}

} // namespace
