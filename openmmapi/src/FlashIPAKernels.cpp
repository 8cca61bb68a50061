#include "FlashIPAKernels.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include <cmath>
#include <iostream>
#include <sstream>

using namespace FlashIPAPlugin;
using OpenMM::OpenMMException;

CalcFlashIPAForceKernel::GlobalParameters CalcFlashIPAForceKernel::readGlobalParameters(OpenMM::ContextImpl& context) {
    GlobalParameters p{context.getParameter(FlashIPAForce::Scale()), context.getParameter(FlashIPAForce::Sigma()),
                       context.getParameter(FlashIPAForce::Temperature())};
    auto value = [](double x) {
        std::ostringstream out;
        out << x;
        return out.str();
    };
    if (!std::isfinite(p.scale))
        throw OpenMMException("FlashIPAForce: " + FlashIPAForce::Scale() + " must be finite (got " + value(p.scale) + ")");
    if (!(p.sigma > 0) || !std::isfinite(p.sigma))
        throw OpenMMException("FlashIPAForce: " + FlashIPAForce::Sigma() + " must be a positive, finite number of nm (got " +
                              value(p.sigma) + ")");
    if (!(p.temperature > 0) || !std::isfinite(p.temperature))
        throw OpenMMException("FlashIPAForce: " + FlashIPAForce::Temperature() + " must be a positive, finite number of kelvin (got " +
                              value(p.temperature) + ")");
    return p;
}

void CalcFlashIPAForceKernel::warnIfSigmaUntrained(double sigma, double trainedMin, double trainedMax) {
    if (sigmaWarningPrinted || (sigma >= trainedMin && sigma <= trainedMax))
        return;
    sigmaWarningPrinted = true;
    std::cerr << "FlashIPAForce warning: " << FlashIPAForce::Sigma() << " = " << sigma << " nm lies outside the range the model "
              << "was trained on (" << trainedMin << "-" << trainedMax << " nm); its energy there is an extrapolation "
              << "(and grows as 1/sigma). Printed once per Context." << std::endl;
}

void CalcFlashIPAForceKernel::warnSkippedResidues() {
    if (skipWarningPrinted)
        return;
    skipWarningPrinted = true;
    std::cerr << "FlashIPAForce warning: residues with degenerate frame atoms (coincident, collinear or non-finite) were "
              << "left out of the learned energy (degenerate-frame policy \"skip\"); FlashIPAForce.getNumSkippedResidues(context) "
              << "counts them. Printed once per Context." << std::endl;
}

void CalcFlashIPAForceKernel::recordResidueNames(const FlashIPAForce& force) {
    residueNames.clear();
    for (int i = 0; i < force.getNumResidues(); i++)
        residueNames.push_back(force.describeResidue(i));
}

std::string CalcFlashIPAForceKernel::degenerateFrameMessage(int64_t residue, const std::string& problem) const {
    const std::string name = residue >= 0 && residue < (int64_t) residueNames.size() ? residueNames[residue]
                                                                                   : "residue " + std::to_string(residue);
    return "FlashIPAForce: frame atoms of " + name + " " + problem;
}
