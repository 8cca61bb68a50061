// The fused FlashIPA attention as a LibTorch operator with autograd: input checks, the autograd
// Function around the CUDA kernels (models/kernels), and the dispatcher registration
// flashipa::fused_ipa_attention. Builds without CUDA too; then every call explains that the kernels
// are missing.
#include "flashipa/FusedAttention.h"
#include "OperandPacking.h"
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
    require(element == torch::kFloat32 || element == torch::kHalf, "scalar features must be float32 or float16");
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

/**
 * Runs the fastest backward that applies within the limit set by setFusedKernelLimit: wgmma (fp16 on
 * compute capability 9.0), mma.sync (fp16 on sm_80+), else the fp32 SIMT backward.
 */
void launchBackward(const std::vector<torch::Tensor>& t, const kernels::FusedAttentionProblem& p, const torch::Tensor& gradOut,
                    const torch::Tensor& logSumExp, const torch::Tensor& delta, const kernels::FusedAttentionGradients& g) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const FusedKernelLimit limit = kernelLimit.load();
    using Layout = kernels::TensorCoreBackwardPack::Layout;
    if (p.rows > 0 && limit == FusedKernelLimit::Fastest && kernels::wgmmaBackwardApplies(p)) {
        PackedBackwardOperands packed = packBackward(t, p, gradOut, logSumExp, delta, Layout::CoreMatrixTiles);
        if (kernels::launchFusedAttentionBackwardWgmma(p, packed.pack, g, stream))
            return;
    }
    if (p.rows > 0 && limit != FusedKernelLimit::Simt && kernels::tensorCoreBackwardApplies(p)) {
        PackedBackwardOperands packed = packBackward(t, p, gradOut, logSumExp, delta, Layout::Rows);
        if (kernels::launchFusedAttentionBackwardTensorCore(p, packed.pack, g, stream))
            return;
    }
    kernels::launchFusedAttentionBackward(p, logSumExp.data_ptr<float>(), gradOut.data_ptr<float>(), delta.data_ptr<float>(), g, stream);
}

/**
 * Runs the fastest forward that applies within the limit set by setFusedKernelLimit: wgmma (fp16 on
 * compute capability 9.0), mma.sync (fp16 on sm_80+), else the fp32 SIMT forward. Returns the output
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
        PackedOperands packed = packForward(t, p, kernels::TensorCorePack::Layout::CoreMatrixTiles);
        auto [out, logSumExp] = allocate();
        if (kernels::launchFusedAttentionForwardWgmma(p, packed.pack, out.data_ptr<float>(), logSumExp.data_ptr<float>(), stream))
            return {out, logSumExp};
    }
    if (p.rows > 0 && limit != FusedKernelLimit::Simt && kernels::tensorCoreForwardApplies(p)) {
        PackedOperands packed = packForward(t, p, kernels::TensorCorePack::Layout::Rows);
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
        // fp16 holds 2^-14..65504 at full precision: scale dOut by a power of two so that its largest entry
        // is in [1, 2), whatever the loss's units, and undo it on the gradients (all linear in dOut, so the
        // power of two changes no bit but those fp16 would lose). Device-side: no host synchronisation. The
        // clamp keeps an all-zero dOut finite; a non-finite one stays non-finite, as it would unscaled.
        torch::Tensor gradUnscale;
        if (q.scalar_type() == torch::kHalf) {
            torch::Tensor exponent = torch::floor(torch::log2(gradOut.abs().amax().clamp(1e-30, 1e30)));
            gradUnscale = torch::exp2(exponent);
            gradOut = gradOut * torch::exp2(-exponent);
        }
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
        if (gradUnscale.defined())
            for (torch::Tensor* x : {&dQuery, &dKey, &dValue, &dQueryPoints, &dKeyPoints, &dWeight})
                x->mul_(gradUnscale);
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

#ifdef FLASHIPA_HAVE_FUSED_KERNEL
namespace {

/**
 * The operator's tensors in the order describe() reads them, contiguous, with absent optional parts as
 * zero-width tensors (one kernel signature, nothing to special-case) and each row's key range.
 */
std::vector<torch::Tensor> attentionTensors(const FusedAttentionInputs& in) {
    const int64_t N = in.q.size(0), H = in.q.size(1);
    auto empty = [&](std::vector<int64_t> shape) { return torch::zeros(shape, in.q.options()); };
    torch::Tensor biasLeft = in.biasLeft.defined() ? in.biasLeft.contiguous() : empty({N, H, 0});
    torch::Tensor biasRight = in.biasRight.defined() ? in.biasRight.contiguous() : empty({N, H, 0});
    torch::Tensor pairValues = in.pairValues.defined() ? in.pairValues.contiguous() : empty({N, 0, 1});
    torch::Tensor keyBegin = in.keyBegin, keyEnd = in.keyEnd;
    if (!keyBegin.defined())
        std::tie(keyBegin, keyEnd) = segmentKeyRanges(in.segment);
    auto int32 = [](const torch::Tensor& x) { return x.to(torch::kInt32).contiguous(); };
    return {in.q.contiguous(), in.k.contiguous(), in.v.contiguous(), biasLeft, biasRight, in.queryPoints.contiguous(), in.keyPoints.contiguous(),
            in.valuePoints.contiguous(), pairValues, in.pointWeight.contiguous(), int32(in.segment), int32(keyBegin), int32(keyEnd)};
}

} // namespace
#endif

torch::Tensor fusedIPAAttention(const FusedAttentionInputs& in, double scalarScale, double biasScale) {
    checkInputs(in);
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
    const std::vector<torch::Tensor> t = attentionTensors(in);
    return FusedAttentionFunction::apply(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], scalarScale, biasScale)[0];
#else
    (void) scalarScale;
    (void) biasScale;
    throw std::invalid_argument("fused FlashIPA attention: this build has no CUDA kernels (configure with FLASHIPA_BUILD_CUDA=ON)");
#endif
}

namespace packing {

std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> packedOperandsTwoWays(const FusedAttentionInputs& in, double scalarScale,
                                                                                      double biasScale, bool backward, bool coreMatrixTiles) {
    checkInputs(in);
    require(in.q.scalar_type() == torch::kHalf, "the tensor-core packs hold fp16 operands: pass float16 scalar features");
#ifdef FLASHIPA_HAVE_FUSED_KERNEL
    const std::vector<torch::Tensor> t = attentionTensors(in);
    c10::cuda::CUDAGuard guard(in.q.device());
    const kernels::FusedAttentionProblem p = describe(t, scalarScale, biasScale);
    if (!backward) {
        const auto layout = coreMatrixTiles ? kernels::TensorCorePack::Layout::CoreMatrixTiles : kernels::TensorCorePack::Layout::Rows;
        return {packForward(t, p, layout).keepAlive, packForwardWithTorch(t, p, layout).keepAlive};
    }
    // The backward pack only copies and sums these: any values do.
    const auto f32 = in.q.options().dtype(torch::kFloat32);
    const int64_t N = p.rows, H = p.heads;
    torch::Tensor gradOut = torch::randn({N, H, p.liftedValueDim()}, f32), logSumExp = torch::randn({N, H}, f32), delta = torch::randn({N, H}, f32);
    const auto layout = coreMatrixTiles ? kernels::TensorCoreBackwardPack::Layout::CoreMatrixTiles : kernels::TensorCoreBackwardPack::Layout::Rows;
    return {packBackward(t, p, gradOut, logSumExp, delta, layout).keepAlive, packBackwardWithTorch(t, p, gradOut, logSumExp, delta, layout).keepAlive};
#else
    (void) scalarScale, (void) biasScale, (void) backward, (void) coreMatrixTiles;
    throw std::invalid_argument("fused FlashIPA attention: this build has no CUDA kernels (configure with FLASHIPA_BUILD_CUDA=ON)");
#endif
}

} // namespace packing

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
