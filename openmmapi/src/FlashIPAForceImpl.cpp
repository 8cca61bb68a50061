#include "internal/FlashIPAForceImpl.h"
#include "FlashIPAKernels.h"
#include "flashipa/ResidueTypes.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include <vector>

using namespace FlashIPAPlugin;
using namespace OpenMM;

void FlashIPAForceImpl::validate(const FlashIPAForce& force, int numParticles) {
    const int n = force.getNumResidues();
    if (n == 0)
        throw OpenMMException("FlashIPAForce: the force has no residues (add them with addResidue or createForce)");
    std::vector<int> owner(numParticles, -1);
    for (int i = 0; i < n; i++) {
        int atoms[3], type, chain;
        force.getResidueParameters(i, atoms[0], atoms[1], atoms[2], type, chain);
        const std::string where = "FlashIPAForce: residue " + std::to_string(i) + ": ";
        for (int atom : atoms) {
            if (atom < 0 || atom >= numParticles)
                throw OpenMMException(where + "atom index " + std::to_string(atom) + " is out of range (the System has " +
                                      std::to_string(numParticles) + " particles)");
            if (owner[atom] == i)
                throw OpenMMException(where + "atom " + std::to_string(atom) + " is used twice in one frame");
            if (owner[atom] >= 0)
                throw OpenMMException(where + "atom " + std::to_string(atom) + " already belongs to the frame of residue " +
                                      std::to_string(owner[atom]));
            owner[atom] = i;
        }
        if (type < 0 || type >= ResidueType::Count)
            throw OpenMMException(where + "residue type " + std::to_string(type) + " is unknown (valid: 0-" +
                                  std::to_string(ResidueType::Count - 1) + ")");
        if (chain < 0)
            throw OpenMMException(where + "chain " + std::to_string(chain) + " must be non-negative");
    }
}

void FlashIPAForceImpl::initialize(ContextImpl& context) {
    validate(owner, context.getSystem().getNumParticles());
    kernel = context.getPlatform().createKernel(CalcFlashIPAForceKernel::Name(), context);
    kernel.getAs<CalcFlashIPAForceKernel>().initialize(context.getSystem(), owner);
}

double FlashIPAForceImpl::calcForcesAndEnergy(ContextImpl& context, bool includeForces, bool includeEnergy, int groups) {
    if ((groups & (1 << owner.getForceGroup())) != 0)
        return kernel.getAs<CalcFlashIPAForceKernel>().execute(context, includeForces, includeEnergy);
    return 0.0;
}

std::map<std::string, double> FlashIPAForceImpl::getDefaultParameters() {
    return {{FlashIPAForce::Scale(), owner.getDefaultScale()},
            {FlashIPAForce::Sigma(), owner.getDefaultSigma()},
            {FlashIPAForce::Temperature(), owner.getDefaultTemperature()}};
}

std::vector<std::string> FlashIPAForceImpl::getKernelNames() {
    return {CalcFlashIPAForceKernel::Name()};
}

std::vector<std::pair<int, int>> FlashIPAForceImpl::getBondedParticles() const {
    // Each frame's atoms, and consecutive frame origins, are bonded: OpenMM then treats all residues of
    // the force (every chain of a complex) as one molecule and never wraps them apart, so the
    // non-periodic model always sees the complex whole, with its chains in place relative to each other.
    std::vector<std::pair<int, int>> bonds;
    for (int i = 0; i < owner.getNumResidues(); i++) {
        int a, b, c, type, chain;
        owner.getResidueParameters(i, a, b, c, type, chain);
        bonds.emplace_back(a, b);
        bonds.emplace_back(b, c);
        if (i > 0) {
            int a0, b0, c0, type0, chain0;
            owner.getResidueParameters(i - 1, a0, b0, c0, type0, chain0);
            bonds.emplace_back(b0, b);
        }
    }
    return bonds;
}

long long FlashIPAForceImpl::getNumSkippedResidues() const {
    return kernel.getAs<const CalcFlashIPAForceKernel>().getNumSkippedResidues();
}

void FlashIPAForceImpl::updateParametersInContext(ContextImpl& context) {
    validate(owner, context.getSystem().getNumParticles());
    kernel.getAs<CalcFlashIPAForceKernel>().copyParametersToContext(context, owner);
    context.systemChanged();
}
