#include "flashipa/EnergyModel.h"
#include "flashipa/GeometryPrior.h"
#include "flashipa/ResidueTypes.h"
#include <ATen/CPUGeneratorImpl.h>
#include <cmath>
#include <stdexcept>

namespace FlashIPAPlugin {

namespace F = torch::nn::functional;
using torch::indexing::None;
using torch::indexing::Slice;

namespace {
// Number of local-geometry features: own a and c (6), previous and next residue's three atoms (18),
// two presence flags.
constexpr int GeometryFeatures = 26;
// Sequence-position gap inserted at each chain change, so residues of different chains are never
// sequence neighbours in the relative-position bias.
constexpr double ChainGap = 64.0;

// Squash a vector (nm) smoothly to length < 2.5 while keeping its direction: bonded neighbours stay
// nearly linear, while distant atoms (chain breaks, noisy input) cannot blow up the features.
torch::Tensor squash(const torch::Tensor& v) {
    return 2.5 * v / torch::sqrt(1.0 + v.pow(2).sum(-1, true));
}

// A well-formed residue in its own frame, used in place of padded (masked) residues so that the
// checked frame construction never sees their placeholder coordinates. Built by fills on the target
// device, never copied from the host: the CUDA platform captures this in a graph (the skip policy's mask),
// where a host-to-device copy is not allowed.
torch::Tensor placeholderResidue(const torch::TensorOptions& options) {
    torch::Tensor residue = torch::zeros({3, 3}, options);
    residue[0][1].fill_(0.145); // a: N (protein) or C3' (RNA) side
    residue[2][0].fill_(0.153); // c; b sits at the origin
    return residue;
}
} // namespace

EnergyModelImpl::EnergyModelImpl(const ModelConfig& config) : config_(config) {
    config.validate();
    const int cs = config.nodeDim;
    typeEmbedding = register_module("typeEmbedding", torch::nn::Embedding(ResidueType::Count, cs));
    sigmaEmbedding = register_module("sigmaEmbedding", torch::nn::Linear(config.sigmaFeatures + 1, cs));
    geometryIn = register_module("geometryIn", torch::nn::Linear(GeometryFeatures, cs));
    geometryHidden = register_module("geometryHidden", torch::nn::Linear(cs, cs));
    inputNorm = register_module("inputNorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({cs})));
    if (config.pairRank > 0) {
        pairLeft = register_module("pairLeft", torch::nn::Linear(cs, config.pairRank * config.pairDim));
        pairRight = register_module("pairRight", torch::nn::Linear(cs, config.pairRank * config.pairDim));
    }
    for (int i = 0; i < config.numBlocks; i++) {
        ipaLayers->push_back(FlashIPALayer(config));
        ipaNorms->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({cs})));
        transitions->push_back(torch::nn::Sequential(torch::nn::Linear(cs, config.transitionFactor * cs), torch::nn::SiLU(),
                                                     torch::nn::Linear(config.transitionFactor * cs, cs)));
        transitionNorms->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({cs})));
    }
    register_module("ipaLayers", ipaLayers);
    register_module("ipaNorms", ipaNorms);
    register_module("transitions", transitions);
    register_module("transitionNorms", transitionNorms);
    energyHidden = register_module("energyHidden", torch::nn::Linear(cs, cs));
    energyOut = register_module("energyOut", torch::nn::Linear(cs, 1));
    if (config.geometryPrior) {
        const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
        geometryPriorPairs = register_parameter("geometryPriorPairs", GeometryPrior::pairTable(torch::kFloat32), false);
        // Not measured yet: NaN, so that a model used before setGeometryPriorStats() gives NaN energies
        // (which every caller reports) rather than a plausible wrong number.
        geometryPriorStats = register_parameter("geometryPriorStats", torch::full({K, 2}, NAN, torch::kFloat32), false);
        if (config.geometryPrior >= 4)
            geometryPriorBondCovariance = register_parameter("geometryPriorBondCovariance", torch::full({3}, NAN, torch::kFloat32), false);
    }
}

void EnergyModelImpl::setGeometryPriorBondCovariance(const torch::Tensor& covariance) {
    if (!geometryPriorBondCovariance.defined())
        throw std::invalid_argument("this model's geometry prior has no bond covariance (config.geometryPrior < 4)");
    if (covariance.numel() != 3 || !torch::isfinite(covariance).all().item<bool>())
        throw std::invalid_argument("the bond covariance must be three finite numbers (c0, c1, c2)");
    torch::Tensor c = covariance.to(torch::kFloat64).reshape({3});
    const double c0 = c[0].item<double>(), c1 = c[1].item<double>(), c2 = c[2].item<double>();
    if (!GeometryPrior::isPositiveDefiniteBondCovariance(c0, c1, c2))
        throw std::invalid_argument("the bond covariance (" + std::to_string(c0) + ", " + std::to_string(c1) + ", " + std::to_string(c2) +
                                    ") does not define a positive definite chain covariance");
    torch::NoGradGuard noGrad;
    geometryPriorBondCovariance.copy_(c);
}

void EnergyModelImpl::setGeometryPriorStats(const torch::Tensor& stats) {
    if (!geometryPriorStats.defined())
        throw std::invalid_argument("this model has no geometry prior (config.geometryPrior = 0)");
    if (stats.sizes() != geometryPriorStats.sizes() || !torch::isfinite(stats).all().item<bool>() || !(stats > 0).all().item<bool>())
        throw std::invalid_argument("geometry prior stats must be finite, positive and of shape " + c10::str(geometryPriorStats.sizes()));
    torch::NoGradGuard noGrad;
    geometryPriorStats.copy_(stats);
}

torch::Tensor EnergyModelImpl::sequencePositions(const torch::Tensor& chains) {
    // position_i = i + gap * (number of chain changes before i)
    torch::Tensor changes = (chains.index({Slice(), Slice(1, None)}) != chains.index({Slice(), Slice(None, -1)})).to(torch::kDouble);
    torch::Tensor breaks = torch::cat({torch::zeros({chains.size(0), 1}, changes.options()), changes.cumsum(1)}, 1);
    torch::Tensor index = torch::arange(chains.size(1), changes.options()).unsqueeze(0);
    return index + ChainGap * breaks;
}

torch::Tensor EnergyModelImpl::localGeometry(const torch::Tensor& atoms, const Frames& frames, const torch::Tensor& chains,
                                             const torch::Tensor& mask) {
    const int64_t B = atoms.size(0), L = atoms.size(1);
    const torch::Tensor& R = frames.rotations;          // [B, L, 3, 3]
    torch::Tensor origin = frames.translations.unsqueeze(2); // [B, L, 1, 3]
    // Express atoms [B, L, n, 3] (given per residue i) in frame i: R_i^T (x - t_i).
    auto inFrame = [&](const torch::Tensor& x) { return torch::einsum("blji,blnj->blni", {R, x - origin}); };
    torch::Tensor own = inFrame(atoms).index({Slice(), Slice(), Slice(0, 3, 2)}); // a and c
    // Neighbours along the chain: same chain, both residues real.
    torch::Tensor sameChain = chains.index({Slice(), Slice(1, None)}) == chains.index({Slice(), Slice(None, -1)});
    torch::Tensor bothReal = mask.index({Slice(), Slice(1, None)}).logical_and(mask.index({Slice(), Slice(None, -1)}));
    torch::Tensor linked = sameChain.logical_and(bothReal).to(atoms.dtype()); // [B, L-1]: i and i+1 bonded
    torch::Tensor zeroLink = torch::zeros({B, 1}, atoms.options());
    torch::Tensor hasPrev = torch::cat({zeroLink, linked}, 1), hasNext = torch::cat({linked, zeroLink}, 1);
    torch::Tensor zeroAtoms = torch::zeros({B, 1, 3, 3}, atoms.options());
    torch::Tensor prevAtoms = torch::cat({zeroAtoms, atoms.index({Slice(), Slice(None, -1)})}, 1);
    torch::Tensor nextAtoms = torch::cat({atoms.index({Slice(), Slice(1, None)}), zeroAtoms}, 1);
    torch::Tensor prev = squash(inFrame(prevAtoms)) * hasPrev.view({B, L, 1, 1});
    torch::Tensor next = squash(inFrame(nextAtoms)) * hasNext.view({B, L, 1, 1});
    return torch::cat({squash(own).flatten(2), prev.flatten(2), next.flatten(2), hasPrev.unsqueeze(-1), hasNext.unsqueeze(-1)}, -1);
}

torch::Tensor EnergyModelImpl::forward(const StructureBatch& batch, const torch::Tensor& sigma, AttentionBackend backend,
                                       bool validate) {
    const ModelConfig& cfg = config_;
    if (batch.atoms.dim() != 4 || batch.atoms.size(2) != 3 || batch.atoms.size(3) != 3)
        throw std::invalid_argument("atoms must have shape [B, L, 3, 3]");
    const int64_t B = batch.atoms.size(0), L = batch.atoms.size(1);
    if (L == 0)
        throw std::invalid_argument("the structure has no residues");
    if (batch.types.sizes() != torch::IntArrayRef({B, L}) || batch.chains.sizes() != torch::IntArrayRef({B, L}))
        throw std::invalid_argument("types and chains must have shape [B, L]");
    if (validate && (batch.types.min().item<int64_t>() < 0 || batch.types.max().item<int64_t>() >= ResidueType::Count))
        throw std::invalid_argument("residue types must lie in [0, " + std::to_string(ResidueType::Count) + ")");
    torch::Tensor mask = batch.mask.defined() ? batch.mask.to(torch::kBool)
                                              : torch::ones({B, L}, batch.atoms.options().dtype(torch::kBool));
    torch::Tensor atoms = batch.mask.defined()
                              ? torch::where(mask.view({B, L, 1, 1}), batch.atoms, placeholderResidue(batch.atoms.options()))
                              : batch.atoms;
    torch::Tensor sig = sigma.to(atoms.options()).reshape({-1}).expand({B});
    if (validate && !(sig > 0).all().item<bool>())
        throw std::invalid_argument("sigma must be positive");

    Frames frames = FrameBuilder::build(atoms, validate);

    // Node features.
    torch::Tensor u = (torch::log(sig) - std::log(cfg.sigmaMin)) / (std::log(cfg.sigmaMax) - std::log(cfg.sigmaMin));
    std::vector<torch::Tensor> sigmaParts = {u.unsqueeze(-1)};
    for (int k = 0; k < cfg.sigmaFeatures; k++) {
        torch::Tensor angle = u * (M_PI * (k / 2 + 1));
        sigmaParts.push_back((k % 2 == 0 ? torch::sin(angle) : torch::cos(angle)).unsqueeze(-1));
    }
    torch::Tensor sigmaFeatures = sigmaEmbedding(torch::cat(sigmaParts, -1)).unsqueeze(1); // [B, 1, cs]
    torch::Tensor geometry = geometryHidden(F::silu(geometryIn(localGeometry(atoms, frames, batch.chains, mask))));
    torch::Tensor s = inputNorm(typeEmbedding(batch.types) + sigmaFeatures + geometry);

    IPAInputs inputs;
    inputs.frames = frames;
    // Sequence positions stay float32 or wider whatever the network's type (IPAInputs::positions).
    inputs.positions = sequencePositions(batch.chains).to(atoms.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32);
    inputs.mask = batch.mask.defined() ? mask : torch::Tensor();
    if (cfg.pairRank > 0) {
        inputs.pairLeft = pairLeft(s).view({B, L, cfg.pairRank, cfg.pairDim});
        inputs.pairRight = pairRight(s).view({B, L, cfg.pairRank, cfg.pairDim});
    }
    for (int i = 0; i < cfg.numBlocks; i++) {
        inputs.nodes = s;
        s = ipaNorms[i]->as<torch::nn::LayerNormImpl>()->forward(s + ipaLayers[i]->as<FlashIPALayerImpl>()->forward(inputs, backend));
        s = transitionNorms[i]->as<torch::nn::LayerNormImpl>()->forward(
            s + transitions[i]->as<torch::nn::SequentialImpl>()->forward(s));
    }
    torch::Tensor perResidue = energyOut(F::silu(energyHidden(s))).squeeze(-1) * mask.to(s.dtype()); // [B, L]
    torch::Tensor energy = perResidue.sum(1) / sig;
    if (geometryPriorStats.defined())
        energy = energy + GeometryPrior::energy(atoms, batch.types, batch.chains, mask, sig, geometryPriorStats,
                                               config_.geometryPrior, geometryPriorBondCovariance);
    return energy;
}

int64_t EnergyModelImpl::parameterCount(const ModelConfig& config) {
    // Mirrors the constructors above (EnergyModelImpl, FlashIPALayerImpl); TestEnergyModel checks it against
    // named_parameters() for several configurations, so a new module cannot be forgotten here.
    config.validate();
    const int64_t cs = config.nodeDim, H = config.numHeads, c = config.headDim, Pq = config.queryPoints, Pv = config.valuePoints;
    const int64_t r = config.pairRank, pd = config.pairDim, dz = config.pairValueDim(), tf = config.transitionFactor;
    auto linear = [](int64_t in, int64_t out, bool bias = true) { return in * out + (bias ? out : 0); };
    int64_t layer = 3 * linear(cs, H * c) + 2 * linear(cs, H * Pq * 3) + linear(cs, H * Pv * 3) +
                    linear(H * (c + 4 * Pv + dz), cs) + H + H * config.relPosFrequencies;
    if (r > 0)
        layer += linear(pd, H, false) + linear(pd, dz, false);
    const int64_t block = layer + 2 * cs + linear(cs, tf * cs) + linear(tf * cs, cs) + 2 * cs;
    int64_t total = ResidueType::Count * cs + linear(config.sigmaFeatures + 1, cs) + linear(GeometryFeatures, cs) + linear(cs, cs) +
                    2 * cs + linear(cs, cs) + linear(cs, 1) + config.numBlocks * block;
    if (r > 0)
        total += 2 * linear(cs, r * pd);
    if (config.geometryPrior)
        total += 6 * (int64_t) GeometryPrior::pairKinds().size(); // pairs [K, 4] and stats [K, 2]
    if (config.geometryPrior >= 4)
        total += 3; // bond covariances
    return total;
}

void randomizeParameters(torch::nn::Module& module, uint64_t seed, double scale) {
    torch::NoGradGuard noGrad;
    auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    for (auto& item : module.named_parameters()) {
        if (item.key().find("geometryPrior") != std::string::npos)
            continue; // the prior's tables are data, not weights
        torch::Tensor& parameter = item.value();
        double std = scale;
        if (parameter.dim() == 2 && parameter.size(1) > 0)
            std = scale / std::sqrt((double) parameter.size(1)); // keep activations O(1) in width
        torch::Tensor values = torch::randn(parameter.sizes(), generator, torch::dtype(torch::kDouble)) * std;
        parameter.copy_(values);
    }
}

void prepareForInference(EnergyModel& model, torch::Device device, torch::Dtype dtype) {
    model->to(device, dtype);
    model->eval();
    for (auto& parameter : model->parameters())
        parameter.set_requires_grad(false);
}

} // namespace FlashIPAPlugin
