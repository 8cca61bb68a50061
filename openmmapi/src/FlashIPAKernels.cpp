#include "FlashIPAKernels.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"

using namespace FlashIPAPlugin;
using OpenMM::OpenMMException;

CalcFlashIPAForceKernel::GlobalParameters CalcFlashIPAForceKernel::readGlobalParameters(OpenMM::ContextImpl& context) {
    GlobalParameters p{context.getParameter(FlashIPAForce::Scale()), context.getParameter(FlashIPAForce::Sigma()),
                       context.getParameter(FlashIPAForce::Temperature())};
    if (!(p.sigma > 0))
        throw OpenMMException("FlashIPAForce: " + FlashIPAForce::Sigma() + " must be positive (got " + std::to_string(p.sigma) + ")");
    if (!(p.temperature > 0))
        throw OpenMMException("FlashIPAForce: " + FlashIPAForce::Temperature() + " must be positive (got " +
                              std::to_string(p.temperature) + ")");
    return p;
}
