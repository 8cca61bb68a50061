#ifndef OPENMM_FLASHIPA_FORCE_H_
#define OPENMM_FLASHIPA_FORCE_H_

#include "openmm/Context.h"
#include "openmm/Force.h"
#include "internal/windowsExportFlashIPA.h"
#include <map>
#include <string>
#include <vector>

namespace FlashIPAPlugin {

/**
 * A learned energy from a FlashIPA frame model (docs/MATH.md §6):
 *
 *     U(x) = flashipaScale * kT * E_theta(x, flashipaSigma),   kT = 0.0083144626 * flashipaTemperature kJ/mol
 *
 * Each residue contributes one rigid frame built from three atoms: (N, CA, C) for amino acids and
 * (C3', C4', O4') for nucleotides. The model is non-periodic: it sees each chain as one whole molecule
 * (unwrapped coordinates), whatever the System's box.
 *
 * The three global parameters can be changed with Context::setParameter() at any time (integrators may
 * anneal them); derivatives of the energy with respect to all three are reported through
 * State::getEnergyParameterDerivatives().
 */
class OPENMM_EXPORT_FLASHIPA FlashIPAForce : public OpenMM::Force {
public:
    /**
     * Create a FlashIPAForce.
     * @param modelPath  a safetensors checkpoint; empty selects the model shipped with the package.
     */
    explicit FlashIPAForce(const std::string& modelPath = "");
    /** The checkpoint path given at construction ("" = the shipped model). */
    const std::string& getModelPath() const { return modelPath; }
    /** The file the model is actually read from (the shipped model's location when getModelPath() is empty). */
    std::string getResolvedModelPath() const;
    /** SHA-256 (hex) of the checkpoint file, computed when the force was created. */
    const std::string& getModelChecksum() const { return modelChecksum; }
    /**
     * Add a residue.
     * @param atomA, atomB, atomC  frame atoms (protein: N, CA, C; RNA: C3', C4', O4'); the origin is atomB
     * @param residueType          see ResidueType in the model library: 0-19 amino acids, 20 unknown amino
     *                             acid, 21-24 A C G U, 25 unknown nucleotide
     * @param chain                chain id; residues of one chain must be added in sequence order
     * @return the index of the residue
     */
    int addResidue(int atomA, int atomB, int atomC, int residueType, int chain);
    /** The number of residues. */
    int getNumResidues() const { return residues.size(); }
    /** Get the parameters of a residue. */
    void getResidueParameters(int index, int& atomA, int& atomB, int& atomC, int& residueType, int& chain) const;
    /**
     * Name a residue for error messages, e.g. "LYS 25 of chain A" (createForce in Python names every residue
     * after the Topology it was built from). Errors then say "residue 3 (LYS 25 of chain A)" rather than the
     * force's index alone. Empty (the default) for none.
     */
    void setResidueLabel(int index, const std::string& label);
    /** The label of a residue ("" if none was set). */
    const std::string& getResidueLabel(int index) const;
    /** "residue <index>", followed by the label in parentheses when one was set. */
    std::string describeResidue(int index) const;
    /** Set the parameters of a residue (call updateParametersInContext() to apply them to a Context). */
    void setResidueParameters(int index, int atomA, int atomB, int atomC, int residueType, int chain);
    /**
     * Select how attention is evaluated: "auto" (default: "fused" on the CUDA platform in single or mixed
     * precision, "sdpa" on Reference and in double precision), "fused" (the project's CUDA kernels, scalar
     * part on tensor cores in fp16, points exact in fp32), "fused-fp32" (the same kernels, every operand
     * fp32) or "math" (materialised logits, the oracle); "sdpa" lifts Q/K/V through PyTorch's
     * scaled_dot_product_attention (the published algorithm). The fused backends need the CUDA platform
     * in single or mixed precision and are refused elsewhere with a message.
     */
    void setAttentionBackend(const std::string& backend);
    /** The attention backend name. */
    const std::string& getAttentionBackend() const { return attentionBackend; }
    /**
     * What happens when a residue's frame atoms are degenerate (coincident, collinear or non-finite) during
     * an evaluation: "error" (default) throws an OpenMMException naming the residue; "skip" leaves such
     * residues out of the model for that evaluation (no energy, no force on their atoms, invisible to the
     * other residues), counts them (getNumSkippedResidues) and prints one warning per Context. "skip" is
     * for simulations of the learned force alone and for generation from noise, where a frame can pass
     * through a degenerate shape; the energy is then discontinuous when a residue drops out
     * (docs/DESIGN-DECISIONS.md).
     */
    void setDegenerateFramePolicy(const std::string& policy);
    /** The degenerate-frame policy: "error" or "skip". */
    const std::string& getDegenerateFramePolicy() const { return degenerateFramePolicy; }
    /**
     * Residue evaluations skipped under the "skip" policy in a Context since it was created (a residue
     * skipped in ten evaluations counts ten). Reading it waits for the GPU on the CUDA platform.
     */
    long long getNumSkippedResidues(const OpenMM::Context& context) const;
    /** Set a platform-specific property (e.g. "useCUDAGraphs" = "true"/"false"). */
    void setProperty(const std::string& name, const std::string& value);
    /** All platform-specific properties that were set. */
    const std::map<std::string, std::string>& getProperties() const { return properties; }
    /** Name of the global parameter lambda scaling the energy. */
    static const std::string& Scale();
    /** Name of the global parameter sigma (nm), the model's noise level. */
    static const std::string& Sigma();
    /** Name of the global parameter T (kelvin) that sets kT. */
    static const std::string& Temperature();
    /** Default value of flashipaScale (dimensionless; default 1). */
    double getDefaultScale() const { return defaultScale; }
    /** Set the default value of flashipaScale. */
    void setDefaultScale(double scale);
    /** Default value of flashipaSigma in nm (default 0.05). */
    double getDefaultSigma() const { return defaultSigma; }
    /** Set the default value of flashipaSigma (nm, > 0). */
    void setDefaultSigma(double sigma);
    /** Default value of flashipaTemperature in kelvin (default 300). */
    double getDefaultTemperature() const { return defaultTemperature; }
    /** Set the default value of flashipaTemperature (kelvin, > 0). */
    void setDefaultTemperature(double temperature);
    /**
     * Copy residue parameters to a Context. The set of residues may change but not the number of residues.
     */
    void updateParametersInContext(OpenMM::Context& context);
    /** The model is non-periodic. */
    bool usesPeriodicBoundaryConditions() const override { return false; }

protected:
    OpenMM::ForceImpl* createImpl() const override;

private:
    struct Residue {
        int atomA, atomB, atomC, type, chain;
        std::string label;
    };
    void checkIndex(int index) const;
    std::string modelPath, modelChecksum, attentionBackend, degenerateFramePolicy;
    std::map<std::string, std::string> properties;
    double defaultScale, defaultSigma, defaultTemperature;
    std::vector<Residue> residues;

public:
    /** Internal use: set the checksum recorded for the model (used when deserialising). */
    void setModelChecksum(const std::string& checksum) { modelChecksum = checksum; }
};

} // namespace FlashIPAPlugin

#endif
