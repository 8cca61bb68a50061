#ifndef FLASHIPA_FORCE_EVALUATOR_H_
#define FLASHIPA_FORCE_EVALUATOR_H_

#include "flashipa/EnergyModel.h"
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

/** Boltzmann's constant in kJ/mol/K (kT = BoltzmannKJPerMolK * T). */
constexpr double BoltzmannKJPerMolK = 0.0083144626;

/** The result of one evaluation of U = scale * kT * E(x, sigma). */
struct ForceEvaluation {
    double energy = 0;                   ///< U in kJ/mol
    torch::Tensor frameAtomForces;       ///< -dU/dx for the frame atoms [L, 3, 3] in kJ/mol/nm (undefined if not asked)
    double dEnergyDScale = 0;            ///< dU/d(flashipaScale), kJ/mol
    double dEnergyDSigma = 0;            ///< dU/d(flashipaSigma), kJ/mol/nm
    double dEnergyDTemperature = 0;      ///< dU/d(flashipaTemperature), kJ/mol/K
    int64_t skippedResidues = 0;         ///< residues left out for degenerate frames (skip policy only)
};

/**
 * The same quantities as ForceEvaluation, as tensors on the evaluator's device (nothing copied to the
 * host): what GPU platforms consume without synchronising.
 */
struct DeviceForceEvaluation {
    torch::Tensor energy;            ///< [] kJ/mol
    torch::Tensor frameAtomForces;   ///< [L, 3, 3] kJ/mol/nm (zero when invalid)
    torch::Tensor parameterDerivatives; ///< [3]: dU/dscale, dU/dsigma, dU/dtemperature
    torch::Tensor invalid;           ///< [] bool: some frame was degenerate or non-finite
    torch::Tensor skippedResidues;   ///< [] int64: residues left out of this evaluation (skip policy; else 0)
};

/**
 * Evaluates a FlashIPAForce's energy, forces and parameter derivatives from a positions tensor, on
 * whatever device and dtype the evaluator was built for. Platform kernels only gather positions and
 * scatter forces; everything model-related happens here, so Reference and CUDA share it.
 */
class ForceEvaluator {
public:
    /** @param model moved to device/dtype; @param backend attention backend for every evaluation */
    ForceEvaluator(EnergyModel model, torch::Device device, torch::Dtype dtype, AttentionBackend backend);
    /**
     * Set the residues: frameAtoms holds 3 particle indices per residue (a, b, c); types and chains one
     * value per residue.
     */
    void setResidues(const std::vector<int64_t>& frameAtoms, const std::vector<int64_t>& types, const std::vector<int64_t>& chains);
    /**
     * What to do with residues whose frame atoms are degenerate (coincident, collinear or non-finite).
     * false (default): evaluate() throws std::invalid_argument naming the residue, and evaluateOnDevice()
     * zeroes energy and forces and raises DeviceForceEvaluation::invalid. true: such residues are left out
     * of the model (masked as padding: no energy, no force on their atoms, invisible to the others) and
     * counted in skippedResidues; invalid still flags that some were skipped. docs/DESIGN-DECISIONS.md says why.
     */
    void setSkipDegenerateFrames(bool skip) { skipDegenerate = skip; }
    /** Whether degenerate residues are skipped (see setSkipDegenerateFrames). */
    bool skipsDegenerateFrames() const { return skipDegenerate; }
    /** Number of residues. */
    int64_t numResidues() const { return types.defined() ? types.size(1) : 0; }
    /** Particle indices of the frame atoms, [L, 3] int64 on the evaluator's device. */
    const torch::Tensor& frameAtomIndices() const { return atomIndices; }
    /**
     * Evaluate from positions [numParticles, 3] (nm; any dtype, on the evaluator's device).
     * With computeForces, also forces and the three parameter derivatives.
     * Throws std::invalid_argument for degenerate or non-finite frame atoms, unless they are skipped
     * (setSkipDegenerateFrames).
     */
    ForceEvaluation evaluate(const torch::Tensor& positions, double scale, double sigma, double temperature, bool computeForces);
    /**
     * Evaluate from frame atoms already gathered on the device, [L, 3, 3] in the evaluator's dtype, with
     * parameters [3] = (scale, sigma, temperature) on the device. Never synchronises with the host and
     * allocates nothing outside LibTorch's caching allocator, so it can be captured in a CUDA graph.
     * Degenerate frames are guarded numerically and reported through DeviceForceEvaluation::invalid.
     */
    DeviceForceEvaluation evaluateOnDevice(const torch::Tensor& frameAtoms, const torch::Tensor& parameters);
    /** The model. */
    EnergyModel& model() { return model_; }

private:
    EnergyModel model_;
    torch::Device device;
    torch::Dtype dtype;
    AttentionBackend backend;
    torch::Tensor atomIndices, types, chains;
    bool skipDegenerate = false;
};

} // namespace FlashIPAPlugin

#endif
