// BackboneSampler (BackboneSampler.h): where generation starts. With an energy that is exactly zero the flow
// leaves its start unchanged, so the samples are the start itself; the oracles are the Gaussian model that
// ChainSpread::start documents, measured here by projecting the samples on the cosine modes written out here, and
// the training table it reads (ChainModes.inc, whose agreement with real chains tests/python/test_generation.py
// checks).
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

TEST(BackboneSampler, StartsFromTheNoisedDataModes) {
    const int64_t L = 60, samples = 400, n = 3 * L;
    const double sigmaMax = 0.8;
    for (bool rna : {false, true}) {
        SCOPED_TRACE(rna ? "RNA" : "protein");
        const int64_t type = rna ? ResidueType::UnknownNucleotide : ResidueType::UnknownAminoAcid;
        const torch::Tensor types = torch::full({L}, type, torch::kInt64), chains = torch::zeros({L}, torch::kInt64);
        // The sampler starts from ChainSpread::start with its seed (a zero energy leaves the start as it is).
        BackboneSampler sampler(zeroEnergyModel(), torch::kCPU, torch::kFloat64, AttentionBackend::SDPA);
        SamplerSettings settings;
        settings.numSteps = 1;
        settings.sigmaMax = sigmaMax;
        settings.sigmaMin = 0.05;
        settings.seed = 7;
        torch::Generator seeded = at::detail::createCPUGenerator(7);
        EXPECT_TRUE(torch::allclose(sampler.sample(types, chains, 3, settings), ChainSpread::start(types, chains, sigmaMax, 3, seeded),
                                    0, 1e-12));
        torch::Generator generator = at::detail::createCPUGenerator(11);
        torch::Tensor x = ChainSpread::start(types, chains, sigmaMax, samples, generator);
        x = x.reshape({samples, n, 3});
        ASSERT_LT(x.mean(1).abs().max().item<double>(), 1e-9); // centred
        const ChainSpread::Modes modes = ChainSpread::modesOfChain(L, rna);
        ASSERT_EQ((int) modes.variances.size(), ChainSpread::ModeCount);
        double inModes = 0;
        for (int k = 1; k <= ChainSpread::ModeCount; k++) {
            torch::Tensor phi = std::sqrt(2.0 / n) * torch::cos(M_PI * k * (torch::arange(n, torch::kFloat64) + 0.5) / n);
            const double variance = torch::einsum("n,snc->sc", {phi, x}).pow(2).mean().item<double>();
            const double expected = modes.variances[k - 1] + modes.rest + sigmaMax * sigmaMax;
            // 400 x 3 normal draws per mode: relative standard error of a variance sqrt(2 / 1200) = 4 %; 17 % is four.
            EXPECT_NEAR(variance / expected, 1.0, 0.17) << "mode " << k;
            inModes += modes.variances[k - 1];
        }
        // The total variance about the centroid: modes + rest + sigma (centring removes one of n degrees of freedom).
        const double expectedTotal = (inModes + modes.rest * (n - 1)) / (n - 1) + sigmaMax * sigmaMax;
        EXPECT_NEAR(varianceAboutCentroid(x.view({samples, L, 3, 3})) / expectedTotal / (1.0 - 1.0 / n), 1.0, 0.03);
        // The first mode carries far more than an isotropic start of the same total would give it.
        EXPECT_GT(modes.variances[0], 5 * (inModes + modes.rest * (n - 1)) / (n - 1));
    }
}

// ChainSpread::modesOfChain reads the training table: at a bin's own length it returns that bin's row, between
// bins it lies between them, and beyond the table it scales with the chain's total variance.
TEST(BackboneSampler, ChainModesFollowTheTrainingTable) {
    for (bool rna : {false, true}) {
        const std::vector<double> small = ChainSpread::modesOfChain(60, rna).variances,
                                  large = ChainSpread::modesOfChain(120, rna).variances;
        double smallSum = 0, largeSum = 0;
        for (int k = 0; k < ChainSpread::ModeCount; k++)
            smallSum += small[k], largeSum += large[k];
        EXPECT_GT(largeSum, smallSum) << rna;  // longer chains are larger
    }
    // Short chains have at most 3L - 1 modes.
    EXPECT_EQ(ChainSpread::modesOfChain(2, false).variances.size(), 5u);
    EXPECT_EQ(ChainSpread::modesOfChain(1, true).variances.size(), 2u);
    // Far beyond the table the total scales as 3L ofChain^2.
    const ChainSpread::Modes a = ChainSpread::modesOfChain(2000, false), b = ChainSpread::modesOfChain(4000, false);
    const double ratio = (4000 * std::pow(ChainSpread::ofChain(4000, false), 2)) / (2000 * std::pow(ChainSpread::ofChain(2000, false), 2));
    EXPECT_NEAR(b.variances[0] / a.variances[0], ratio, 1e-9 * ratio);
    EXPECT_THROW(ChainSpread::modesOfChain(0, false), std::invalid_argument);
}

// Several chains: each chain's own modes, and the chains spread apart as one chain of all residues.
TEST(BackboneSampler, StartOfSeveralChainsSpreadsThemApart) {
    const int64_t L = 40, samples = 200;
    torch::Tensor types = torch::full({2 * L}, (int64_t) ResidueType::UnknownAminoAcid, torch::kInt64);
    torch::Tensor chains = torch::cat({torch::zeros({L}, torch::kInt64), torch::ones({L}, torch::kInt64)});
    torch::Generator generator = at::detail::createCPUGenerator(3);
    torch::Tensor x = ChainSpread::start(types, chains, 0.0, samples, generator).reshape({samples, 2, 3 * L, 3});
    torch::Tensor separation = (x.select(1, 0).mean(1) - x.select(1, 1).mean(1)).pow(2).mean();
    // Each centroid displaced by N(0, ofChain(2L)^2) per coordinate: the difference has twice that variance.
    const double expected = 2 * std::pow(ChainSpread::ofChain(2 * L, false), 2);
    EXPECT_NEAR(separation.item<double>() / expected, 1.0, 0.2);
    torch::Generator again = at::detail::createCPUGenerator(3);
    EXPECT_TRUE(torch::equal(ChainSpread::start(types, chains, 0.0, samples, again).reshape({samples, 2, 3 * L, 3}), x));
    EXPECT_THROW(ChainSpread::start(types, chains, -1.0, 1, generator), std::invalid_argument);
    EXPECT_THROW(ChainSpread::start(types, chains.narrow(0, 0, L), 0.5, 1, generator), std::invalid_argument);
}

TEST(BackboneSampler, ChainSpreadRejectsBadInput) {
    EXPECT_THROW(ChainSpread::ofChain(0, false), std::invalid_argument);
    EXPECT_THROW(ChainSpread::noised(10, false, -0.1), std::invalid_argument);
    EXPECT_THROW(ChainSpread::noised(10, true, std::nan("")), std::invalid_argument);
    EXPECT_DOUBLE_EQ(ChainSpread::noised(10, true, 0.0), ChainSpread::ofChain(10, true));
}
