#include "flashipa/FlashIPALayer.h"
#include "flashipa/FusedAttention.h"
#include <cmath>
#include <stdexcept>
#include <unistd.h>

namespace FlashIPAPlugin {

namespace F = torch::nn::functional;
using torch::indexing::Ellipsis;
using torch::indexing::None;
using torch::indexing::Slice;

namespace {
constexpr double PointNormEpsilon = 1e-8;
} // namespace

/** Everything the attention needs, projected from the inputs; points are global and centred. */
struct FlashIPALayerImpl::Projected {
    torch::Tensor q, k, v;                 // [B, L, H, c]
    torch::Tensor qPoints, kPoints, vPoints; // [B, L, H, P, 3], global frame, centred
    torch::Tensor biasLeft, biasRight;     // [B, L, H, Rb] (undefined when Rb == 0)
    torch::Tensor pairLeft, pairRight;     // Z1, Z2 [B, L, r, c_z/4] (undefined when r == 0)
    torch::Tensor gamma;                   // softplus(theta) [H]
    torch::Tensor rotations, centredTranslations; // [B, L, 3, 3], [B, L, 3]
    torch::Tensor mask;                    // [B, L] bool
};

FlashIPALayerImpl::FlashIPALayerImpl(const ModelConfig& config) : config(config) {
    config.validate();
    const int H = config.numHeads, c = config.headDim;
    linearQ = register_module("linearQ", torch::nn::Linear(config.nodeDim, H * c));
    linearK = register_module("linearK", torch::nn::Linear(config.nodeDim, H * c));
    linearV = register_module("linearV", torch::nn::Linear(config.nodeDim, H * c));
    linearQPoints = register_module("linearQPoints", torch::nn::Linear(config.nodeDim, H * config.queryPoints * 3));
    linearKPoints = register_module("linearKPoints", torch::nn::Linear(config.nodeDim, H * config.queryPoints * 3));
    linearVPoints = register_module("linearVPoints", torch::nn::Linear(config.nodeDim, H * config.valuePoints * 3));
    if (config.pairRank > 0) {
        // No bias terms: b_ij = sum_r B1[i,r] B2[j,r] stays an exact low-rank product.
        linearBias = register_module("linearBias", torch::nn::Linear(torch::nn::LinearOptions(config.pairDim, H).bias(false)));
        linearPairDown = register_module("linearPairDown",
                                         torch::nn::Linear(torch::nn::LinearOptions(config.pairDim, config.pairValueDim()).bias(false)));
    }
    const int outputPerHead = c + 4 * config.valuePoints + config.pairValueDim();
    linearOut = register_module("linearOut", torch::nn::Linear(H * outputPerHead, config.nodeDim));
    {
        // Zero-initialised output: a fresh layer is the identity on the residual stream.
        torch::NoGradGuard noGrad;
        linearOut->weight.zero_();
        linearOut->bias.zero_();
    }
    headWeights = register_parameter("headWeights", torch::full({H}, std::log(std::exp(1.0) - 1.0)));
    relPosWeights = register_parameter("relPosWeights", torch::zeros({H, std::max(config.relPosFrequencies, 0)}));
}

int FlashIPALayerImpl::liftedKeyDim() const {
    return config.headDim + 5 * config.queryPoints + config.biasRank();
}

int FlashIPALayerImpl::liftedValueDim() const {
    return config.headDim + 3 * config.valuePoints + config.pairRank * config.pairValueDim();
}

FlashIPALayerImpl::Projected FlashIPALayerImpl::project(const IPAInputs& in, bool float32Points) {
    const torch::Tensor& s = in.nodes;
    if (s.dim() != 3 || s.size(2) != config.nodeDim)
        throw std::invalid_argument("IPA nodes must have shape [B, L, " + std::to_string(config.nodeDim) + "]");
    const int64_t B = s.size(0), L = s.size(1);
    const int H = config.numHeads, c = config.headDim;
    Projected p;
    p.mask = in.mask.defined() ? in.mask : torch::ones({B, L}, s.options().dtype(torch::kBool));
    p.q = linearQ(s).view({B, L, H, c});
    p.k = linearK(s).view({B, L, H, c});
    p.v = linearV(s).view({B, L, H, c});

    // Centre on the mean frame origin of each structure (real residues only). The attention is
    // invariant to this shift, and it keeps the lifted point terms from cancelling large numbers.
    // The fused kernel keeps every point in fp32 whatever the network's type: global-frame points
    // rounded to fp16 would change with a rotation of the structure (docs/MATH.md §5).
    const auto pointType = float32Points ? torch::kFloat32 : s.scalar_type();
    p.rotations = in.frames.rotations.to(pointType);
    torch::Tensor translations = in.frames.translations.to(pointType);
    torch::Tensor weights = p.mask.to(pointType).unsqueeze(-1);
    torch::Tensor centre = (translations * weights).sum(1, true) / weights.sum(1, true).clamp_min(1.0);
    p.centredTranslations = translations - centre;
    auto toGlobal = [&](const torch::Tensor& local) {
        // local [B, L, H, P, 3] -> R_i local + t_i
        return torch::einsum("blij,blhpj->blhpi", {p.rotations, local.to(pointType)}) + p.centredTranslations.view({B, L, 1, 1, 3});
    };
    p.qPoints = toGlobal(linearQPoints(s).view({B, L, H, config.queryPoints, 3}));
    p.kPoints = toGlobal(linearKPoints(s).view({B, L, H, config.queryPoints, 3}));
    p.vPoints = toGlobal(linearVPoints(s).view({B, L, H, config.valuePoints, 3}));

    std::vector<torch::Tensor> left, right;
    if (config.pairRank > 0) {
        const int r = config.pairRank;
        if (!in.pairLeft.defined() || !in.pairRight.defined() ||
            in.pairLeft.sizes() != torch::IntArrayRef({B, L, r, config.pairDim}) || in.pairRight.sizes() != in.pairLeft.sizes())
            throw std::invalid_argument("IPA pair factors must have shape [B, L, r, c_z]");
        left.push_back(linearBias(in.pairLeft).permute({0, 1, 3, 2}));   // [B, L, H, r]
        right.push_back(linearBias(in.pairRight).permute({0, 1, 3, 2}));
        p.pairLeft = linearPairDown(in.pairLeft);                        // [B, L, r, c_z/4]
        p.pairRight = linearPairDown(in.pairRight);
    }
    if (config.relPosFrequencies > 0) {
        // cos(w (i - j)) = cos(wi) cos(wj) + sin(wi) sin(wj): exact relative position, factorised.
        // omega_k = 2 pi / (4 * 2^k), made on the device (no host-to-device copy, so CUDA graphs can capture it).
        // The position is reduced modulo each frequency's period 4 * 2^k first (exact for integer values), so
        // the angle stays below 2 pi at any chain length, and the trigonometry runs in the positions' float32
        // or float64, never in a half-precision network's type: an fp16 position overflows at 65,504 residues.
        const torch::Tensor& positions = in.positions;
        if (positions.scalar_type() != torch::kFloat32 && positions.scalar_type() != torch::kFloat64)
            throw std::invalid_argument("IPA sequence positions must be float32 or float64 (integer values), got " +
                                        std::string(c10::toString(positions.scalar_type())));
        torch::Tensor k = torch::arange(config.relPosFrequencies, positions.options()).view({1, 1, -1});
        torch::Tensor angles = torch::remainder(positions.unsqueeze(-1), 4.0 * torch::pow(2.0, k)) * (M_PI / 2.0) * torch::pow(2.0, -k);
        torch::Tensor trig = torch::cat({torch::cos(angles), torch::sin(angles)}, -1).to(s.dtype()); // [B, L, 2K]
        torch::Tensor alpha = torch::cat({relPosWeights, relPosWeights}, -1);            // [H, 2K]
        left.push_back(trig.unsqueeze(2) * alpha.view({1, 1, H, -1}));
        right.push_back(trig.unsqueeze(2).expand({B, L, H, trig.size(-1)}));
    }
    if (!left.empty()) {
        p.biasLeft = torch::cat(left, -1);
        p.biasRight = torch::cat(right, -1);
    }
    p.gamma = F::softplus(headWeights);
    return p;
}

void FlashIPALayerImpl::checkMathMemory(int64_t B, int64_t L, bool onGpu, int64_t elementSize) const {
    // The math path materialises [B, L, L, H, P, 3] point differences and several [B, H, L, L] tensors (kept
    // for the backward). On the CPU an allocation beyond physical memory is not an exception but the OOM
    // killer, so refuse it here; on a GPU LibTorch's allocator raises its own out-of-memory error.
    if (onGpu)
        return;
    const double bytes = (double) B * L * L * config.numHeads * (3.0 * config.queryPoints + 8.0) * elementSize;
    const double physical = (double) sysconf(_SC_PHYS_PAGES) * (double) sysconf(_SC_PAGESIZE);
    if (physical > 0 && bytes > 0.5 * physical)
        throw std::runtime_error("the \"math\" attention backend would need about " + std::to_string((int) std::ceil(bytes / 1e9)) +
                                 " GB at " + std::to_string(L) + " residues (this machine has " +
                                 std::to_string((int) std::round(physical / 1e9)) + " GB); use \"sdpa\", whose memory is linear in length");
}

torch::Tensor FlashIPALayerImpl::attendMath(const Projected& p, const IPAInputs& in) {
    checkMathMemory(p.q.size(0), p.q.size(1), p.q.is_cuda(), p.q.element_size());
    const double wL = std::sqrt(1.0 / 3.0), wC = std::sqrt(2.0 / (9.0 * config.queryPoints));
    torch::Tensor logits = torch::einsum("bihc,bjhc->bhij", {p.q, p.k}) / std::sqrt((double) config.headDim);
    if (p.biasLeft.defined())
        logits = logits + torch::einsum("bihr,bjhr->bhij", {p.biasLeft, p.biasRight});
    // Direct differences (not the expanded form) so this path stays the accurate oracle.
    torch::Tensor diff = p.qPoints.unsqueeze(2) - p.kPoints.unsqueeze(1);       // [B, L, L, H, P, 3]
    torch::Tensor distance2 = diff.pow(2).sum({-1, -2}).permute({0, 3, 1, 2});   // [B, H, L, L]
    logits = wL * (logits - (p.gamma * (wC / 2)).view({1, -1, 1, 1}) * distance2);
    logits = logits.masked_fill(p.mask.logical_not().view({p.mask.size(0), 1, 1, -1}), -std::numeric_limits<double>::infinity());
    torch::Tensor a = torch::softmax(logits, -1);
    torch::Tensor scalar = torch::einsum("bhij,bjhc->bihc", {a, p.v});
    torch::Tensor points = torch::einsum("bhij,bjhpx->bihpx", {a, p.vPoints});
    torch::Tensor pair;
    if (p.pairRight.defined())
        pair = torch::einsum("bhij,bjrd->bihrd", {a, p.pairRight});
    return unlift(p, scalar, points, pair, in);
}

torch::Tensor FlashIPALayerImpl::attendSDPA(const Projected& p, const IPAInputs& in) {
    const int64_t B = p.q.size(0), L = p.q.size(1);
    const int H = config.numHeads, c = config.headDim, Pv = config.valuePoints;
    const double wL = std::sqrt(1.0 / 3.0), wC = std::sqrt(2.0 / (9.0 * config.queryPoints));
    torch::Tensor w = (p.gamma * (wL * wC)).view({1, 1, H, 1});
    torch::Tensor qNorm2 = p.qPoints.pow(2).sum(-1), kNorm2 = p.kPoints.pow(2).sum(-1); // [B, L, H, Pq]
    torch::Tensor ones = torch::ones_like(qNorm2);
    // Q.K = wL q.k/sqrt(c) + w q_p.k_p - w/2 |q_p|^2 - w/2 |k_p|^2 + wL b  (docs/MATH.md §4)
    std::vector<torch::Tensor> qParts = {p.q, w * p.qPoints.flatten(3), qNorm2, ones};
    std::vector<torch::Tensor> kParts = {p.k * (wL / std::sqrt((double) c)), p.kPoints.flatten(3), -0.5 * w * ones, -0.5 * w * kNorm2};
    if (p.biasLeft.defined()) {
        qParts.push_back(p.biasLeft);
        kParts.push_back(wL * p.biasRight);
    }
    std::vector<torch::Tensor> vParts = {p.v, p.vPoints.flatten(3)};
    if (p.pairRight.defined())
        vParts.push_back(p.pairRight.flatten(2).unsqueeze(2).expand({B, L, H, -1}));
    torch::Tensor Q = torch::cat(qParts, -1), K = torch::cat(kParts, -1), V = torch::cat(vParts, -1);
    // One head width for Q, K and V (zero padding changes neither the dot products nor the outputs kept).
    const int64_t width = std::max(Q.size(-1), V.size(-1));
    auto pad = [&](const torch::Tensor& t) {
        return t.size(-1) == width ? t : F::pad(t, F::PadFuncOptions({0, width - t.size(-1)}));
    };
    Q = pad(Q).transpose(1, 2);
    K = pad(K).transpose(1, 2);
    V = pad(V).transpose(1, 2); // [B, H, L, D]
    std::optional<torch::Tensor> keyMask;
    if (in.mask.defined())
        keyMask = p.mask.view({B, 1, 1, L});
    torch::Tensor out = at::scaled_dot_product_attention(Q, K, V, keyMask, 0.0, false, 1.0).transpose(1, 2); // [B, L, H, D]
    torch::Tensor scalar = out.index({Ellipsis, Slice(0, c)});
    torch::Tensor points = out.index({Ellipsis, Slice(c, c + 3 * Pv)}).reshape({B, L, H, Pv, 3});
    torch::Tensor pair;
    if (p.pairRight.defined()) {
        const int r = config.pairRank, dz = config.pairValueDim();
        pair = out.index({Ellipsis, Slice(c + 3 * Pv, c + 3 * Pv + r * dz)}).reshape({B, L, H, r, dz});
    }
    return unlift(p, scalar, points, pair, in);
}

torch::Tensor FlashIPALayerImpl::attendFused(const Projected& p, const IPAInputs& in, torch::Dtype attentionType) {
    const int64_t B = p.q.size(0), L = p.q.size(1), N = B * L;
    const int H = config.numHeads, c = config.headDim, Pq = config.queryPoints, Pv = config.valuePoints;
    const double wL = std::sqrt(1.0 / 3.0), wC = std::sqrt(2.0 / (9.0 * config.queryPoints));
    FusedAttentionInputs f;
    // The casts are autograd ops: gradients come back in the network's type.
    f.q = p.q.reshape({N, H, c}).to(attentionType);
    f.k = p.k.reshape({N, H, c}).to(attentionType);
    f.v = p.v.reshape({N, H, c}).to(attentionType);
    if (p.biasLeft.defined()) {
        f.biasLeft = p.biasLeft.reshape({N, H, -1}).to(attentionType);
        f.biasRight = p.biasRight.reshape({N, H, -1}).to(attentionType);
    }
    f.queryPoints = p.qPoints.reshape({N, H, Pq, 3});
    f.keyPoints = p.kPoints.reshape({N, H, Pq, 3});
    f.valuePoints = p.vPoints.reshape({N, H, Pv, 3});
    if (p.pairRight.defined())
        f.pairValues = p.pairRight.reshape({N, config.pairRank, -1}).to(attentionType);
    f.pointWeight = (p.gamma * (wL * wC)).to(torch::kFloat32);
    // Each structure of the batch is one segment of L rows; padding rows are segment -1.
    auto intOptions = p.q.options().dtype(torch::kInt32);
    torch::Tensor structure = torch::arange(B, intOptions).view({B, 1}).expand({B, L});
    f.segment = torch::where(p.mask, structure, torch::full({}, -1, intOptions)).reshape({N});
    f.keyBegin = (structure * L).reshape({N});
    f.keyEnd = f.keyBegin + L;
    torch::Tensor out = fusedIPAAttention(f, wL / std::sqrt((double) c), wL).view({B, L, H, -1});
    const auto dtype = p.q.scalar_type();
    torch::Tensor scalar = out.narrow(-1, 0, c).to(dtype);
    torch::Tensor points = out.narrow(-1, c, 3 * Pv).reshape({B, L, H, Pv, 3});
    torch::Tensor pair;
    if (p.pairRight.defined())
        pair = out.narrow(-1, c + 3 * Pv, config.pairRank * config.pairValueDim()).reshape({B, L, H, config.pairRank, -1}).to(dtype);
    return unlift(p, scalar, points, pair, in);
}

torch::Tensor FlashIPALayerImpl::unlift(const Projected& p, const torch::Tensor& scalar, const torch::Tensor& pointsGlobal,
                                        const torch::Tensor& pairAggregate, const IPAInputs& in) {
    const int64_t B = scalar.size(0), L = scalar.size(1);
    // o_pts = T_i^-1 (sum_j a_ij T_j v_j) = R_i^T (x - t_i)
    torch::Tensor local = torch::einsum("blji,blhpj->blhpi",
                                        {p.rotations, pointsGlobal - p.centredTranslations.view({B, L, 1, 1, 3})});
    torch::Tensor norms = torch::sqrt(local.pow(2).sum(-1) + PointNormEpsilon).to(scalar.scalar_type());
    local = local.to(scalar.scalar_type());
    std::vector<torch::Tensor> features = {scalar.flatten(2), local.flatten(2), norms.flatten(2)};
    if (pairAggregate.defined()) // o~_i = sum_r Z1[i,r] * (sum_j a_ij Z2[j,r])
        features.push_back((p.pairLeft.unsqueeze(2) * pairAggregate).sum(3).flatten(2));
    torch::Tensor out = linearOut(torch::cat(features, -1));
    return out * p.mask.unsqueeze(-1).to(out.dtype());
}

torch::Tensor FlashIPALayerImpl::forward(const IPAInputs& inputs, AttentionBackend backend) {
    backend = resolveAttentionBackend(backend, inputs.nodes.is_cuda(), inputs.nodes.scalar_type() == torch::kFloat64);
    if (isFusedBackend(backend)) {
        if (!fusedAttentionAvailable() || !inputs.nodes.is_cuda())
            throw std::invalid_argument("the fused attention backend runs on CUDA tensors in builds with the CUDA kernels; use \"sdpa\" or \"math\"");
        // "fused": scalar operands on the tensor cores in fp16 whatever the network's type; "fused-fp32":
        // every operand in fp32 (the SIMT kernels). The points are fp32 either way.
        return attendFused(project(inputs, true), inputs, backend == AttentionBackend::Fused ? torch::kHalf : torch::kFloat32);
    }
    Projected p = project(inputs, false);
    return backend == AttentionBackend::Math ? attendMath(p, inputs) : attendSDPA(p, inputs);
}

} // namespace FlashIPAPlugin
