#ifndef FLASHIPA_BACKBONE_SAMPLER_H_
#define FLASHIPA_BACKBONE_SAMPLER_H_

#include "flashipa/EnergyModel.h"
#include <cstdint>
#include <functional>
#include <string>
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

/** How BackboneSampler integrates the reverse diffusion. */
struct SamplerSettings {
    int numSteps = 100;     ///< Heun steps of the probability-flow ODE (two model evaluations each)
    double sigmaMax = 0;    ///< first noise level in nm; 0 = the model's ModelConfig::sigmaMax
    double sigmaMin = 0.02; ///< last noise level in nm (the score is unreliable below ~0.02 nm, docs/MODEL.md)
    uint64_t seed = 0;      ///< seeds every random draw (made on the CPU: the same on every device)
    /**
     * Stochastic "churn" per step (0 = the deterministic ODE): before each step the noise level is raised from
     * s to s (1 + churn) by adding fresh Gaussian noise, then the Heun step goes from there. Re-noising lets
     * the flow correct its own errors (atoms the ODE strands far from their residue).
     */
    double churn = 0;
    /**
     * Factor lambda on the score at every step, Tweedie's step included (1 = the model's own flow). lambda > 1
     * follows the flow of a sharper, lower-temperature distribution (roughly p^lambda at each noise level):
     * more regular local structure and more compact chains; docs/MODEL.md ("Low-temperature sampling")
     * has the measurements.
     */
    double scoreScale = 1;
};

/**
 * Generates frame-atom backbones from the learned energy (docs/MATH.md §6): centred Gaussian coordinates with
 * the spread of the noised data at sigmaMax (ChainSpread::noised), then the probability-flow ODE
 * dx/dsigma = lambda * sigma * dE/dx (lambda = SamplerSettings::scoreScale, 1 by default) down a geometric
 * sigma schedule with Heun steps, then Tweedie's step x - lambda * sigmaMin^2 dE/dx. A batch of samples of one sequence runs as one model batch. The same flow as
 * openmmflashipa.AnnealingIntegrator, without OpenMM in the loop.
 */
class BackboneSampler {
public:
    /** @param model moved to device/dtype and frozen; @param backend attention backend for every evaluation */
    BackboneSampler(EnergyModel model, torch::Device device, torch::Dtype dtype, AttentionBackend backend);
    /**
     * Sample numSamples backbones of one sequence.
     * @param types    residue types [L] (int64; see ResidueType)
     * @param chains   chain ids [L] (int64)
     * @param progress called after each step with (step, numSteps), may be empty
     * @return frame atoms [numSamples, L, 3, 3] in nm, float64 on the CPU
     * Throws std::invalid_argument for bad settings, types or shapes, std::runtime_error if the flow
     * produced non-finite coordinates.
     */
    torch::Tensor sample(const torch::Tensor& types, const torch::Tensor& chains, int64_t numSamples,
                         const SamplerSettings& settings, const std::function<void(int, int)>& progress = {});
    /** dE/dx for frame atoms x [B, L, 3, 3] at noise level sigma (nm), in the sampler's dtype and device. */
    torch::Tensor energyGradient(const torch::Tensor& x, const torch::Tensor& types, const torch::Tensor& chains,
                                 double sigma);
    /** The model. */
    EnergyModel& model() { return model_; }

private:
    EnergyModel model_;
    torch::Device device;
    torch::Dtype dtype;
    AttentionBackend backend;
};

/**
 * Convenience entry point for bindings: load modelPath (empty = the shipped model), sample on device
 * ("cpu" or "cuda[:N]") in float32 with the "auto" backend (fused kernels on CUDA, SDPA on the CPU), and
 * return the frame atoms flattened [numSamples * L * 3 * 3] in nm.
 */
std::vector<double> sampleFrameAtoms(const std::string& modelPath, const std::vector<int>& types,
                                     const std::vector<int>& chains, int numSamples, int numSteps, double sigmaMax,
                                     double sigmaMin, int seed, const std::string& device, double churn = 0,
                                     double scoreScale = 1);

} // namespace FlashIPAPlugin

#endif
