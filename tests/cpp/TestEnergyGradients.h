#ifndef FLASHIPA_TEST_ENERGY_GRADIENTS_H_
#define FLASHIPA_TEST_ENERGY_GRADIENTS_H_
// The energy model's gradient with respect to the atoms against central differences, shared by the tests of
// the model and of its geometry prior.

#include "TestStructures.h"
#include "flashipa/EnergyModel.h"

namespace FlashIPATest {

/** Relative error of d(energy)/d(atoms) by autograd (SDPA backend) against central differences of step h. */
inline double energyGradientError(FlashIPAPlugin::EnergyModel& model, const FlashIPAPlugin::StructureBatch& batch,
                                  const torch::Tensor& sigma, double h) {
    using FlashIPAPlugin::AttentionBackend;
    torch::Tensor x = batch.atoms.clone().requires_grad_(true);
    FlashIPAPlugin::StructureBatch b = batch;
    b.atoms = x;
    torch::Tensor g = torch::autograd::grad({model->forward(b, sigma, AttentionBackend::SDPA).sum()}, {x})[0];
    auto energy = [&](const torch::Tensor& atoms) {
        FlashIPAPlugin::StructureBatch moved = batch;
        moved.atoms = atoms;
        return model->forward(moved, sigma, AttentionBackend::SDPA).item<double>();
    };
    return relativeError(g, centralDifferences(energy, batch.atoms, h));
}

} // namespace FlashIPATest

#endif
