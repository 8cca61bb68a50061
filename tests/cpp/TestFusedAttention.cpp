// The fused FlashIPA kernel (models/kernels) against independent oracles:
//  - the layer's math path in float64 (materialised logits, direct point differences): outputs and
//    the gradients of every input (nodes, pair factors, frame rotations and translations) and every
//    parameter, for L in {1, 17, 256, 4097} and pair rank r in {0, 2, 16};
//  - a dense per-segment attention written here for packed chains of different lengths;
//  - invariance at L = 100,000 with the structure 100 nm from the origin.
// GPU tests skip where there is no CUDA device; input checks run everywhere.
#include "TestStructures.h"
#include "flashipa/EnergyModel.h"
#include "flashipa/FusedAttention.h"
#include "TestRequireGPU.h"
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <optional>

using namespace FlashIPAPlugin;
using namespace FlashIPATest;

namespace {

/** Random per-residue rotations [1, L, 3, 3] (from normalised quaternions) in double. */
torch::Tensor randomRotations(int64_t L) {
    torch::Tensor q = torch::randn({1, L, 4}, torch::kFloat64);
    q = q / q.norm(2, -1, true);
    auto w = q.select(-1, 0), x = q.select(-1, 1), y = q.select(-1, 2), z = q.select(-1, 3);
    return torch::stack({1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                         2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                         2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)}, -1)
        .view({1, L, 3, 3});
}

/**
 * Layer inputs in double on the CPU: a compact chain of L residues. Frame origins follow a random walk
 * of 0.38 nm steps (the C-alpha spacing) confined to a sphere of protein-like density, so that
 * consecutive residues are neighbours in space as in every biomolecule; orientations are random.
 */
IPAInputs compactChain(const ModelConfig& config, int64_t L, unsigned seed) {
    torch::manual_seed(seed);
    IPAInputs in;
    in.nodes = torch::randn({1, L, config.nodeDim}, torch::kFloat64);
    if (config.pairRank > 0) {
        in.pairLeft = torch::randn({1, L, config.pairRank, config.pairDim}, torch::kFloat64);
        in.pairRight = torch::randn({1, L, config.pairRank, config.pairDim}, torch::kFloat64);
    }
    in.frames.rotations = randomRotations(L);
    const double radius = 0.5 * std::cbrt((double) L) + 0.5; // ~ 0.13 nm^3 per residue
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal;
    std::vector<double> walk(3 * L, 0.0);
    for (int64_t i = 1; i < L; i++)
        for (;;) {
            double step[3] = {normal(rng), normal(rng), normal(rng)}, norm2 = 0.0, next[3];
            const double length = std::sqrt(step[0] * step[0] + step[1] * step[1] + step[2] * step[2]);
            for (int d = 0; d < 3; d++) {
                next[d] = walk[3 * (i - 1) + d] + 0.38 * step[d] / length;
                norm2 += next[d] * next[d];
            }
            if (norm2 <= radius * radius) {
                std::copy(next, next + 3, walk.begin() + 3 * i);
                break;
            }
        }
    in.frames.translations = torch::tensor(walk, torch::kFloat64).view({1, L, 3});
    in.positions = torch::arange(L, torch::kFloat64).unsqueeze(0);
    return in;
}

/** A copy of the inputs with the given type and device, differentiable where the oracle needs gradients. */
IPAInputs cast(const IPAInputs& in, torch::Dtype dtype, torch::Device device, bool grad) {
    auto c = [&](const torch::Tensor& t) { return t.defined() ? t.to(device, dtype).detach().requires_grad_(grad) : t; };
    IPAInputs out;
    out.nodes = c(in.nodes);
    out.pairLeft = c(in.pairLeft);
    out.pairRight = c(in.pairRight);
    out.frames.rotations = c(in.frames.rotations);
    out.frames.translations = c(in.frames.translations);
    // Positions stay float32 or wider in every network type (IPAInputs::positions).
    out.positions = in.positions.to(device, dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32);
    if (in.mask.defined())
        out.mask = in.mask.to(device);
    return out;
}

struct LayerRun {
    torch::Tensor output;
    std::map<std::string, torch::Tensor> gradients; // inputs and parameters
};

/** Output and gradients of sum(output * weights) for one backend. */
LayerRun runLayer(FlashIPALayer& layer, const IPAInputs& in, AttentionBackend backend, const torch::Tensor& weights) {
    for (auto& p : layer->parameters())
        p.mutable_grad() = torch::Tensor();
    LayerRun run;
    run.output = layer->forward(in, backend);
    (run.output * weights.to(run.output.dtype())).sum().backward();
    run.gradients["input nodes"] = in.nodes.grad();
    if (in.pairLeft.defined()) {
        run.gradients["input pairLeft"] = in.pairLeft.grad();
        run.gradients["input pairRight"] = in.pairRight.grad();
    }
    run.gradients["input rotations"] = in.frames.rotations.grad();
    run.gradients["input translations"] = in.frames.translations.grad();
    for (const auto& item : layer->named_parameters())
        if (item.value().grad().defined())
            run.gradients["parameter " + item.key()] = item.value().grad();
    return run;
}

ModelConfig smallConfig(int rank) {
    ModelConfig config;
    config.nodeDim = 32;
    config.headDim = 16;
    config.numHeads = 2;
    config.queryPoints = 4;
    config.valuePoints = 3;
    config.pairRank = rank;
    config.pairDim = 16;
    config.relPosFrequencies = 2;
    return config;
}

/** The fused backend that keeps a layer's own type: fp32 operands for an fp32 layer, fp16 for fp16. */
AttentionBackend fusedIn(torch::Dtype dtype) {
    return dtype == torch::kFloat32 ? AttentionBackend::FusedFP32 : AttentionBackend::Fused;
}

/**
 * Fused (a layer in `dtype`; by default the fused backend of that type) against the math path in
 * float64 with the same parameters (rounded to `dtype` first, so both see one function). Tolerances are
 * relative norms over whole tensors.
 */
void compareWithMath(const ModelConfig& config, int64_t L, torch::Dtype dtype, double outputTolerance, double gradientTolerance,
                     bool relativeToSDPA = false, std::optional<AttentionBackend> backend = std::nullopt) {
    const torch::Device cuda(torch::kCUDA);
    FlashIPALayer fused(config), oracle(config);
    randomizeParameters(*fused, 100 + L, 0.5);
    fused->to(cuda, dtype);
    oracle->to(cuda, torch::kFloat64);
    {
        torch::NoGradGuard noGrad;
        auto source = fused->named_parameters();
        for (auto& item : oracle->named_parameters())
            item.value().copy_(source[item.key()].to(torch::kFloat64));
    }
    IPAInputs base = compactChain(config, L, 7 + (unsigned) L);
    IPAInputs rounded = cast(cast(base, dtype, torch::kCPU, false), torch::kFloat64, torch::kCPU, false);
    torch::Tensor weights = torch::randn({1, L, config.nodeDim}, torch::kFloat64).to(cuda);
    IPAInputs fusedInputs = cast(rounded, dtype, cuda, true), oracleInputs = cast(rounded, torch::kFloat64, cuda, true);
    // Rotations and translations stay fp32 for the fused path's points (the layer casts them itself).
    LayerRun got = runLayer(fused, fusedInputs, backend.value_or(fusedIn(dtype)), weights);
    LayerRun want = runLayer(oracle, oracleInputs, AttentionBackend::Math, weights);
    LayerRun sdpa;
    if (relativeToSDPA)
        sdpa = runLayer(fused, cast(rounded, dtype, cuda, true), AttentionBackend::SDPA, weights);
    EXPECT_GT(want.output.abs().max().item<double>(), 1e-3) << "the comparison is not between zeros";
    // With relativeToSDPA the bar is the published algorithm in the same precision: no worse than twice
    // its error, or the stated tolerance, whichever is larger.
    auto bar = [&](double tolerance, double sdpaError) { return relativeToSDPA ? std::max(tolerance, 2.0 * sdpaError) : tolerance; };
    EXPECT_LT(relativeError(got.output, want.output), bar(outputTolerance, relativeToSDPA ? relativeError(sdpa.output, want.output) : 0.0))
        << "output, L=" << L << " r=" << config.pairRank;
    ASSERT_EQ(got.gradients.size(), want.gradients.size());
    // Some gradients are zero in exact arithmetic (the key projection's bias shifts every logit of a
    // row equally, and softmax ignores that); those are measured against the largest gradient's norm.
    // What such a gradient holds is the rounding noise of the terms that cancel in it, which scales with
    // the attention operands' unit roundoff u: measured, linearK.bias held 6e-5 of the largest gradient
    // with bf16 operands (H100; u = 2^-8, so 0.015 u) and 1.04e-5 with fp16 operands (H200; u = 2^-11,
    // 0.021 u). The bar for such a gradient is 0.1 u of the largest (five times the noise measured in
    // either precision), i.e. a floor of 0.1 u / gradientTolerance, never below 1e-3.
    const bool float16Operands = dtype == torch::kHalf || (backend && (*backend == AttentionBackend::Auto || *backend == AttentionBackend::Fused));
    const double roundoff = float16Operands ? std::ldexp(1.0, -11) : dtype == torch::kBFloat16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -24);
    double largest = 0.0;
    for (const auto& item : want.gradients)
        largest = std::max(largest, item.second.norm().item<double>());
    const double zeroGradientFloor = std::max(1e-3, 0.1 * roundoff / gradientTolerance) * largest;
    for (const auto& [name, reference] : want.gradients) {
        ASSERT_TRUE(got.gradients.count(name) && got.gradients.at(name).defined()) << name;
        auto error = [&](const torch::Tensor& x) {
            return (x.to(torch::kFloat64) - reference).norm().item<double>() / std::max(reference.norm().item<double>(), zeroGradientFloor);
        };
        const double sdpaError = relativeToSDPA ? error(sdpa.gradients.at(name)) : 0.0;
        EXPECT_LT(error(got.gradients.at(name)), bar(gradientTolerance, sdpaError))
            << name << ", L=" << L << " r=" << config.pairRank << " (sdpa in the same precision: " << sdpaError << ")";
    }
}

struct SizeCase {
    int64_t L;
    int rank;
};

/** How GoogleTest (and so CTest's test names) print a case. */
void PrintTo(const SizeCase& c, std::ostream* os) {
    *os << "L=" << c.L << " rank=" << c.rank;
}

class FusedVersusMath : public ::testing::TestWithParam<SizeCase> {};

// fp32 kernel (fp32 storage and arithmetic) against float64: outputs to 1e-5; gradients, which are
// fp32 sums over up to L^2 = 16.8M pairs (the relative-position weights collect all of them), to 1e-3.
TEST_P(FusedVersusMath, Float32OutputsAndEveryGradient) {
    REQUIRE_GPU();
    compareWithMath(smallConfig(GetParam().rank), GetParam().L, torch::kFloat32, 1e-5, 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Sizes, FusedVersusMath,
                         ::testing::Values(SizeCase{1, 0}, SizeCase{1, 2}, SizeCase{1, 16}, SizeCase{17, 0}, SizeCase{17, 2},
                                           SizeCase{17, 16}, SizeCase{256, 0}, SizeCase{256, 2}, SizeCase{256, 16},
                                           SizeCase{4097, 0}, SizeCase{4097, 2}, SizeCase{4097, 16}),
                         [](const ::testing::TestParamInfo<SizeCase>& info) {
                             return "L" + std::to_string(info.param.L) + "_rank" + std::to_string(info.param.rank);
                         });

/**
 * Runs an fp16 check once per kind of kernel the device has, forward and backward alike: the fastest
 * (wgmma on compute capability 9.0), mma.sync, and the fp32 SIMT kernels on the same fp16 operands.
 * Restores the default afterwards.
 */
template <typename Check>
void forEachKernel(Check check) {
    const std::vector<std::pair<FusedKernelLimit, const char*>> kernels = {
        {FusedKernelLimit::Fastest, "fastest kernels (wgmma on sm_90)"}, {FusedKernelLimit::MmaSync, "mma.sync kernels"},
        {FusedKernelLimit::Simt, "SIMT kernels"}};
    for (auto [kernel, name] : kernels) {
        SCOPED_TRACE(name);
        setFusedKernelLimit(kernel);
        check();
    }
    setFusedKernelLimit(FusedKernelLimit::Fastest);
}

// fp16 (the network and the kernel's scalar operands in fp16) against float64 with the same rounded
// parameters and inputs. fp16 carries 11 bits and the whole network runs in it, so the bar is the
// published algorithm (the SDPA path) run in fp16 on the same layer: the fused kernel may not be worse
// than twice its error (outputs and every gradient), and is always allowed 1e-2 (outputs) / 2e-2
// (gradients).
TEST(FusedAttention, Float16AgainstMathInFloat64) {
    REQUIRE_GPU();
    forEachKernel([] {
        for (int64_t L : {17, 256, 4097})
            compareWithMath(smallConfig(2), L, torch::kHalf, 1e-2, 2e-2, true);
    });
}

// The default on CUDA ("auto" resolves to "fused"): an fp32 network whose attention runs with fp16 scalar
// operands on the tensor cores and fp32 points. Only the attention's operands and probabilities are
// rounded (2^-12 relative each): 5e-3 on outputs, 1e-2 on gradients, on every kind of kernel.
TEST(FusedAttention, Float32NetworkWithFloat16AttentionAgainstMathInFloat64) {
    REQUIRE_GPU();
    forEachKernel([] {
        for (int64_t L : {17, 256, 4097})
            compareWithMath(smallConfig(2), L, torch::kFloat32, 5e-3, 1e-2, false, AttentionBackend::Auto);
    });
}

/** The published layer's widths with a pair rank: lifted value rows of 128 + 36 + rank * 32 columns. */
ModelConfig publishedWidths(int rank) {
    ModelConfig config;
    config.nodeDim = 256, config.headDim = 128, config.numHeads = 8, config.queryPoints = 8, config.valuePoints = 12;
    config.pairRank = rank, config.pairDim = 128, config.relPosFrequencies = 0;
    return config;
}

// Beyond any fixed head-dimension limit: the kernels split the value rows into chunks (fp32: SIMT;
// fp16: the tensor-core forward, three chunks of 256 columns, value points in the first; the backward's
// tiles would not fit in shared memory, so it runs the SIMT kernels).
TEST(FusedAttention, PublishedWidthsWithRank16) {
    REQUIRE_GPU();
    compareWithMath(publishedWidths(16), 256, torch::kFloat32, 1e-5, 1e-3);
    forEachKernel([] { compareWithMath(publishedWidths(16), 300, torch::kHalf, 1e-2, 2e-2, true); });
}

// The configuration the benchmark times (benchmarks/results/fused_layer_h100.md): published widths with
// rank 2 in fp16, where the tensor-core backward runs with 144 scalar columns (18 accumulator tiles) and
// one value chunk of 256 columns. 700 rows: several key tiles, whole tiles and a ragged last one.
TEST(FusedAttention, PublishedWidthsWithRank2InFloat16) {
    REQUIRE_GPU();
    forEachKernel([] { compareWithMath(publishedWidths(2), 700, torch::kHalf, 1e-2, 2e-2, true); });
}

/** Dense attention of docs/MATH.md §4 for one segment, in double, written independently of the layer. */
torch::Tensor denseSegment(const FusedAttentionInputs& in, int64_t begin, int64_t end, double scalarScale, double biasScale) {
    auto seg = [&](const torch::Tensor& t) { return t.narrow(0, begin, end - begin).to(torch::kFloat64); };
    torch::Tensor q = seg(in.q), k = seg(in.k), v = seg(in.v), bl = seg(in.biasLeft), br = seg(in.biasRight);
    torch::Tensor x = seg(in.queryPoints), y = seg(in.keyPoints), vp = seg(in.valuePoints), z = seg(in.pairValues);
    const int64_t H = q.size(1);
    torch::Tensor logits = scalarScale * torch::einsum("ihc,jhc->hij", {q, k}) + biasScale * torch::einsum("ihr,jhr->hij", {bl, br});
    torch::Tensor d2 = (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum({-1, -2}).permute({2, 0, 1}); // [H, i, j]
    logits = logits - 0.5 * in.pointWeight.to(torch::kFloat64).view({H, 1, 1}) * d2;
    torch::Tensor a = torch::softmax(logits, -1);
    torch::Tensor o = torch::einsum("hij,jhc->ihc", {a, v});
    torch::Tensor op = torch::einsum("hij,jhp->ihp", {a, vp.flatten(2)});
    torch::Tensor oz = torch::einsum("hij,jd->ihd", {a, z.flatten(1)});
    return torch::cat({o, op, oz}, -1);
}

/**
 * Chains of the given lengths and a padding row packed into one call against the dense oracle: each
 * chain attends only to itself, padding gives zeros, gradients match. Scalar features in `element`
 * (the oracle sees the same rounded values); tolerances relative, for outputs and gradients.
 */
void checkPackedChains(const std::vector<int64_t>& lengths, torch::Dtype element, double outputTolerance, double gradientTolerance) {
    torch::manual_seed(5);
    int64_t N = 1;
    for (int64_t n : lengths)
        N += n;
    const int64_t H = 3, c = 8, Rb = 3, Pq = 4, Pv = 2, r = 2, dz = 5;
    auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
    auto leaf = [&](std::vector<int64_t> shape, double scale, torch::Dtype dtype) {
        return (torch::randn(shape, opts) * scale).to(dtype).requires_grad_(true);
    };
    FusedAttentionInputs in;
    in.q = leaf({N, H, c}, 1, element), in.k = leaf({N, H, c}, 1, element), in.v = leaf({N, H, c}, 1, element);
    in.biasLeft = leaf({N, H, Rb}, 1, element), in.biasRight = leaf({N, H, Rb}, 1, element);
    in.queryPoints = leaf({N, H, Pq, 3}, 1.5, torch::kFloat32), in.keyPoints = leaf({N, H, Pq, 3}, 1.5, torch::kFloat32);
    in.valuePoints = leaf({N, H, Pv, 3}, 1.5, torch::kFloat32);
    in.pairValues = leaf({N, r, dz}, 1, element);
    in.pointWeight = (torch::rand({H}, opts) * 0.3 + 0.05).requires_grad_(true);
    std::vector<int> segment;
    for (size_t s = 0; s < lengths.size(); s++)
        segment.insert(segment.end(), lengths[s], (int) s);
    segment.push_back(-1);
    in.segment = torch::tensor(segment, torch::kInt32).to(torch::kCUDA);
    const double scalarScale = 0.2, biasScale = 0.6;
    torch::Tensor got = fusedIPAAttention(in, scalarScale, biasScale);
    std::vector<torch::Tensor> parts;
    int64_t begin = 0;
    for (int64_t n : lengths) {
        parts.push_back(denseSegment(in, begin, begin + n, scalarScale, biasScale));
        begin += n;
    }
    parts.push_back(torch::zeros({1, H, got.size(2)}, got.options().dtype(torch::kFloat64)));
    torch::Tensor want = torch::cat(parts, 0);
    EXPECT_LT(relativeError(got, want), outputTolerance);
    EXPECT_EQ(got.index({N - 1}).abs().max().item<double>(), 0.0);
    torch::Tensor weights = torch::randn(got.sizes(), opts.dtype(torch::kFloat64));
    std::vector<torch::Tensor> leaves = {in.q, in.k, in.v, in.biasLeft, in.biasRight, in.queryPoints, in.keyPoints, in.valuePoints,
                                         in.pairValues, in.pointWeight};
    const std::vector<std::string> names = {"q", "k", "v", "biasLeft", "biasRight", "queryPoints", "keyPoints", "valuePoints",
                                            "pairValues", "pointWeight"};
    auto gotGrads = torch::autograd::grad({(got * weights).sum()}, leaves);
    auto wantGrads = torch::autograd::grad({(want * weights).sum()}, leaves);
    for (size_t i = 0; i < leaves.size(); i++)
        EXPECT_LT(relativeError(gotGrads[i], wantGrads[i]), gradientTolerance) << names[i];
}

TEST(FusedAttention, PackedChainsMatchDenseOracle) {
    REQUIRE_GPU();
    checkPackedChains({5, 70, 131}, torch::kFloat32, 1e-5, 1e-4);
}

// The same in fp16, with chains long enough that segment boundaries fall inside and between the
// tensor-core kernels' tiles (128 query rows, 64 keys) and some tiles lie inside one chain (the
// mask-free path). fp16 rounds the probabilities (2^-12 relative): 2e-3 on outputs, 6e-3 on gradients.
TEST(FusedAttention, PackedChainsInFloat16) {
    REQUIRE_GPU();
    forEachKernel([] { checkPackedChains({5, 70, 131, 300, 64}, torch::kHalf, 2e-3, 6e-3); });
}

/**
 * Output and translation gradients of the layer at L residues for a structure moved by a rotation
 * and a shift. The moved frames are made in double and rounded once, as a user's coordinates would be.
 */
std::pair<torch::Tensor, torch::Tensor> movedLayer(FlashIPALayer& layer, const IPAInputs& base, const torch::Tensor& rotation,
                                                   double shift, torch::Dtype dtype, AttentionBackend backend) {
    const torch::Device cuda(torch::kCUDA);
    IPAInputs in = cast(base, dtype, cuda, false);
    torch::Tensor R = rotation.to(cuda);
    in.frames.rotations = torch::matmul(R, base.frames.rotations.to(cuda)).to(torch::kFloat32);
    in.frames.translations = (torch::matmul(base.frames.translations.to(cuda), R.t()) + shift).to(torch::kFloat32).requires_grad_(true);
    torch::Tensor out = layer->forward(in, backend);
    torch::Tensor weights = torch::cos(torch::arange(out.numel(), out.options().dtype(torch::kFloat32)) * 0.37).view(out.sizes());
    torch::Tensor force = torch::autograd::grad({(out.to(torch::kFloat32) * weights).sum()}, {in.frames.translations})[0];
    return {out.detach().to(torch::kFloat64), force.to(torch::kFloat64)}; // the gradient in the moved coordinates
}

// docs/MATH.md §5 / issue target: 100,000 residues, 100 nm from the origin. Outputs must not change
// (<= 1e-5 relative in fp32, <= 2e-3 where the attention's scalar operands are fp16: an fp16 network,
// and the default for fp32 networks) and gradients with respect to the frame origins must rotate with
// the structure (same tolerances).
TEST(FusedAttention, InvariantFarFromOriginAtL100000) {
    REQUIRE_GPU();
    ModelConfig config = smallConfig(2);
    const int64_t L = 100000;
    IPAInputs base = compactChain(config, L, 3);
    const torch::Tensor rotation = randomRotation(11);
    struct Case {
        torch::Dtype dtype;
        AttentionBackend backend;
        double tolerance;
        const char* name;
    };
    for (const Case& run : {Case{torch::kFloat32, AttentionBackend::FusedFP32, 1e-5, "fp32"}, Case{torch::kHalf, AttentionBackend::Fused, 2e-3, "fp16"},
                            Case{torch::kFloat32, AttentionBackend::Fused, 2e-3, "fp32 network, fp16 attention"}}) {
        const torch::Dtype dtype = run.dtype;
        const double tolerance = run.tolerance;
        FlashIPALayer layer(config);
        randomizeParameters(*layer, 4, 0.5);
        layer->to(torch::kCUDA, dtype);
        auto check = [&] {
            auto [out0, force0] = movedLayer(layer, base, torch::eye(3, torch::kFloat64), 0.0, dtype, run.backend);
            auto [out1, force1] = movedLayer(layer, base, rotation, 100.0, dtype, run.backend);
            // force1 is in the moved frame; rotate it back: f0 = R^T f1 (row vectors: f1 R).
            torch::Tensor force1Back = torch::matmul(force1, rotation.to(force1.device()));
            EXPECT_LT(relativeError(out1, out0), tolerance) << run.name << " output";
            EXPECT_LT(relativeError(force1Back, force0), tolerance) << run.name << " translation gradient";
        };
        if (run.backend == AttentionBackend::Fused)
            forEachKernel(check);
        else
            check();
    }
}

TEST(FusedAttention, RefusesDoubleBackward) {
    REQUIRE_GPU();
    auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(torch::kFloat32);
    FusedAttentionInputs in;
    in.q = torch::randn({4, 1, 2}, opts).requires_grad_(true), in.k = torch::randn({4, 1, 2}, opts), in.v = torch::randn({4, 1, 2}, opts);
    in.queryPoints = torch::randn({4, 1, 1, 3}, opts), in.keyPoints = torch::randn({4, 1, 1, 3}, opts);
    in.valuePoints = torch::randn({4, 1, 1, 3}, opts), in.pointWeight = torch::ones({1}, opts);
    in.segment = torch::zeros({4}, opts.dtype(torch::kInt32));
    // First-order gradients work; asking for a graph of them (create_graph) is refused with a message.
    torch::Tensor out = fusedIPAAttention(in, 1.0, 1.0);
    EXPECT_TRUE(torch::autograd::grad({out.sum()}, {in.q}, {}, true, false)[0].defined());
    try {
        torch::autograd::grad({out.sum()}, {in.q}, {}, false, true);
        FAIL() << "a differentiable gradient was returned";
    } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("double backward"), std::string::npos) << e.what();
    }
}

} // namespace

// These run everywhere: the checks come before any kernel.
TEST(FusedAttentionInputs, RefusesCPUTensorsAndBadShapes) {
    FusedAttentionInputs in;
    in.q = torch::randn({4, 1, 2}), in.k = torch::randn({4, 1, 2}), in.v = torch::randn({4, 1, 2});
    in.queryPoints = torch::randn({4, 1, 1, 3}), in.keyPoints = torch::randn({4, 1, 1, 3}), in.valuePoints = torch::randn({4, 1, 1, 3});
    in.pointWeight = torch::ones({1}), in.segment = torch::zeros({4}, torch::kInt32);
    try {
        fusedIPAAttention(in, 1.0, 1.0);
        FAIL() << "CPU tensors were accepted";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
    }
    in.k = torch::randn({4, 1, 3});
    EXPECT_THROW(fusedIPAAttention(in, 1.0, 1.0), std::invalid_argument);
}

TEST(FusedAttentionInputs, SegmentRangesAreRunsOfEqualIds) {
    auto [begin, end] = segmentKeyRanges(torch::tensor({0, 0, 1, 1, 1, -1, 2}, torch::kInt32));
    EXPECT_TRUE(torch::equal(begin, torch::tensor({0, 0, 2, 2, 2, 5, 6}, torch::kInt64)));
    EXPECT_TRUE(torch::equal(end, torch::tensor({2, 2, 5, 5, 5, 6, 7}, torch::kInt64)));
}

TEST(FusedAttentionInputs, RegisteredWithTheDispatcher) {
    auto schema = c10::Dispatcher::singleton().findSchema({"flashipa::fused_ipa_attention", ""});
    EXPECT_TRUE(schema.has_value());
}
