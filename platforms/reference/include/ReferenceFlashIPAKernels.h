#ifndef REFERENCE_FLASHIPA_KERNELS_H_
#define REFERENCE_FLASHIPA_KERNELS_H_

#include "FlashIPAKernels.h"
#include "flashipa/ForceEvaluator.h"
#include <memory>

namespace FlashIPAPlugin {

/** FlashIPAForce on the Reference platform: the model in LibTorch on CPU, in double precision. */
class ReferenceCalcFlashIPAForceKernel : public CalcFlashIPAForceKernel {
public:
    ReferenceCalcFlashIPAForceKernel(std::string name, const OpenMM::Platform& platform) : CalcFlashIPAForceKernel(name, platform) {}
    void initialize(const OpenMM::System& system, const FlashIPAForce& force) override;
    double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy) override;
    void copyParametersToContext(OpenMM::ContextImpl& context, const FlashIPAForce& force) override;
    long long getNumSkippedResidues() const override { return skippedResidues; }

private:
    void setResidues(const FlashIPAForce& force);
    std::unique_ptr<ForceEvaluator> evaluator;
    std::vector<int> frameAtoms; // 3 per residue, for scattering forces
    long long skippedResidues = 0;
};

} // namespace FlashIPAPlugin

#endif
