#include "flashipa/BackboneSampler.h"
#include "flashipa/ChainSpread.h"
#include "flashipa/DefaultModel.h"
#include "flashipa/ResidueTypes.h"
#include <cmath>
#include <stdexcept>

namespace FlashIPAPlugin {

BackboneSampler::BackboneSampler(EnergyModel model, torch::Device device, torch::Dtype dtype, AttentionBackend backend)
    : model_(model), device(device), dtype(dtype), backend(backend) {
    prepareForInference(model_, device, dtype);
}

torch::Tensor BackboneSampler::energyGradient(const torch::Tensor& x, const torch::Tensor& types,
                                              const torch::Tensor& chains, double sigma) {
    torch::AutoGradMode enable(true); // sample() runs without gradients; each evaluation takes its own
    torch::Tensor atoms = x.detach().requires_grad_(true);
    torch::Tensor sigmas = torch::full({x.size(0)}, sigma, torch::TensorOptions().dtype(dtype).device(device));
    // validate = false: no host checks, degenerate frames guarded numerically (generation starts from noise).
    torch::Tensor energy = model_->forward(StructureBatch{atoms, types, chains, torch::Tensor()}, sigmas, backend, false);
    return torch::autograd::grad({energy.sum()}, {atoms})[0].detach();
}

torch::Tensor BackboneSampler::sample(const torch::Tensor& types, const torch::Tensor& chains, int64_t numSamples,
                                      const SamplerSettings& settings, const std::function<void(int, int)>& progress) {
    const ModelConfig& config = model_->config();
    const double sigmaMax = settings.sigmaMax > 0 ? settings.sigmaMax : config.sigmaMax;
    const double sigmaMin = settings.sigmaMin;
    if (!(sigmaMin > 0 && sigmaMax > sigmaMin))
        throw std::invalid_argument("BackboneSampler: need sigmaMax > sigmaMin > 0 nm");
    if (!(settings.churn >= 0))
        throw std::invalid_argument("BackboneSampler: churn must be non-negative");
    if (!(settings.scoreScale > 0) || !std::isfinite(settings.scoreScale))
        throw std::invalid_argument("BackboneSampler: scoreScale must be positive and finite");
    if (settings.numSteps < 1)
        throw std::invalid_argument("BackboneSampler: numSteps must be at least 1");
    if (numSamples < 1)
        throw std::invalid_argument("BackboneSampler: numSamples must be at least 1");
    if (types.dim() != 1 || chains.dim() != 1 || types.size(0) != chains.size(0) || types.size(0) < 1)
        throw std::invalid_argument("BackboneSampler: types and chains must be 1-D with one entry per residue");
    const int64_t L = types.size(0);
    torch::Tensor typesCpu = types.to(torch::kCPU, torch::kInt64);
    if (typesCpu.min().item<int64_t>() < 0 || typesCpu.max().item<int64_t>() >= ResidueType::Count)
        throw std::invalid_argument("BackboneSampler: residue type out of range");
    auto longs = torch::TensorOptions().dtype(torch::kInt64).device(device);
    torch::Tensor batchTypes = typesCpu.to(device).view({1, L}).expand({numSamples, L}).contiguous();
    torch::Tensor batchChains = chains.to(longs).view({1, L}).expand({numSamples, L}).contiguous();

    // Initial coordinates: the noised data's distribution at sigmaMax in the Gaussian model of ChainSpread::start
    // (the training chains' variance per cosine mode plus sigmaMax of isotropic noise). Drawn on the CPU so that
    // one seed gives the same start on every device.
    torch::Generator generator = at::detail::createCPUGenerator(settings.seed);
    torch::Tensor x = ChainSpread::start(typesCpu, chains, sigmaMax, numSamples, generator).to(device, dtype);

    torch::NoGradGuard noGrad; // the flow itself is not differentiated
    const double lambda = settings.scoreScale;
    auto sigmaAt = [&](int k) { return sigmaMax * std::pow(sigmaMin / sigmaMax, double(k) / settings.numSteps); };
    for (int k = 0; k < settings.numSteps; k++) {
        double s = sigmaAt(k);
        const double t = sigmaAt(k + 1);
        if (settings.churn > 0) {
            const double raised = s * (1 + settings.churn);
            torch::Tensor noise = torch::randn({numSamples, L, 3, 3}, generator, torch::TensorOptions().dtype(torch::kFloat64));
            noise = noise - noise.mean({1, 2}, true);
            x = x + std::sqrt(raised * raised - s * s) * noise.to(device, dtype);
            s = raised;
        }
        torch::Tensor d1 = (lambda * s) * energyGradient(x, batchTypes, batchChains, s);
        torch::Tensor d2 = (lambda * t) * energyGradient(x + (t - s) * d1, batchTypes, batchChains, t);
        x = x + (t - s) * 0.5 * (d1 + d2);
        if (progress)
            progress(k + 1, settings.numSteps);
    }
    x = x - (lambda * sigmaMin * sigmaMin) * energyGradient(x, batchTypes, batchChains, sigmaMin);
    torch::Tensor result = x.to(torch::kCPU, torch::kFloat64);
    if (!torch::isfinite(result).all().item<bool>())
        throw std::runtime_error("BackboneSampler: the flow produced non-finite coordinates");
    return result;
}

std::vector<double> sampleFrameAtoms(const std::string& modelPath, const std::vector<int>& types,
                                     const std::vector<int>& chains, int numSamples, int numSteps, double sigmaMax,
                                     double sigmaMin, int seed, const std::string& device, double churn,
                                     double scoreScale) {
    if (types.size() != chains.size())
        throw std::invalid_argument("sampleFrameAtoms: types and chains differ in length");
    torch::Device target(device);
    if (target.is_cuda() && !torch::cuda::is_available())
        throw std::invalid_argument("sampleFrameAtoms: device " + device + " requested but CUDA is not available");
    BackboneSampler sampler(loadEnergyModel(resolveModelPath(modelPath)), target, torch::kFloat32, AttentionBackend::Auto);
    std::vector<int64_t> t(types.begin(), types.end()), c(chains.begin(), chains.end());
    SamplerSettings settings;
    settings.numSteps = numSteps;
    settings.sigmaMax = sigmaMax;
    settings.sigmaMin = sigmaMin;
    settings.churn = churn;
    settings.scoreScale = scoreScale;
    if (seed < 0)
        throw std::invalid_argument("sampleFrameAtoms: seed must be non-negative");
    settings.seed = (uint64_t) seed;
    torch::Tensor x = sampler.sample(torch::tensor(t), torch::tensor(c), numSamples, settings).contiguous();
    return std::vector<double>(x.data_ptr<double>(), x.data_ptr<double>() + x.numel());
}

} // namespace FlashIPAPlugin
