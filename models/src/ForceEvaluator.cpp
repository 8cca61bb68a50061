#include "flashipa/ForceEvaluator.h"
#include <stdexcept>

namespace FlashIPAPlugin {

ForceEvaluator::ForceEvaluator(EnergyModel model, torch::Device device, torch::Dtype dtype, AttentionBackend backend)
    : model_(model), device(device), dtype(dtype), backend(backend) {
    model_->to(device, dtype);
    model_->eval();
    // Parameters never need gradients here: forces come from gradients with respect to positions only.
    for (auto& parameter : model_->parameters())
        parameter.set_requires_grad(false);
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
    torch::Tensor atoms = positions.to(dtype).index_select(0, atomIndices.view({-1})).view({1, -1, 3, 3}).detach();
    torch::Tensor sigmaTensor = torch::full({1}, sigma, torch::TensorOptions().dtype(dtype).device(device));
    ForceEvaluation result;
    StructureBatch batch{atoms, types, chains, torch::Tensor()};
    if (!computeForces) {
        torch::NoGradGuard noGrad;
        double modelEnergy = model_->forward(batch, sigmaTensor, backend).sum().item<double>();
        result.energy = scale * kT * modelEnergy;
        result.dEnergyDScale = kT * modelEnergy;
        result.dEnergyDTemperature = scale * BoltzmannKJPerMolK * modelEnergy;
        return result;
    }
    atoms.set_requires_grad(true);
    sigmaTensor.set_requires_grad(true);
    torch::Tensor energy = model_->forward(batch, sigmaTensor, backend).sum();
    auto gradients = torch::autograd::grad({energy}, {atoms, sigmaTensor});
    const double modelEnergy = energy.item<double>();
    result.energy = scale * kT * modelEnergy;
    result.frameAtomForces = gradients[0].squeeze(0) * (-scale * kT);
    result.dEnergyDScale = kT * modelEnergy;
    result.dEnergyDSigma = scale * kT * gradients[1].item<double>();
    result.dEnergyDTemperature = scale * BoltzmannKJPerMolK * modelEnergy;
    return result;
}

} // namespace FlashIPAPlugin
