#include "flashipa/ForceEvaluator.h"
#include <stdexcept>

namespace FlashIPAPlugin {

ForceEvaluator::ForceEvaluator(EnergyModel model, torch::Device device, torch::Dtype dtype, AttentionBackend backend)
    : model_(model), device(device), dtype(dtype), backend(backend) {
    prepareForInference(model_, device, dtype);
}

void ForceEvaluator::setResidues(const std::vector<int64_t>& frameAtoms, const std::vector<int64_t>& residueTypes,
                                 const std::vector<int64_t>& residueChains) {
    const int64_t L = residueTypes.size();
    if ((int64_t) frameAtoms.size() != 3 * L || (int64_t) residueChains.size() != L)
        throw std::invalid_argument("ForceEvaluator: need three frame atoms, one type and one chain per residue");
    auto longs = torch::TensorOptions().dtype(torch::kInt64);
    atomIndices = torch::tensor(frameAtoms, longs).view({L, 3}).to(device);
    types = torch::tensor(residueTypes, longs).view({1, L}).to(device);
    chains = torch::tensor(residueChains, longs).view({1, L}).to(device);
}

ForceEvaluation ForceEvaluator::evaluate(const torch::Tensor& positions, double scale, double sigma, double temperature,
                                         bool computeForces) {
    if (!atomIndices.defined())
        throw std::invalid_argument("ForceEvaluator: no residues");
    const double kT = BoltzmannKJPerMolK * temperature;
    torch::Tensor atoms = positions.to(device, dtype).index_select(0, atomIndices.view({-1})).view({1, -1, 3, 3});
    ForceEvaluation result;
    StructureBatch batch{atoms, types, chains, torch::Tensor()};
    if (!computeForces) {
        torch::NoGradGuard noGrad;
        if (skipDegenerate) {
            torch::Tensor degenerate = FrameBuilder::degenerate(atoms); // [1, L]
            batch.mask = degenerate.logical_not();
            result.skippedResidues = degenerate.sum().item<int64_t>();
        }
        torch::Tensor sigmaTensor = torch::full({1}, sigma, torch::TensorOptions().dtype(dtype).device(device));
        double modelEnergy = model_->forward(batch, sigmaTensor, backend).sum().item<double>();
        result.energy = scale * kT * modelEnergy;
        result.dEnergyDScale = kT * modelEnergy;
        result.dEnergyDTemperature = scale * BoltzmannKJPerMolK * modelEnergy;
        return result;
    }
    if (!skipDegenerate)
        FrameBuilder::check(atoms); // clear errors on the host path; the device path reports them asynchronously
    torch::Tensor parameters = torch::tensor({scale, sigma, temperature}, torch::TensorOptions().dtype(dtype)).to(device);
    DeviceForceEvaluation d = evaluateOnDevice(atoms.squeeze(0), parameters);
    torch::Tensor derivatives = d.parameterDerivatives.to(torch::kCPU, torch::kFloat64);
    result.energy = d.energy.item<double>();
    result.frameAtomForces = d.frameAtomForces;
    result.dEnergyDScale = derivatives[0].item<double>();
    result.dEnergyDSigma = derivatives[1].item<double>();
    result.dEnergyDTemperature = derivatives[2].item<double>();
    result.skippedResidues = d.skippedResidues.item<int64_t>();
    return result;
}

DeviceForceEvaluation ForceEvaluator::evaluateOnDevice(const torch::Tensor& frameAtoms, const torch::Tensor& parameters) {
    DeviceForceEvaluation result;
    torch::Tensor degenerate = FrameBuilder::degenerate(frameAtoms); // [L]
    result.invalid = degenerate.any();
    torch::Tensor atoms = frameAtoms.detach().unsqueeze(0).requires_grad_(true);
    torch::Tensor sigma = parameters.narrow(0, 1, 1).detach().requires_grad_(true);
    torch::Tensor scale = parameters[0], temperature = parameters[2];
    StructureBatch batch{atoms, types, chains, torch::Tensor()};
    if (skipDegenerate) {
        batch.mask = degenerate.logical_not().unsqueeze(0);
        result.skippedResidues = degenerate.sum();
    } else {
        result.skippedResidues = torch::zeros({}, degenerate.options().dtype(torch::kInt64));
    }
    torch::Tensor energy = model_->forward(batch, sigma, backend, false).sum();
    // A caller on a Python thread must have released the GIL (the platforms' kernels do: ReleasedGIL.h).
    std::vector<torch::Tensor> gradients = torch::autograd::grad({energy}, {atoms, sigma});
    torch::Tensor kT = temperature * BoltzmannKJPerMolK;
    // Error policy: a degenerate frame zeroes the evaluation (the platform then throws). Skip policy: the
    // degenerate residues are already masked out, so the rest of the evaluation stands.
    torch::Tensor valid = skipDegenerate ? torch::ones({}, energy.options()) : result.invalid.logical_not().to(energy.dtype());
    energy = energy.detach();
    result.energy = scale * kT * energy * valid;
    result.frameAtomForces = gradients[0].squeeze(0) * (-scale * kT * valid);
    result.parameterDerivatives =
        torch::stack({kT * energy, scale * kT * gradients[1].squeeze(0), scale * BoltzmannKJPerMolK * energy}) * valid;
    return result;
}

} // namespace FlashIPAPlugin
