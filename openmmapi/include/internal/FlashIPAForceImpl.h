#ifndef OPENMM_FLASHIPA_FORCE_IMPL_H_
#define OPENMM_FLASHIPA_FORCE_IMPL_H_

#include "FlashIPAForce.h"
#include "openmm/Kernel.h"
#include "openmm/internal/ForceImpl.h"
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace FlashIPAPlugin {

/** The internal implementation of FlashIPAForce: validates it and dispatches to the platform kernel. */
class OPENMM_EXPORT_FLASHIPA FlashIPAForceImpl : public OpenMM::ForceImpl {
public:
    explicit FlashIPAForceImpl(const FlashIPAForce& owner) : owner(owner) {}
    void initialize(OpenMM::ContextImpl& context) override;
    const FlashIPAForce& getOwner() const override { return owner; }
    void updateContextState(OpenMM::ContextImpl& context, bool& forcesInvalid) override {}
    double calcForcesAndEnergy(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy, int groups) override;
    std::map<std::string, double> getDefaultParameters() override;
    std::vector<std::string> getKernelNames() override;
    /** Bonds between consecutive frame atoms, so OpenMM keeps each residue's atoms in one molecule. */
    std::vector<std::pair<int, int>> getBondedParticles() const override;
    void updateParametersInContext(OpenMM::ContextImpl& context);
    /** Residue evaluations skipped under the "skip" degenerate-frame policy (see FlashIPAForce). */
    long long getNumSkippedResidues() const;
    /**
     * Throws OpenMMException if the force cannot be used with a System of numParticles particles:
     * no residues, atom indices out of range or repeated, unknown residue types, negative chains.
     */
    static void validate(const FlashIPAForce& force, int numParticles);

private:
    const FlashIPAForce& owner;
    OpenMM::Kernel kernel;
};

} // namespace FlashIPAPlugin

#endif
