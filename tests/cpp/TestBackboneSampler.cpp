// BackboneSampler (BackboneSampler.h): where generation starts. With an energy that is exactly zero the flow
// leaves its start unchanged, so the samples are the start itself; the oracle is the noised data's spread
// written out here from the power law of ChainSpread.h (whose fit to real chains
// tests/python/test_generation.py checks).
#include "flashipa/BackboneSampler.h"
#include "flashipa/ChainSpread.h"
#include "flashipa/ResidueTypes.h"
#include <cmath>
#include <gtest/gtest.h>

using namespace FlashIPAPlugin;

namespace {

/** A model whose energy is exactly zero for every input: the per-residue output layer is zeroed. */
EnergyModel zeroEnergyModel() {
    EnergyModel model{ModelConfig()};
    torch::NoGradGuard noGrad;
    for (auto& parameter : model->named_parameters())
        if (parameter.key().rfind("energyOut", 0) == 0)
            parameter.value().zero_();
    return model;
}

/** Variance per coordinate of frame atoms [S, L, 3, 3] about each sample's centroid, over all samples. */
double varianceAboutCentroid(const torch::Tensor& x) {
    torch::Tensor flat = x.reshape({x.size(0), -1, 3});
    return (flat - flat.mean(1, true)).pow(2).mean().item<double>();
}

} // namespace

TEST(BackboneSampler, StartsFromTheNoisedDataSpread) {
    const int64_t L = 60, samples = 64;
    const double sigmaMax = 0.8;
    for (bool rna : {false, true}) {
        BackboneSampler sampler(zeroEnergyModel(), torch::kCPU, torch::kFloat64, AttentionBackend::SDPA);
        const int64_t type = rna ? ResidueType::UnknownNucleotide : ResidueType::UnknownAminoAcid;
        SamplerSettings settings;
        settings.numSteps = 1;
        settings.sigmaMax = sigmaMax;
        settings.sigmaMin = 0.05;
        settings.seed = 7;
        torch::Tensor x = sampler.sample(torch::full({L}, type, torch::kInt64), torch::zeros({L}, torch::kInt64), samples, settings);
        const double chain = rna ? ChainSpread::RnaPrefactor * std::pow(double(L), ChainSpread::RnaExponent)
                                 : ChainSpread::ProteinPrefactor * std::pow(double(L), ChainSpread::ProteinExponent);
        // Centring 3L atoms removes one of 3L degrees of freedom per coordinate.
        const double expected = (sigmaMax * sigmaMax + chain * chain) * (1.0 - 1.0 / (3.0 * L));
        // 64 x 180 x 3 independent normal values: the variance's relative standard error is sqrt(2 / 34560),
        // 0.8 %; 4 % is five of them. A start at sigmaMax alone would be 44 % (protein) or 71 % (RNA) low.
        EXPECT_NEAR(varianceAboutCentroid(x) / expected, 1.0, 0.04) << (rna ? "RNA" : "protein");
    }
}

TEST(BackboneSampler, ChainSpreadRejectsBadInput) {
    EXPECT_THROW(ChainSpread::ofChain(0, false), std::invalid_argument);
    EXPECT_THROW(ChainSpread::noised(10, false, -0.1), std::invalid_argument);
    EXPECT_THROW(ChainSpread::noised(10, true, std::nan("")), std::invalid_argument);
    EXPECT_DOUBLE_EQ(ChainSpread::noised(10, true, 0.0), ChainSpread::ofChain(10, true));
}
