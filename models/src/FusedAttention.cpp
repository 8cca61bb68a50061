// The fused FlashIPA attention as a LibTorch operator with autograd: input checks, the autograd
// Function around the CUDA kernels (models/kernels), and the dispatcher registration
// flashipa::fused_ipa_attention. Builds without CUDA too; then every call explains that the kernels
// are missing.
#include "flashipa/FusedAttention.h"
#include "TensorCorePacking.h"
#include <atomic>
#include <climits>
#include <stdexcept>
#include <torch/library.h>

#ifdef FLASHIPA_HAVE_FUSED_KERNEL
#include "../kernels/FusedAttentionProblem.h"
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace FlashIPAPlugin {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool fusedAttentionAvailable() {
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
    return true;
#else
    return false;
#endif
}

#ifdef FLASHIPA_HAVE_FUSED_KERNEL
namespace {
std::atomic<FusedKernelLimit> kernelLimit{FusedKernelLimit::Fastest};
}
#endif

void setFusedKernelLimit(FusedKernelLimit limit) {
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
    kernelLimit.store(limit);
#else
    (void) limit;
#endif
}

std::pair<torch::Tensor, torch::Tensor> segmentKeyRanges(const torch::Tensor& segment) {
    const int64_t n = segment.size(0);
    auto options = segment.options().dtype(torch::kInt64);
    if (n == 0)
        return {torch::zeros({0}, options), torch::zeros({0}, options)};
    torch::Tensor ids = segment.to(torch::kInt64);
    torch::Tensor starts = torch::ones({n}, segment.options().dtype(torch::kBool));
    starts.narrow(0, 1, n - 1).copy_(ids.narrow(0, 1, n - 1) != ids.narrow(0, 0, n - 1));
    torch::Tensor run = torch::cumsum(starts.to(torch::kInt64), 0) - 1;   // run index of each row
    torch::Tensor runBegin = torch::nonzero(starts).flatten();             // first row of each run
    torch::Tensor runEnd = torch::cat({runBegin.narrow(0, 1, runBegin.size(0) - 1), torch::full({1}, n, options)});
    return {runBegin.index_select(0, run), runEnd.index_select(0, run)};
}

namespace {

void require(bool condition, const std::string& message) {
    if (!condition)
        throw std::invalid_argument("fused FlashIPA attention: " + message);
}

/** Checks shapes, types and devices. */
void checkInputs(const FusedAttentionInputs& in) {
    require(in.q.defined() && in.k.defined() && in.v.defined(), "q, k and v are required");
    require(in.q.dim() == 3 && in.k.sizes() == in.q.sizes() && in.v.sizes() == in.q.sizes(), "q, k and v must have one shape [N, H, c]");
    const int64_t N = in.q.size(0), H = in.q.size(1);
    require(in.q.is_cuda(), "the fused kernel runs on CUDA tensors only (use the \"sdpa\" or \"math\" backend on the CPU)");
    const auto element = in.q.scalar_type();
    require(element == torch::kFloat32 || element == torch::kBFloat16, "scalar features must be float32 or bfloat16");
    auto sameKind = [&](const torch::Tensor& t, const char* name) {
        require(t.scalar_type() == element && t.device() == in.q.device(), std::string(name) + " must match q's type and device");
    };
    sameKind(in.k, "k");
    sameKind(in.v, "v");
    require(in.biasLeft.defined() == in.biasRight.defined(), "give both bias factors or neither");
    if (in.biasLeft.defined()) {
        require(in.biasLeft.dim() == 3 && in.biasLeft.size(0) == N && in.biasLeft.size(1) == H && in.biasRight.sizes() == in.biasLeft.sizes(),
                "bias factors must have shape [N, H, Rb]");
        sameKind(in.biasLeft, "biasLeft");
        sameKind(in.biasRight, "biasRight");
    }
    auto points = [&](const torch::Tensor& t, const char* name) {
        require(t.defined() && t.dim() == 4 && t.size(0) == N && t.size(1) == H && t.size(3) == 3,
                std::string(name) + " must have shape [N, H, P, 3]");
        require(t.scalar_type() == torch::kFloat32 && t.device() == in.q.device(), std::string(name) + " must be float32 on q's device");
    };
    points(in.queryPoints, "queryPoints");
    points(in.keyPoints, "keyPoints");
    points(in.valuePoints, "valuePoints");
    require(in.keyPoints.size(2) == in.queryPoints.size(2), "query and key points must have the same count");
    if (in.pairValues.defined()) {
        require(in.pairValues.dim() == 3 && in.pairValues.size(0) == N, "pair values must have shape [N, r, c_z/4]");
        sameKind(in.pairValues, "pairValues");
    }
    require(in.pointWeight.defined() && in.pointWeight.dim() == 1 && in.pointWeight.size(0) == H &&
                in.pointWeight.scalar_type() == torch::kFloat32 && in.pointWeight.device() == in.q.device(),
            "pointWeight must be float32 [H] on q's device");
    require(in.segment.defined() && in.segment.dim() == 1 && in.segment.size(0) == N && in.segment.device() == in.q.device() &&
                !in.segment.is_floating_point(),
            "segment must be an integer tensor [N] on q's device");
    require(in.keyBegin.defined() == in.keyEnd.defined(), "give both key-range tensors or neither");
    require(N < (int64_t) std::numeric_limits<int>::max(), "too many rows for 32-bit row indices");
}

#ifdef FLASHIPA_HAVE_FUSED_KERNEL

using namespace packing;

kernels::FusedAttentionProblem describe(const std::vector<torch::Tensor>& t, double scalarScale, double biasScale) {
    // t: q k v biasLeft biasRight queryPoints keyPoints valuePoints pairValues pointWeight segment keyBegin keyEnd
    kernels::FusedAttentionProblem p;
    p.rows = (int) t[0].size(0);
    p.heads = (int) t[0].size(1);
    p.headDim = (int) t[0].size(2);
    p.biasRank = (int) t[3].size(2);
    p.queryPoints = (int) t[5].size(2);
    p.valuePoints = (int) t[7].size(2);
    p.pairRank = (int) t[8].size(1);
    p.pairValueDim = (int) t[8].size(2);
    p.scalarScale = (float) scalarScale;
    p.biasScale = (float) biasScale;
    p.element = t[0].scalar_type() == torch::kBFloat16 ? kernels::ElementType::BFloat16 : kernels::ElementType::Float32;
    p.q = t[0].data_ptr();
    p.k = t[1].data_ptr();
    p.v = t[2].data_ptr();
    p.biasLeft = t[3].data_ptr();
    p.biasRight = t[4].data_ptr();
    p.queryPointsGlobal = t[5].data_ptr<float>();
    p.keyPointsGlobal = t[6].data_ptr<float>();
    p.valuePointsGlobal = t[7].data_ptr<float>();
    p.pairValues = t[8].data_ptr();
    p.pointWeight = t[9].data_ptr<float>();
    p.segment = t[10].data_ptr<int>();
    p.keyBegin = t[11].data_ptr<int>();
    p.keyEnd = t[12].data_ptr<int>();
    return p;
}

/** Operands of the tensor-core forward, packed with LibTorch ops (see kernels::TensorCorePack). */
struct PackedOperands {
    std::vector<torch::Tensor> keepAlive;
    kernels::TensorCorePack pack;
};

PackedOperands packForTensorCores(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p, const torch::Tensor& pointWeight,
                                  kernels::TensorCorePack::Layout layout) {
    const bool tiled = layout == kernels::TensorCorePack::Layout::CoreMatrixTiles;
    const int64_t N = p.rows, H = p.heads, Pq = p.queryPoints;
    const int64_t padded = (N + kernels::TensorCoreQueryTile - 1) / kernels::TensorCoreQueryTile * kernels::TensorCoreQueryTile;
    const int64_t keyColumns = kernels::tensorCoreForwardKeyColumns(p);
    const auto bf16 = t[0].options().dtype(torch::kBFloat16);
    auto zeros = [&](int64_t columns) { return torch::zeros({N, H, columns}, bf16); };
    auto pad = [&](const torch::Tensor& x) { return padRows(x, padded); };
    // Points relative to their tile's centre (key tiles: the key points' centre, or the value points'
    // where there are no key points), split into bf16 hi + lo for the logits' cross term.
    torch::Tensor queryCentres, keyCentres;
    torch::Tensor a = relativeToTile(t[5], t[5], kernels::TensorCoreQueryTile, padded, queryCentres);
    torch::Tensor b = relativeToTile(t[6], Pq > 0 ? t[6] : t[7], kernels::TensorCoreKeyTile, padded, keyCentres);
    auto [aHi, aLo] = splitBf16(a.flatten(2));
    auto [bHi, bLo] = splitBf16(b.flatten(2) * pointWeight.view({1, H, 1}));
    const int64_t fill = keyColumns - p.liftedKeyDim() - 9 * Pq;
    torch::Tensor queries = pad(torch::cat({t[0].to(torch::kBFloat16), t[3].to(torch::kBFloat16), aHi, aLo, aHi, zeros(fill)}, -1));
    torch::Tensor keys = pad(torch::cat({(t[1].to(torch::kFloat32) * p.scalarScale).to(torch::kBFloat16),
                                         (t[4].to(torch::kFloat32) * p.biasScale).to(torch::kBFloat16), bHi, bHi, bLo, zeros(fill)}, -1));
    // Values: [1 | key tile centre hi | lo | 0 | value points - centre | v | pair values] (TensorCorePack).
    const int64_t width = kernels::tensorCoreForwardValueWidth(p), chunk = kernels::tensorCoreValueChunk((int) width);
    const int64_t valueColumns = (width + chunk - 1) / chunk * chunk;
    torch::Tensor tileOfRow = torch::arange(N, t[0].options().dtype(torch::kInt64)).floor_divide(kernels::TensorCoreKeyTile);
    torch::Tensor centre = keyCentres.index_select(0, tileOfRow); // [N, H, 3]
    auto [centreHi, centreLo] = splitBf16(centre);
    torch::Tensor relativeValuePoints = (t[7] - centre.unsqueeze(2)).flatten(2).to(torch::kBFloat16);
    torch::Tensor pair = t[8].to(torch::kBFloat16).flatten(1).unsqueeze(1).expand({N, H, p.pairRank * p.pairValueDim});
    torch::Tensor values = pad(torch::cat({torch::ones({N, H, 1}, bf16), centreHi, centreLo, zeros(1), relativeValuePoints,
                                           t[2].to(torch::kBFloat16), pair, zeros(valueColumns - width)}, -1));
    if (tiled) {
        queries = coreMatrixTiles(queries, kernels::TensorCoreQueryTile);
        keys = coreMatrixTiles(keys, kernels::TensorCoreKeyTile);
        values = transposedCoreMatrixTiles(values, kernels::TensorCoreKeyTile);
    } else {
        values = values.permute({1, 2, 0}).contiguous();
    }
    torch::Tensor segments = torch::constant_pad_nd(t[10], {0, padded - N}, -1).contiguous();
    torch::Tensor tileSegments = commonSegmentPerTile(segments, kernels::TensorCoreKeyTile);
    PackedOperands out;
    out.keepAlive = {queries, keys, pointStats(a, padded), pointStats(b, padded), queryCentres, keyCentres, values, segments, tileSegments};
    kernels::TensorCorePack& k = out.pack;
    k.layout = layout;
    k.paddedRows = (int) padded;
    k.keyColumns = (int) keyColumns;
    k.valueColumns = (int) valueColumns;
    k.queries = out.keepAlive[0].data_ptr();
    k.keys = out.keepAlive[1].data_ptr();
    k.queryStats = out.keepAlive[2].data_ptr<float>();
    k.keyStats = out.keepAlive[3].data_ptr<float>();
    k.queryCentres = out.keepAlive[4].data_ptr<float>();
    k.keyCentres = out.keepAlive[5].data_ptr<float>();
    k.values = out.keepAlive[6].data_ptr();
    k.segments = out.keepAlive[7].data_ptr<int>();
    k.tileSegments = out.keepAlive[8].data_ptr<int>();
    return out;
}

/** Operands of the tensor-core backward, packed with LibTorch ops (see kernels::TensorCoreBackwardPack). */
struct PackedBackwardOperands {
    std::vector<torch::Tensor> keepAlive;
    kernels::TensorCoreBackwardPack pack;
};

PackedBackwardOperands packForTensorCoreBackward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p,
                                                 const torch::Tensor& gradOut, const torch::Tensor& logSumExp, const torch::Tensor& delta,
                                                 kernels::TensorCoreBackwardPack::Layout layout) {
    const bool tiled = layout == kernels::TensorCoreBackwardPack::Layout::CoreMatrixTiles;
    const int64_t N = p.rows, H = p.heads, c = p.headDim, Rb = p.biasRank, Pq = p.queryPoints, Pv = p.valuePoints;
    const int64_t padded = (N + kernels::TensorCoreQueryTile - 1) / kernels::TensorCoreQueryTile * kernels::TensorCoreQueryTile;
    const int64_t scalarColumns = kernels::tensorCoreBackwardScalarColumns((int) (c + Rb));
    const int64_t pointBlock = (3 * Pq + 7) / 8 * 8, pointColumns = (3 * pointBlock + 15) / 16 * 16;
    const auto bf16 = t[0].options().dtype(torch::kBFloat16), f32 = t[0].options().dtype(torch::kFloat32);
    auto zeros = [&](int64_t columns) { return torch::zeros({N, H, columns}, bf16); };
    auto pad = [&](const torch::Tensor& x) { return padRows(x, padded); };
    auto block = [&](const torch::Tensor& x) { return torch::cat({x, zeros(pointBlock - 3 * Pq)}, -1); };
    // Key tiles are centred on their key points, or on their value points where there are no key points.
    const torch::Tensor& keyCentreSource = Pq > 0 ? t[6] : t[7];
    torch::Tensor queryCentres, keyCentres;
    torch::Tensor a = relativeToTile(t[5], t[5], kernels::TensorCoreQueryTile, padded, queryCentres);
    torch::Tensor b = relativeToTile(t[6], keyCentreSource, kernels::TensorCoreKeyTile, padded, keyCentres);
    auto [aHi, aLo] = splitBf16(a.flatten(2));
    auto [bHi, bLo] = splitBf16(b.flatten(2));
    const int64_t scalarFill = scalarColumns - c - Rb, pointFill = pointColumns - 3 * pointBlock;
    torch::Tensor queries = pad(torch::cat({t[0].to(torch::kBFloat16), t[3].to(torch::kBFloat16), zeros(scalarFill), block(aHi),
                                            block(aLo), block(aHi), zeros(pointFill)}, -1));
    torch::Tensor keys = pad(torch::cat({(t[1].to(torch::kFloat32) * p.scalarScale).to(torch::kBFloat16),
                                         (t[4].to(torch::kFloat32) * p.biasScale).to(torch::kBFloat16), zeros(scalarFill), block(bHi),
                                         block(bHi), block(bLo), zeros(pointFill)}, -1));
    // Value rows with value points relative to their key tile's centre; the centre's share of dP is
    // added in fp32 by the kernel from the per-row sums of dOut over value points.
    const int64_t width = p.liftedValueDim(), chunk = kernels::tensorCoreValueChunk((int) width);
    const int64_t valueColumns = tiled ? kernels::wgmmaBackwardValueColumns((int) width) : (width + chunk - 1) / chunk * chunk;
    torch::Tensor tileOfRow = torch::arange(N, f32.dtype(torch::kInt64)).floor_divide(kernels::TensorCoreKeyTile);
    torch::Tensor valuePoints = (t[7] - keyCentres.index_select(0, tileOfRow).unsqueeze(2)).flatten(2);
    torch::Tensor pair = t[8].to(torch::kBFloat16).flatten(1).unsqueeze(1).expand({N, H, p.pairRank * p.pairValueDim});
    torch::Tensor values = pad(torch::cat({t[2].to(torch::kBFloat16), valuePoints.to(torch::kBFloat16), pair, zeros(valueColumns - width)}, -1));
    torch::Tensor gradRows = pad(torch::cat({gradOut.to(torch::kBFloat16), zeros(valueColumns - width)}, -1));
    torch::Tensor gradSums = gradOut.narrow(-1, c, 3 * Pv).reshape({N, H, Pv, 3}).sum(2);
    torch::Tensor rowTerms = pad(torch::cat({logSumExp.unsqueeze(-1), delta.unsqueeze(-1), gradSums, torch::zeros({N, H, 3}, f32)}, -1));
    // Per row: segment, key range; padding rows are segment -1. Per tile of rows: their common segment.
    auto int32 = t[10].options().dtype(torch::kInt32);
    torch::Tensor rowRanges = torch::stack({t[10], t[11], t[12], torch::zeros({N}, int32)}, 1);
    rowRanges = torch::cat({rowRanges, torch::tensor({-1, 0, 0, 0}, int32).expand({padded - N, 4})}).contiguous();
    torch::Tensor tileSegments =
        commonSegmentPerTile(rowRanges.select(1, 0), tiled ? kernels::TensorCoreKeyTile : kernels::TensorCoreBackwardTile);
    if (tiled) {
        queries = coreMatrixTiles(queries, kernels::TensorCoreKeyTile);
        keys = coreMatrixTiles(keys, kernels::TensorCoreKeyTile);
        gradRows = coreMatrixTiles(gradRows, kernels::TensorCoreKeyTile);
        values = coreMatrixTiles(values, kernels::TensorCoreKeyTile);
    }
    PackedBackwardOperands out;
    out.keepAlive = {queries,    keys,       pointStats(a, padded), pointStats(b, padded), queryCentres, keyCentres,
                     gradRows,   values,     rowTerms,              rowRanges,             tileSegments};
    kernels::TensorCoreBackwardPack& k = out.pack;
    k.layout = layout;
    k.paddedRows = (int) padded;
    k.scalarColumns = (int) scalarColumns;
    k.pointBlock = (int) pointBlock;
    k.keyColumns = (int) (scalarColumns + pointColumns);
    k.valueColumns = (int) valueColumns;
    k.queries = out.keepAlive[0].data_ptr();
    k.keys = out.keepAlive[1].data_ptr();
    k.queryStats = out.keepAlive[2].data_ptr<float>();
    k.keyStats = out.keepAlive[3].data_ptr<float>();
    k.queryCentres = out.keepAlive[4].data_ptr<float>();
    k.keyCentres = out.keepAlive[5].data_ptr<float>();
    k.gradOut = out.keepAlive[6].data_ptr();
    k.values = out.keepAlive[7].data_ptr();
    k.rowTerms = out.keepAlive[8].data_ptr<float>();
    k.rowRanges = out.keepAlive[9].data_ptr<int>();
    k.tileSegments = out.keepAlive[10].data_ptr<int>();
    return out;
}

/**
 * Runs the fastest backward that applies within the limit set by setFusedKernelLimit: wgmma (bf16 on
 * compute capability 9.0), mma.sync (bf16 on sm_80+), else the fp32 SIMT backward.
 */
void launchBackward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p, const torch::Tensor& gradOut,
                    const torch::Tensor& logSumExp, const torch::Tensor& delta, const kernels::FusedAttentionGradients& g) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const FusedKernelLimit limit = kernelLimit.load();
    using Layout = kernels::TensorCoreBackwardPack::Layout;
    if (p.rows > 0 && limit == FusedKernelLimit::Fastest && kernels::wgmmaBackwardApplies(p)) {
        PackedBackwardOperands packed = packForTensorCoreBackward(t, p, gradOut, logSumExp, delta, Layout::CoreMatrixTiles);
        if (kernels::launchFusedAttentionBackwardWgmma(p, packed.pack, g, stream))
            return;
    }
    if (p.rows > 0 && limit != FusedKernelLimit::Simt && kernels::tensorCoreBackwardApplies(p)) {
        PackedBackwardOperands packed = packForTensorCoreBackward(t, p, gradOut, logSumExp, delta, Layout::Rows);
        if (kernels::launchFusedAttentionBackwardTensorCore(p, packed.pack, g, stream))
            return;
    }
    kernels::launchFusedAttentionBackward(p, logSumExp.data_ptr<float>(), gradOut.data_ptr<float>(), delta.data_ptr<float>(), g, stream);
}

/**
 * Runs the fastest forward that applies within the limit set by setFusedKernelLimit: wgmma (bf16 on
 * compute capability 9.0), mma.sync (bf16 on sm_80+), else the fp32 SIMT forward. Returns the output
 * [N, H, liftedValueDim] and the log-sum-exp [N, H], allocated after the packing so that the packing's
 * temporaries and the fp32 output never coexist (the forward's peak memory).
 */
std::pair<torch::Tensor, torch::Tensor> launchForward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const auto options = t[0].options().dtype(torch::kFloat32);
    auto allocate = [&] {
        return std::make_pair(torch::empty({t[0].size(0), t[0].size(1), p.liftedValueDim()}, options), torch::empty({t[0].size(0), t[0].size(1)}, options));
    };
    const FusedKernelLimit limit = kernelLimit.load();
    if (p.rows > 0 && limit == FusedKernelLimit::Fastest && kernels::wgmmaForwardApplies(p)) {
        PackedOperands packed = packForTensorCores(t, p, t[9], kernels::TensorCorePack::Layout::CoreMatrixTiles);
        auto [out, logSumExp] = allocate();
        if (kernels::launchFusedAttentionForwardWgmma(p, packed.pack, out.data_ptr<float>(), logSumExp.data_ptr<float>(), stream))
            return {out, logSumExp};
    }
    if (p.rows > 0 && limit != FusedKernelLimit::Simt && kernels::tensorCoreForwardApplies(p)) {
        PackedOperands packed = packForTensorCores(t, p, t[9], kernels::TensorCorePack::Layout::Rows);
        auto [out, logSumExp] = allocate();
        if (kernels::launchFusedAttentionForwardTensorCore(p, packed.pack, out.data_ptr<float>(), logSumExp.data_ptr<float>(), stream))
            return {out, logSumExp};
    }
    auto [out, logSumExp] = allocate();
    kernels::launchFusedAttentionForward(p, out.data_ptr<float>(), logSumExp.data_ptr<float>(), stream);
    return {out, logSumExp};
}

class FusedAttentionFunction : public torch::autograd::Function<FusedAttentionFunction> {
public:
    static variable_list forward(AutogradContext* ctx, torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor biasLeft,
                                 torch::Tensor biasRight, torch::Tensor queryPoints, torch::Tensor keyPoints, torch::Tensor valuePoints,
                                 torch::Tensor pairValues, torch::Tensor pointWeight, torch::Tensor segment, torch::Tensor keyBegin,
                                 torch::Tensor keyEnd, double scalarScale, double biasScale) {
        std::vector<torch::Tensor> t = {q, k, v, biasLeft, biasRight, queryPoints, keyPoints, valuePoints, pairValues, pointWeight, segment, keyBegin, keyEnd};
        c10::cuda::CUDAGuard guard(q.device());
        kernels::FusedAttentionProblem p = describe(t, scalarScale, biasScale);
        auto [out, logSumExp] = launchForward(t, p);
        t.push_back(out);
        t.push_back(logSumExp);
        ctx->save_for_backward(t);
        ctx->saved_data["scalarScale"] = scalarScale;
        ctx->saved_data["biasScale"] = biasScale;
        return {out};
    }

    static variable_list backward(AutogradContext* ctx, variable_list gradOutputs) {
        if (torch::GradMode::is_enabled())
            throw std::runtime_error("fused FlashIPA attention: double backward is not supported (train with the \"math\" backend)");
        std::vector<torch::Tensor> t = ctx->get_saved_variables();
        const double scalarScale = ctx->saved_data["scalarScale"].toDouble(), biasScale = ctx->saved_data["biasScale"].toDouble();
        const torch::Tensor &q = t[0], &out = t[13], &logSumExp = t[14];
        c10::cuda::CUDAGuard guard(q.device());
        kernels::FusedAttentionProblem p = describe(t, scalarScale, biasScale);
        const int64_t N = q.size(0), H = q.size(1);
        const int c = p.headDim, Rb = p.biasRank, Pv = p.valuePoints;
        torch::Tensor gradOut = gradOutputs[0].defined() ? gradOutputs[0].to(torch::kFloat32).contiguous() : torch::zeros_like(out);
        torch::Tensor delta = (gradOut * out).sum(-1).contiguous();
        auto zeros = [&](std::vector<int64_t> shape) { return torch::zeros(shape, out.options()); };
        torch::Tensor dQuery = zeros({N, H, c + Rb}), dKey = zeros({N, H, c + Rb}), dValue = zeros({N, H, p.liftedValueDim()});
        torch::Tensor dQueryPoints = zeros({N, H, p.queryPoints, 3}), dKeyPoints = zeros({N, H, p.queryPoints, 3}), dWeight = zeros({H});
        kernels::FusedAttentionGradients g;
        g.liftedQuery = dQuery.data_ptr<float>();
        g.liftedKey = dKey.data_ptr<float>();
        g.liftedValue = dValue.data_ptr<float>();
        g.queryPoints = dQueryPoints.data_ptr<float>();
        g.keyPoints = dKeyPoints.data_ptr<float>();
        g.pointWeight = dWeight.data_ptr<float>();
        launchBackward(t, p, gradOut, logSumExp, delta, g);
        const auto element = q.scalar_type();
        auto cols = [](const torch::Tensor& x, int64_t from, int64_t count) { return x.narrow(-1, from, count); };
        torch::Tensor dPair = cols(dValue, c + 3 * Pv, p.pairRank * p.pairValueDim).sum(1).view({N, p.pairRank, p.pairValueDim});
        return {cols(dQuery, 0, c).to(element),
                (cols(dKey, 0, c) * scalarScale).to(element),
                cols(dValue, 0, c).to(element),
                cols(dQuery, c, Rb).to(element),
                (cols(dKey, c, Rb) * biasScale).to(element),
                dQueryPoints,
                dKeyPoints,
                cols(dValue, c, 3 * Pv).reshape({N, H, Pv, 3}),
                dPair.to(element),
                dWeight,
                torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
};

#endif

} // namespace

torch::Tensor fusedIPAAttention(const FusedAttentionInputs& in, double scalarScale, double biasScale) {
    checkInputs(in);
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
    const int64_t N = in.q.size(0), H = in.q.size(1);
    auto empty = [&](std::vector<int64_t> shape) { return torch::zeros(shape, in.q.options()); };
    // Absent optional parts become zero-width tensors: one kernel signature, nothing to special-case.
    torch::Tensor biasLeft = in.biasLeft.defined() ? in.biasLeft.contiguous() : empty({N, H, 0});
    torch::Tensor biasRight = in.biasRight.defined() ? in.biasRight.contiguous() : empty({N, H, 0});
    torch::Tensor pairValues = in.pairValues.defined() ? in.pairValues.contiguous() : empty({N, 0, 1});
    torch::Tensor keyBegin = in.keyBegin, keyEnd = in.keyEnd;
    if (!keyBegin.defined())
        std::tie(keyBegin, keyEnd) = segmentKeyRanges(in.segment);
    auto int32 = [](const torch::Tensor& x) { return x.to(torch::kInt32).contiguous(); };
    return FusedAttentionFunction::apply(in.q.contiguous(), in.k.contiguous(), in.v.contiguous(), biasLeft, biasRight,
                                         in.queryPoints.contiguous(), in.keyPoints.contiguous(), in.valuePoints.contiguous(), pairValues,
                                         in.pointWeight.contiguous(), int32(in.segment), int32(keyBegin), int32(keyEnd), scalarScale,
                                         biasScale)[0];
#else
    (void) scalarScale;
    (void) biasScale;
    throw std::invalid_argument("fused FlashIPA attention: this build has no CUDA kernels (configure with FLASHIPA_BUILD_CUDA=ON)");
#endif
}

namespace {

torch::Tensor fusedAttentionOperator(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const std::optional<torch::Tensor>& biasLeft, const std::optional<torch::Tensor>& biasRight,
                                     const torch::Tensor& queryPoints, const torch::Tensor& keyPoints, const torch::Tensor& valuePoints,
                                     const std::optional<torch::Tensor>& pairValues, const torch::Tensor& pointWeight,
                                     const torch::Tensor& segment, double scalarScale, double biasScale) {
    FusedAttentionInputs in;
    in.q = q, in.k = k, in.v = v;
    in.biasLeft = biasLeft.value_or(torch::Tensor());
    in.biasRight = biasRight.value_or(torch::Tensor());
    in.queryPoints = queryPoints, in.keyPoints = keyPoints, in.valuePoints = valuePoints;
    in.pairValues = pairValues.value_or(torch::Tensor());
    in.pointWeight = pointWeight;
    in.segment = segment;
    return fusedIPAAttention(in, scalarScale, biasScale);
}

} // namespace

// torch.ops.flashipa.fused_ipa_attention once this library is loaded (torch.ops.load_library).
TORCH_LIBRARY(flashipa, m) {
    m.def("fused_ipa_attention(Tensor q, Tensor k, Tensor v, Tensor? bias_left, Tensor? bias_right, Tensor query_points, "
          "Tensor key_points, Tensor value_points, Tensor? pair_values, Tensor point_weight, Tensor segment, float scalar_scale, "
          "float bias_scale) -> Tensor",
          &fusedAttentionOperator);
}

} // namespace FlashIPAPlugin
