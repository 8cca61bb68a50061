#ifndef FLASHIPA_KERNELS_H_
#define FLASHIPA_KERNELS_H_

#include "FlashIPAForce.h"
#include "openmm/KernelImpl.h"
#include "openmm/Platform.h"
#include "openmm/System.h"
#include <string>
#include <vector>

namespace FlashIPAPlugin {

/** The kernel that evaluates a FlashIPAForce; each platform implements it. */
class CalcFlashIPAForceKernel : public OpenMM::KernelImpl {
public:
    static std::string Name() { return "CalcFlashIPAForce"; }
    CalcFlashIPAForceKernel(std::string name, const OpenMM::Platform& platform) : OpenMM::KernelImpl(name, platform) {}
    /** Load the model and record the residues. */
    virtual void initialize(const OpenMM::System& system, const FlashIPAForce& force) = 0;
    /**
     * Evaluate the force: add forces to the context's force buffer when includeForces, and the
     * energy-parameter derivatives; return the energy in kJ/mol (0 when !includeEnergy, if cheaper).
     */
    virtual double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy) = 0;
    /** Copy changed residue parameters from the force. */
    virtual void copyParametersToContext(OpenMM::ContextImpl& context, const FlashIPAForce& force) = 0;
    /** Residue evaluations skipped under the "skip" degenerate-frame policy since initialize(). */
    virtual long long getNumSkippedResidues() const = 0;

protected:
    /** The force's three global parameters as a Context holds them now. */
    struct GlobalParameters {
        double scale, sigma, temperature;
    };
    /** Reads the global parameters; throws OpenMMException if one is not finite, or sigma or the temperature is not positive. */
    static GlobalParameters readGlobalParameters(OpenMM::ContextImpl& context);
    /** Prints one warning (per kernel, so per Context) the first time sigma leaves the model's trained range. */
    void warnIfSigmaUntrained(double sigma, double trainedMin, double trainedMax);
    /** Prints one warning (per kernel) the first time residues are skipped under the "skip" policy. */
    void warnSkippedResidues();
    /** Records how errors name each residue (FlashIPAForce::describeResidue: index and label). */
    void recordResidueNames(const FlashIPAForce& force);
    /** The message for a degenerate residue, naming it as the force does ("residue 3 (LYS 25 of chain A)"). */
    std::string degenerateFrameMessage(int64_t residue, const std::string& problem) const;

private:
    bool sigmaWarningPrinted = false, skipWarningPrinted = false;
    std::vector<std::string> residueNames;
};

} // namespace FlashIPAPlugin

#endif
