#ifndef FLASHIPA_ENERGY_MODEL_H_
#define FLASHIPA_ENERGY_MODEL_H_

#include "flashipa/FlashIPALayer.h"
#include "flashipa/ModelConfig.h"
#include <map>
#include <string>
#include <torch/torch.h>

namespace FlashIPAPlugin {

/** A batch of structures for the EnergyModel. */
struct StructureBatch {
    torch::Tensor atoms;     ///< frame atoms [B, L, 3 (a, b, c), 3] in nm
    torch::Tensor types;     ///< residue types [B, L] (int64, see ResidueType)
    torch::Tensor chains;    ///< chain ids [B, L] (int64); neighbours and positions respect them
    torch::Tensor mask;      ///< [B, L] bool, true = real residue; undefined = all real
};

/**
 * The learned energy E_theta(x, sigma) in units of kT (docs/MATH.md §6): node features (type embedding,
 * Fourier features of log sigma, each residue's own and its chain neighbours' frame atoms expressed in
 * its frame), factorised pair features, a trunk of FlashIPA blocks, and a per-residue energy head.
 * E = sum_i e_i / sigma, so that sigma * grad E stays O(1) across noise levels.
 * One definition serves training (math backend), the Reference platform and the CUDA platform.
 */
class EnergyModelImpl : public torch::nn::Module {
public:
    explicit EnergyModelImpl(const ModelConfig& config);

    /**
     * Energies [B] in kT.
     * @param sigma     noise level in nm, [B] or a scalar tensor
     * @param validate  check the inputs on the host and throw std::invalid_argument on degenerate frames,
     *                  bad residue types or non-positive sigma (true); or skip every host check and guard
     *                  degenerate frames numerically (false): for generation from noise, and for GPU callers
     *                  that must not synchronise (they validate types once and test
     *                  FrameBuilder::degenerate() asynchronously)
     */
    torch::Tensor forward(const StructureBatch& batch, const torch::Tensor& sigma, AttentionBackend backend,
                          bool validate = true);

    /**
     * The number of parameters a model of this configuration holds, computed without building it (so a
     * loader can compare a checkpoint's metadata with its tensors before allocating anything).
     */
    static int64_t parameterCount(const ModelConfig& config);

    /** The architecture this model was built with. */
    const ModelConfig& config() const { return config_; }

    /** Per-residue features invariant under global rotation and translation, [B, L, n]. */
    static torch::Tensor localGeometry(const torch::Tensor& atoms, const Frames& frames, const torch::Tensor& chains,
                                       const torch::Tensor& mask);
    /** Sequence positions [B, L]: index along the batch row plus a gap of 64 at each chain change. */
    static torch::Tensor sequencePositions(const torch::Tensor& chains);

    torch::nn::Embedding typeEmbedding{nullptr};
    torch::nn::Linear sigmaEmbedding{nullptr}, geometryIn{nullptr}, geometryHidden{nullptr};
    torch::nn::LayerNorm inputNorm{nullptr};
    torch::nn::Linear pairLeft{nullptr}, pairRight{nullptr};
    torch::nn::ModuleList ipaLayers, ipaNorms, transitions, transitionNorms;
    torch::nn::Linear energyHidden{nullptr}, energyOut{nullptr};
    /** With config.geometryPrior: the prior's pair kinds [K, 4] and their (d0, s0) [K, 2] (GeometryPrior.h),
     *  parameters that never train (requires_grad false), so checkpoints carry them; undefined otherwise. */
    torch::Tensor geometryPriorPairs, geometryPriorStats;
    /** With config.geometryPrior = 4: the bond covariances (c0, c1, c2) [3] (nm^2) of the correlated chain term,
     *  a parameter that never trains; undefined otherwise. */
    torch::Tensor geometryPriorBondCovariance;
    /** Sets the prior's (d0, s0) per pair kind ([K, 2], nm), e.g. from GeometryPrior::measure(). */
    void setGeometryPriorStats(const torch::Tensor& stats);
    /** Sets version 4's bond covariances ([3], nm^2), e.g. from GeometryPrior::measureBondCovariance(); they must
     *  define a positive definite chain covariance (GeometryPrior::bondSpectrumMinimum() > 0). */
    void setGeometryPriorBondCovariance(const torch::Tensor& covariance);

private:
    ModelConfig config_;
};
TORCH_MODULE(EnergyModel);

/** Writes the model's parameters and configuration (plus extraMetadata) as a safetensors file. */
void saveEnergyModel(EnergyModel& model, const std::string& path,
                     const std::map<std::string, std::string>& extraMetadata = {});

/**
 * Loads a checkpoint written by saveEnergyModel. Validates the format, the configuration, and every
 * parameter's name, shape and dtype; throws std::runtime_error with the cause on any mismatch.
 * @param metadata  if not null, receives the checkpoint's metadata
 */
EnergyModel loadEnergyModel(const std::string& path, std::map<std::string, std::string>* metadata = nullptr);

/**
 * Moves a model to device/dtype for evaluation only: eval mode, and no parameter needs gradients
 * (forces and scores are gradients with respect to positions). Shared by ForceEvaluator and BackboneSampler.
 */
void prepareForInference(EnergyModel& model, torch::Device device, torch::Dtype dtype);

/** Sets every trainable parameter of a module from a seeded generator (deterministic, independent of global RNG
 *  state); parameters that do not train (the geometry prior's tables) keep their values. */
void randomizeParameters(torch::nn::Module& module, uint64_t seed, double scale);

} // namespace FlashIPAPlugin

#endif
