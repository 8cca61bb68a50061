// The energy model's analytic geometry prior (GeometryPrior.h, docs/MODEL.md "Geometry prior"): the closed
// form against a numerical convolution, its limits, its place in the EnergyModel (gradients by finite
// differences, checkpoints) and its statistics measured on a data set.
#include "TestEnergyGradients.h"
#include "TestStructures.h"
#include "flashipa/Checkpoint.h"
#include "flashipa/Dataset.h"
#include "flashipa/EnergyModel.h"
#include "flashipa/GeometryPrior.h"
#include "flashipa/ResidueTypes.h"
#include <cmath>
#include <gtest/gtest.h>
#include <unistd.h>

using namespace FlashIPAPlugin;
using namespace FlashIPATest;

namespace {

/** Two protein residues as frame atoms [1, 2, 3, 3] (nm), from helixAtoms. */
StructureBatch twoResidues() {
    StructureBatch batch;
    batch.atoms = helixAtoms(2, 3);
    batch.types = torch::tensor({0, 5}, torch::kInt64).view({1, 2});
    batch.chains = torch::zeros({1, 2}, torch::kInt64);
    return batch;
}

/**
 * -log of the density of r = d0 u + sqrt(v) n (u uniform on the unit sphere, n standard normal in 3D) at a
 * point |r| = radius, by quadrature over u (a Fibonacci sphere of `points` directions): an oracle that never
 * uses the closed form. Constant offsets cancel in differences.
 */
double numericalMinusLogDensity(double radius, double d0, double v, int points = 20000) {
    const double golden = M_PI * (3.0 - std::sqrt(5.0));
    double sum = 0;
    for (int k = 0; k < points; k++) {
        const double z = 1.0 - 2.0 * (k + 0.5) / points, rho = std::sqrt(1.0 - z * z), phi = golden * k;
        // r lies on the z axis; the squared distance to d0 u:
        const double dx = d0 * rho * std::cos(phi), dy = d0 * rho * std::sin(phi), dz = radius - d0 * z;
        sum += std::exp(-(dx * dx + dy * dy + dz * dz) / (2.0 * v));
    }
    return -std::log(sum / points);
}

/**
 * The prior's N-CA term at an N-CA distance `radius`, plus a constant, through GeometryPrior::energy: one
 * protein residue, N on the x axis, CA at the origin, C on the y axis (its CA-C term does not change).
 */
double closedForm(double radius, double d0, double s0, double sigma) {
    StructureBatch batch;
    batch.atoms = torch::zeros({1, 1, 3, 3}, torch::kFloat64);
    batch.atoms[0][0][0][0] = radius;
    batch.atoms[0][0][2][1] = 0.25;
    batch.types = torch::zeros({1, 1}, torch::kInt64);
    batch.chains = torch::zeros({1, 1}, torch::kInt64);
    const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
    torch::Tensor stats = torch::ones({K, 2}, torch::kFloat64);
    stats[0][0] = d0;
    stats[0][1] = s0;
    return GeometryPrior::energy(batch.atoms, batch.types, batch.chains, torch::Tensor(), torch::full({1}, sigma, torch::kFloat64), stats)
        .item<double>();
}

} // namespace

TEST(GeometryPrior, ClosedFormIsTheNoisedDistanceMarginal) {
    // Differences of the closed form at several radii equal those of -log of the convolution computed by
    // quadrature, at a refinement-level, a middle and a generation-level sigma (and s0 folded into v).
    const double d0 = 0.146, s0 = 0.003;
    for (double sigma : {0.02, 0.1, 0.8}) {
        const double v = s0 * s0 + 2 * sigma * sigma;
        const double ref = 0.146;
        for (double radius : {0.05, 0.12, 0.2, 0.4}) {
            if (sigma < 0.05 && radius == 0.4)
                continue; // exp(-(0.25)^2/2v) underflows the quadrature at this sigma
            const double want = numericalMinusLogDensity(radius, d0, v) - numericalMinusLogDensity(ref, d0, v);
            const double got = closedForm(radius, d0, s0, sigma) - closedForm(ref, d0, s0, sigma);
            EXPECT_NEAR(got, want, 1e-3 * std::max(1.0, std::abs(want))) << "sigma " << sigma << " r " << radius;
        }
    }
}

TEST(GeometryPrior, HarmonicAtSmallSigmaAndFlatAtLargeSigma) {
    const double d0 = 0.146, s0 = 0.003, delta = 0.002;
    // Small sigma: a bond spring of stiffness 1 / v (kT / nm^2) about d0.
    const double sigma = 0.01, v = s0 * s0 + 2 * sigma * sigma;
    const double stretch = closedForm(d0 + delta, d0, s0, sigma) + closedForm(d0 - delta, d0, s0, sigma) - 2 * closedForm(d0, d0, s0, sigma);
    EXPECT_NEAR(stretch / (delta * delta), 1.0 / v, 0.02 / v);
    // Large sigma: moving the pair by 0.05 nm costs far less than kT.
    EXPECT_LT(std::abs(closedForm(d0 + 0.05, d0, s0, 1.5) - closedForm(d0, d0, s0, 1.5)), 0.05);
    // Coincident atoms stay finite.
    EXPECT_TRUE(std::isfinite(closedForm(0.0, d0, s0, 0.05)));
}

TEST(GeometryPrior, PartOfTheEnergyWithFiniteDifferenceGradients) {
    for (int version : {1, 2, 3, 4, 5, 6}) {
        SCOPED_TRACE("geometry prior version " + std::to_string(version));
        ModelConfig config;
        config.geometryPrior = version;
        EnergyModel model(config);
        randomizeParameters(*model, 5, 0.5);
        model->to(torch::kFloat64);
        const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
        // Not measured: NaN, never a plausible number.
        StructureBatch batch = twoResidues();
        if (version >= 5) { // four residues of a tight helix: pairs (i, i + 2) and (i, i + 3) sit at the wall
            batch.atoms = helixAtoms(4, 3);
            batch.types = torch::tensor({0, 5, 7, 2}, torch::kInt64).view({1, 4});
            batch.chains = torch::zeros({1, 4}, torch::kInt64);
        }
        torch::Tensor sigma = torch::full({1}, 0.05, torch::kFloat64);
        EXPECT_TRUE(std::isnan(model->forward(batch, sigma, AttentionBackend::SDPA).item<double>()));
        EXPECT_THROW(model->setGeometryPriorStats(torch::zeros({K, 2})), std::invalid_argument);
        torch::Tensor stats = torch::stack({torch::linspace(0.13, 0.4, K), torch::full({K}, 0.004)}, 1).to(torch::kFloat64);
        model->setGeometryPriorStats(stats);
        torch::Tensor covariance;
        if (version >= 4) {
            EXPECT_THROW(model->setGeometryPriorBondCovariance(torch::tensor({0.007, 0.007, 0.007}, torch::kFloat64)), std::invalid_argument);
            covariance = torch::tensor({0.00692, 0.436 * 0.00692, 0.442 * 0.00692}, torch::kFloat64);
            model->setGeometryPriorBondCovariance(covariance);
        } else {
            EXPECT_THROW(model->setGeometryPriorBondCovariance(torch::tensor({0.007, 0.0, 0.0})), std::invalid_argument);
        }
        // The energy is the network's plus the prior's: the same weights without the prior differ by exactly it.
        ModelConfig plain = config;
        plain.geometryPrior = 0;
        EnergyModel without(plain);
        {
            torch::NoGradGuard noGrad;
            auto source = model->named_parameters();
            for (auto& item : without->named_parameters())
                item.value().copy_(source[item.key()]);
        }
        without->to(torch::kFloat64);
        const double difference = (model->forward(batch, sigma, AttentionBackend::SDPA) - without->forward(batch, sigma, AttentionBackend::SDPA)).item<double>();
        const double prior =
            GeometryPrior::energy(batch.atoms, batch.types, batch.chains, torch::Tensor(), sigma, stats, version, covariance).item<double>();
        EXPECT_NEAR(difference, prior, 1e-9 * std::abs(prior));
        // Gradients against central differences.
        EXPECT_LT(energyGradientError(model, batch, sigma, 1e-6), 1e-5);
    }
}

namespace {

/**
 * The chain weight's definition, evaluated without its closed form: (a + 2 b) sum lambda^2 / (a + lambda b)
 * / sum lambda^2 over the non-zero eigenvalues of the graph Laplacian of a path of `atoms` atoms, from
 * torch's symmetric eigensolver; a = 4 d0^2 / 3, b = sigma^2 (GeometryPrior.h).
 */
double chainWeightFromLaplacian(int atoms, double sigma, double d0) {
    torch::Tensor laplacian = torch::zeros({atoms, atoms}, torch::kFloat64);
    for (int i = 0; i + 1 < atoms; i++) {
        laplacian[i][i] += 1.0, laplacian[i + 1][i + 1] += 1.0;
        laplacian[i][i + 1] = -1.0, laplacian[i + 1][i] = -1.0;
    }
    torch::Tensor lambda = torch::linalg_eigvalsh(laplacian, "L");
    lambda = lambda.index({lambda > 1e-9});
    const double a = 4.0 / 3.0 * d0 * d0, b = sigma * sigma;
    return ((a + 2 * b) * (lambda.pow(2) / (a + lambda * b)).sum() / lambda.pow(2).sum()).item<double>();
}

double chainWeightAt(double sigma, double d0, bool rna) {
    return GeometryPrior::chainWeight(torch::full({1}, sigma, torch::kFloat64), torch::tensor(d0, torch::kFloat64), rna)
        .item<double>();
}

} // namespace

TEST(GeometryPrior, ChainWeightIsTheModeAverageOfAHarmonicChain) {
    // The closed forms against the eigenvalues of the Laplacians they stand for: a long chain (protein
    // backbone, 600 atoms: the finite chain's end effects are O(1/600)) and a path of three atoms (RNA).
    for (double sigma : {0.005, 0.03, 0.1, 0.3, 1.0, 2.0}) {
        EXPECT_NEAR(chainWeightAt(sigma, 0.146, false), chainWeightFromLaplacian(600, sigma, 0.146), 2e-3) << sigma;
        EXPECT_NEAR(chainWeightAt(sigma, 0.145, true), chainWeightFromLaplacian(3, sigma, 0.145), 1e-12) << sigma;
    }
    // Its limits: the pair terms are exact for a single bond at small sigma; at large sigma a chain's mean
    // bond pull is 3/2 of the exact one (weight 2/3) and a path of two bonds' 5/4 (weight 4/5).
    EXPECT_NEAR(chainWeightAt(1e-5, 0.146, false), 1.0, 1e-6);
    EXPECT_NEAR(chainWeightAt(1e-5, 0.145, true), 1.0, 1e-6);
    EXPECT_NEAR(chainWeightAt(1e3, 0.146, false), 2.0 / 3.0, 1e-4);
    EXPECT_NEAR(chainWeightAt(1e3, 0.145, true), 0.8, 1e-6);
}

TEST(GeometryPrior, VersionTwoScalesEachTermByItsChainWeight) {
    // One protein residue (terms N-CA and CA-C) and one RNA residue (C3'-C4', C4'-O4'), each kind's pair at
    // its own d0 but one d0 per molecule type, so version 2's energy is version 1's times one weight.
    for (bool rna : {false, true}) {
        StructureBatch batch;
        batch.atoms = helixAtoms(1, 3);
        batch.types = torch::full({1, 1}, rna ? (int64_t) ResidueType::FirstNucleotide : 0, torch::kInt64);
        batch.chains = torch::zeros({1, 1}, torch::kInt64);
        const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
        torch::Tensor stats = torch::stack({torch::full({K}, 0.15, torch::kFloat64), torch::full({K}, 0.004, torch::kFloat64)}, 1);
        for (double sigma : {0.01, 0.1, 1.0}) {
            torch::Tensor s = torch::full({1}, sigma, torch::kFloat64);
            const double one = GeometryPrior::energy(batch.atoms, batch.types, batch.chains, torch::Tensor(), s, stats, 1).item<double>();
            const double two = GeometryPrior::energy(batch.atoms, batch.types, batch.chains, torch::Tensor(), s, stats, 2).item<double>();
            EXPECT_NEAR(two, chainWeightAt(sigma, 0.15, rna) * one, 1e-12 * std::abs(one)) << rna << " " << sigma;
        }
    }
    for (int version : {4, 5, 6}) // 4 and 5 without their bond covariances, 6 unknown
        EXPECT_THROW(GeometryPrior::energy(helixAtoms(1, 3), torch::zeros({1, 1}, torch::kInt64), torch::zeros({1, 1}, torch::kInt64),
                                           torch::Tensor(), torch::full({1}, 0.1, torch::kFloat64), torch::ones({5, 2}, torch::kFloat64),
                                           version),
                     std::invalid_argument);
}

namespace {

/** -log(1 - F) for one pair at distance r (GeometryPrior::exclusionEnergy's formula in double, straight from
 *  std::erf; valid where 1 - F does not underflow). */
double exclusionClosedForm(double r, double sigma) {
    const double r0 = GeometryPrior::ExclusionRadius, s = std::sqrt(2 * sigma * sigma + GeometryPrior::ExclusionWidth * GeometryPrior::ExclusionWidth);
    auto Phi = [](double x) { return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))); };
    auto phi = [](double x) { return std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI); };
    const double F = Phi((r0 - r) / s) + Phi((r0 + r) / s) - 1.0 - (s / r) * (phi((r0 - r) / s) - phi((r0 + r) / s));
    return -std::log(1.0 - F);
}

/** Four residues 20 nm apart along x, each with its three frame atoms 3 nm apart (the exclusion term reads
 *  positions only), so that a probe placed near one atom interacts with that atom alone. [1, 4, 3, 3] nm. */
torch::Tensor farResidues() {
    torch::Tensor atoms = torch::zeros({1, 4, 3, 3}, torch::kFloat64);
    for (int i = 0; i < 4; i++) {
        atoms[0][i][0][0] = 20.0 * i - 3.0;
        atoms[0][i][1][0] = 20.0 * i;
        atoms[0][i][2][0] = 20.0 * i;
        atoms[0][i][2][1] = 3.0;
    }
    return atoms;
}

} // namespace

namespace {

/** The exclusion term against its closed form, pair selection and finite differences, for one evaluation. */
void expectExclusionIsTheNoisedPairMarginal(GeometryPrior::ExclusionEvaluation evaluation) {
    auto exclusionOf = [evaluation](const torch::Tensor& atoms, const torch::Tensor& chains, const torch::Tensor& real, double sigma,
                                    int64_t nearest = 2) {
        return GeometryPrior::exclusionEnergy(atoms, chains, real, torch::full({1}, sigma, torch::kFloat64), nearest, evaluation)
            .item<double>();
    };
    torch::Tensor chains = torch::zeros({1, 4}, torch::kInt64), real = torch::ones({1, 4}, torch::kBool);
    // Residues far apart: nothing.
    EXPECT_EQ(exclusionOf(farResidues(), chains, real, 0.05), 0.0);
    // One pair of residues two apart (N of residue 2 at distance r from CA of residue 0) against the closed form;
    // the closed form itself was checked against Monte Carlo sampling of the Gaussian (docs/MODEL.md).
    for (double sigma : {0.01, 0.05, 0.2, 0.3}) // (at sigma ~ 1 nm atoms 3 nm apart start to count)
        for (double r : {0.2, 0.26, 0.27, 0.3, 0.5}) {
            torch::Tensor atoms = farResidues();
            atoms[0][2][0][0] = r, atoms[0][2][0][1] = 0.0;
            const double expected = exclusionClosedForm(r, sigma);
            if (!std::isfinite(expected) || expected > 30)
                continue; // 1 - F underflows in the plain formula; the log-space form is checked below
            EXPECT_NEAR(exclusionOf(atoms, chains, real, sigma), expected, 1e-9 + 1e-9 * expected) << "sigma " << sigma << " r " << r;
        }
    // Deep inside the wall at the smallest sigma: finite, large, and growing towards the centre as (r0 - r)^2 / 2s^2.
    torch::Tensor deep = farResidues();
    deep[0][2][0][0] = 0.05, deep[0][2][0][1] = 0.0;
    const double e1 = exclusionOf(deep, chains, real, 0.01);
    deep[0][2][0][0] = 0.1;
    const double e2 = exclusionOf(deep, chains, real, 0.01);
    const double s2 = 2 * 0.01 * 0.01 + GeometryPrior::ExclusionWidth * GeometryPrior::ExclusionWidth;
    EXPECT_TRUE(std::isfinite(e1) && std::isfinite(e2));
    EXPECT_NEAR(e1 - e2, (std::pow(0.22, 2) - std::pow(0.17, 2)) / (2 * s2), 0.02 * (e1 - e2));
    // Which pairs count: a linked neighbour never; the same neighbour across a chain break, and a residue two
    // apart, do; a masked residue does not.
    torch::Tensor close = farResidues();
    close[0][1][0][0] = 0.25, close[0][1][0][1] = 0.0; // N of residue 1 at 0.25 nm from CA of residue 0
    EXPECT_EQ(exclusionOf(close, chains, real, 0.05), 0.0);
    torch::Tensor broken = torch::tensor({0, 1, 1, 1}, torch::kInt64).view({1, 4});
    EXPECT_NEAR(exclusionOf(close, broken, real, 0.05), exclusionClosedForm(0.25, 0.05), 1e-9);
    torch::Tensor twoApart = farResidues();
    twoApart[0][2][0][0] = 0.25, twoApart[0][2][0][1] = 0.0;
    torch::Tensor masked = real.clone();
    masked[0][2] = false;
    EXPECT_GT(exclusionOf(twoApart, chains, real, 0.05), 0.1);
    EXPECT_EQ(exclusionOf(twoApart, chains, masked, 0.05), 0.0);
    // Version 6 (nearest 3): a residue two apart no longer counts, unless a chain break lies between; three apart does.
    EXPECT_EQ(GeometryPrior::exclusionNearest(5), 2);
    EXPECT_EQ(GeometryPrior::exclusionNearest(6), 3);
    EXPECT_EQ(exclusionOf(twoApart, chains, real, 0.05, 3), 0.0);
    torch::Tensor breakBetween = torch::tensor({0, 0, 1, 1}, torch::kInt64).view({1, 4});
    EXPECT_NEAR(exclusionOf(twoApart, breakBetween, real, 0.05, 3), exclusionClosedForm(0.25, 0.05), 1e-9);
    torch::Tensor threeApart = farResidues();
    threeApart[0][3][0][0] = 0.25, threeApart[0][3][0][1] = 0.0;
    EXPECT_NEAR(exclusionOf(threeApart, chains, real, 0.05, 3), exclusionClosedForm(0.25, 0.05), 1e-9);
    EXPECT_THROW(exclusionOf(threeApart, chains, real, 0.05, 1), std::invalid_argument);
    // Gradients against central differences, inside and outside the wall, with every atom near others.
    for (double sigma : {0.01, 0.05, 0.3}) {
        torch::Tensor atoms = helixAtoms(5, 11);
        atoms[0][3] = atoms[0][0] + torch::tensor({0.2, 0.05, 0.1}, torch::kFloat64); // residue 3 onto residue 0
        torch::Tensor x = atoms.clone().requires_grad_(true);
        torch::Tensor c = torch::zeros({1, 5}, torch::kInt64), m = torch::ones({1, 5}, torch::kBool);
        torch::Tensor g =
            torch::autograd::grad({GeometryPrior::exclusionEnergy(x, c, m, torch::full({1}, sigma, torch::kFloat64), 2, evaluation).sum()}, {x})[0];
        EXPECT_TRUE(torch::isfinite(g).all().item<bool>());
        double worst = 0, scale = g.abs().max().item<double>();
        ASSERT_GT(scale, 0.0);
        const double h = 1e-7;
        for (int64_t k = 0; k < atoms.numel(); k++) {
            torch::Tensor plus = atoms.clone(), minus = atoms.clone();
            plus.view({-1})[k] += h;
            minus.view({-1})[k] -= h;
            const double numeric = (exclusionOf(plus, c, m, sigma) - exclusionOf(minus, c, m, sigma)) / (2 * h);
            worst = std::max(worst, std::abs(numeric - g.view({-1})[k].item<double>()));
        }
        EXPECT_LT(worst, 1e-5 * scale) << "sigma " << sigma;
    }
}

} // namespace

TEST(GeometryPrior, ExclusionIsTheNoisedPairMarginalOfNonNeighbours) {
    for (auto evaluation : {GeometryPrior::ExclusionEvaluation::Pairwise, GeometryPrior::ExclusionEvaluation::Tensors}) {
        SCOPED_TRACE(evaluation == GeometryPrior::ExclusionEvaluation::Pairwise ? "pairwise" : "tensors");
        expectExclusionIsTheNoisedPairMarginal(evaluation);
    }
}

TEST(GeometryPrior, ExclusionInBlocksEqualsTheDenseEvaluation) {
    // Two structures of 12 residues, squeezed along the helix axis so that residues i and i + 3 and i + 4 come
    // within the wall, with a chain break, a masked residue and a different sigma each; blocks of one row (blockPairs
    // below B N) and of several rows against the dense evaluation: energy, both first derivatives (atoms, sigma)
    // and the second derivative (a Hessian-vector product through the recomputed backward). On the GPU too where
    // there is one (the force path at thousands of residues runs the blocks there).
    const int L = 12;
    std::vector<torch::Device> devices = {torch::kCPU};
    if (torch::cuda::is_available())
        devices.push_back(torch::Device(torch::kCUDA, 0));
    for (const torch::Device& device : devices) {
        auto on = torch::TensorOptions().device(device);
        torch::Tensor atoms = torch::cat({helixAtoms(L, 21), helixAtoms(L, 22)}, 0);
        atoms.select(-1, 2).mul_(0.45);
        atoms = atoms.to(device);
        torch::Tensor chains = torch::zeros({2, L}, torch::kInt64);
        chains[1].slice(0, 7).fill_(1);
        chains = chains.to(device);
        torch::Tensor real = torch::ones({2, L}, torch::kBool);
        real[0][5] = false;
        real = real.to(device);
        torch::Tensor sigmaValues = torch::tensor({0.02, 0.15}, torch::kFloat64).to(device);
        torch::manual_seed(4);
        torch::Tensor direction = torch::randn(atoms.sizes(), torch::kFloat64).to(device);
        torch::Tensor weights = torch::tensor({1.0, 0.7}, torch::kFloat64).to(device);
        auto evaluate = [&](int64_t nearest, int64_t densePairs, int64_t blockPairs) {
            torch::Tensor x = atoms.clone().requires_grad_(true), sigma = sigmaValues.clone().requires_grad_(true);
            torch::Tensor e = GeometryPrior::exclusionEnergy(x, chains, real, sigma, nearest, GeometryPrior::ExclusionEvaluation::Tensors,
                                                              densePairs, blockPairs);
            auto g = torch::autograd::grad({(e * weights).sum()}, {x, sigma}, {}, true, true);
            torch::Tensor hv = torch::autograd::grad({(g[0] * direction).sum()}, {x})[0];
            return std::vector<torch::Tensor>{e.detach(), g[0].detach(), g[1].detach(), hv};
        };
        for (int64_t nearest : {2, 3}) {
            const auto dense = evaluate(nearest, GeometryPrior::ExclusionDensePairs, GeometryPrior::ExclusionBlockPairs);
            ASSERT_GT(dense[0].min().item<double>(), 1.0) << device; // the wall is felt in both structures
            const int64_t N = 3 * L;
            for (int64_t blockPairs : {int64_t(1), 2 * N * 5}) {
                const auto blocked = evaluate(nearest, 0, blockPairs);
                for (size_t k = 0; k < dense.size(); k++) {
                    const double scale = dense[k].abs().max().item<double>();
                    EXPECT_LT((blocked[k] - dense[k]).abs().max().item<double>(), 1e-12 * scale)
                        << device << " quantity " << k << " blockPairs " << blockPairs << " nearest " << nearest;
                }
            }
        }
    }
}

TEST(GeometryPrior, PairwiseExclusionEqualsTheTensorEvaluation) {
    // The pairwise evaluation (CPU loop; the GPU kernel where there is a GPU) against the Tensors evaluation in
    // float64: energy, first derivatives with and without create_graph, and a Hessian-vector product through the
    // pairwise gradient's own node. Structures: two squeezed 12-residue helices (pairs inside the wall, a chain
    // break, a masked residue; sigma 0.02 and 0.15 nm), and three compact random chains of 150 residues (450 atoms:
    // several of the kernel's 128-atom tiles, partner ranges split across blocks) at sigma 0.01, 0.3 and 1.5 nm
    // (at 1.5 nm no pair is beyond the cut-off of 12 spreads). In float32 the same against the float64 Tensors
    // evaluation.
    std::vector<torch::Device> devices = {torch::kCPU};
    if (torch::cuda::is_available())
        devices.push_back(torch::Device(torch::kCUDA, 0));
    torch::Tensor helices = torch::cat({helixAtoms(12, 21), helixAtoms(12, 22)}, 0);
    helices.select(-1, 2).mul_(0.45);
    torch::Tensor helixChains = torch::zeros({2, 12}, torch::kInt64), helixReal = torch::ones({2, 12}, torch::kBool);
    helixChains[1].slice(0, 7).fill_(1);
    helixReal[0][5] = false;
    torch::manual_seed(11);
    const int64_t L = 150;
    torch::Tensor steps = torch::randn({3, L, 1, 3}, torch::kFloat64);
    steps = 0.38 * steps / steps.norm(2, -1, true);
    torch::Tensor walk = torch::cumsum(steps, 1);
    walk = 0.55 * walk; // compact: residues come within the wall
    torch::Tensor chainsWalk = torch::zeros({3, L}, torch::kInt64), realWalk = torch::ones({3, L}, torch::kBool);
    chainsWalk[2].slice(0, 90).fill_(1);
    realWalk[1].slice(0, 40, 45).fill_(false);
    torch::Tensor walkAtoms = walk + 0.12 * torch::randn({3, L, 3, 3}, torch::kFloat64);
    struct Case {
        torch::Tensor atoms, chains, real, sigma;
    };
    const std::vector<Case> cases = {{helices, helixChains, helixReal, torch::tensor({0.02, 0.15}, torch::kFloat64)},
                                     {walkAtoms, chainsWalk, realWalk, torch::tensor({0.01, 0.3, 1.5}, torch::kFloat64)}};
    using Evaluation = GeometryPrior::ExclusionEvaluation;
    for (const torch::Device& device : devices)
        for (size_t c = 0; c < cases.size(); c++)
            for (int64_t nearest : {2, 3}) {
                const Case& k = cases[c];
                auto on = [&](const torch::Tensor& t) { return t.to(device); };
                torch::manual_seed(5);
                torch::Tensor direction = on(torch::randn(k.atoms.sizes(), torch::kFloat64));
                torch::Tensor weights = on(torch::linspace(1.0, 0.5, k.sigma.size(0), torch::kFloat64));
                auto evaluate = [&](Evaluation evaluation, torch::Dtype dtype, bool createGraph) {
                    torch::Tensor x = on(k.atoms).to(dtype).requires_grad_(true), sigma = on(k.sigma).to(dtype).requires_grad_(true);
                    torch::Tensor e = GeometryPrior::exclusionEnergy(x, on(k.chains), on(k.real), sigma, nearest, evaluation);
                    auto g = torch::autograd::grad({(e * weights.to(dtype)).sum()}, {x, sigma}, {}, createGraph, createGraph);
                    std::vector<torch::Tensor> out = {e.detach(), g[0].detach(), g[1].detach()};
                    if (createGraph)
                        out.push_back(torch::autograd::grad({(g[0] * direction.to(dtype)).sum()}, {x})[0]);
                    return out;
                };
                const auto oracle = evaluate(Evaluation::Tensors, torch::kFloat64, true);
                ASSERT_GT(oracle[0].min().item<double>(), 0.5) << device; // every structure feels the wall
                const char* names[] = {"energy", "d/dx", "d/dsigma", "Hessian-vector"};
                for (bool createGraph : {false, true}) {
                    const auto pairwise = evaluate(Evaluation::Pairwise, torch::kFloat64, createGraph);
                    for (size_t q = 0; q < pairwise.size(); q++) {
                        const double scale = oracle[q].abs().max().item<double>();
                        EXPECT_LT((pairwise[q] - oracle[q]).abs().max().item<double>(), 1e-11 * scale)
                            << device << " case " << c << " nearest " << nearest << " " << names[q] << " create_graph " << createGraph;
                    }
                }
                const auto single = evaluate(Evaluation::Pairwise, torch::kFloat32, false);
                for (size_t q = 0; q < single.size(); q++) {
                    const double scale = oracle[q].abs().max().item<double>();
                    EXPECT_LT((single[q].to(torch::kFloat64) - oracle[q]).abs().max().item<double>(), 2e-5 * scale)
                        << device << " float32 case " << c << " nearest " << nearest << " " << names[q];
                }
            }
}

TEST(GeometryPrior, BondSystemSolveEqualsADenseSolve) {
    // Rows of different segmentations (absent slots split a row into independent paths), sigma per row, and
    // lengths that are and are not powers of two; the oracle is torch's dense solver on the same matrix.
    torch::manual_seed(7);
    for (int64_t M : {1, 2, 7, 16, 45}) {
        const int64_t B = 3;
        torch::Tensor bonds = torch::randn({B, M, 3}, torch::kFloat64);
        torch::Tensor present = torch::rand({B, M}, torch::kFloat64) > 0.2;
        present[0].fill_(true);
        torch::Tensor sigma2 = torch::tensor({0.0001, 0.09, 4.0}, torch::kFloat64), a = torch::full({B}, 0.007, torch::kFloat64);
        torch::Tensor y = GeometryPrior::solveBondSystem(bonds, present, a + 2 * sigma2, sigma2);
        for (int64_t b = 0; b < B; b++) {
            torch::Tensor K = torch::eye(M, torch::kFloat64);
            for (int64_t j = 0; j < M; j++) {
                if (!present[b][j].item<bool>())
                    continue;
                K[j][j] = a[b] + 2 * sigma2[b];
                if (j > 0 && present[b][j - 1].item<bool>())
                    K[j][j - 1] = -sigma2[b], K[j - 1][j] = -sigma2[b];
            }
            torch::Tensor rhs = bonds[b] * present[b].to(torch::kFloat64).unsqueeze(-1);
            torch::Tensor want = torch::linalg_solve(K, rhs, true) * present[b].to(torch::kFloat64).unsqueeze(-1);
            EXPECT_LT((y[b] - want).abs().max().item<double>(), 1e-10 * std::max(1.0, want.abs().max().item<double>()))
                << "M " << M << " row " << b;
        }
    }
}

TEST(GeometryPrior, BackboneChainTermIsTheModeCorrectionOfAGaussianChain) {
    // One protein chain of L residues (a path of 3L atoms): the chain term against its definition in normal
    // modes, sum_k [lambda_k / (a + lambda_k sigma^2) - lambda_k / (a + 2 sigma^2)] |m_k|^2 / 2, with the
    // modes m_k of the path from the Laplacian's eigenvectors (torch's eigensolver, not the bond solve).
    const int L = 9, n = 3 * L;
    torch::Tensor atoms = helixAtoms(L, 4);
    StructureBatch batch;
    batch.types = torch::zeros({1, L}, torch::kInt64);
    batch.chains = torch::zeros({1, L}, torch::kInt64);
    const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
    torch::Tensor stats = torch::stack({torch::tensor({0.146, 0.152, 0.133, 0.152, 0.145}, torch::kFloat64), torch::full({K}, 0.001, torch::kFloat64)}, 1);
    const double a = (0.146 * 0.146 + 0.152 * 0.152 + 0.133 * 0.133) / 9.0;
    torch::Tensor laplacian = torch::zeros({n, n}, torch::kFloat64);
    for (int i = 0; i + 1 < n; i++) {
        laplacian[i][i] += 1.0, laplacian[i + 1][i + 1] += 1.0;
        laplacian[i][i + 1] = -1.0, laplacian[i + 1][i] = -1.0;
    }
    auto [lambda, vectors] = torch::linalg_eigh(laplacian, "L");
    torch::Tensor modes = vectors.t().matmul(atoms.reshape({n, 3})); // [n, 3]
    torch::Tensor real = torch::ones({1, L}, torch::kBool);
    for (double sigma : {0.01, 0.1, 0.5, 2.0}) {
        const double b = sigma * sigma;
        const double want = 0.5 * ((lambda / (a + lambda * b) - lambda / (a + 2 * b)).unsqueeze(-1) * modes.pow(2)).sum().item<double>();
        const double got = GeometryPrior::backboneChainEnergy(atoms, batch.types, batch.chains, real, torch::full({1}, sigma, torch::kFloat64), stats)
                               .item<double>();
        EXPECT_NEAR(got, want, 1e-9 * std::max(1.0, std::abs(want))) << "sigma " << sigma;
    }
    // Two chains (ids differ) are two paths: the term is the sum of each chain's own.
    batch.chains = torch::tensor({0, 0, 0, 0, 1, 1, 1, 1, 1}, torch::kInt64).view({1, L});
    torch::Tensor sigma = torch::full({1}, 0.7, torch::kFloat64);
    const double both = GeometryPrior::backboneChainEnergy(atoms, batch.types, batch.chains, real, sigma, stats).item<double>();
    auto part = [&](int64_t start, int64_t length) {
        torch::Tensor zeros = torch::zeros({1, length}, torch::kInt64);
        return GeometryPrior::backboneChainEnergy(atoms.narrow(1, start, length), zeros, zeros, torch::ones({1, length}, torch::kBool), sigma, stats)
            .item<double>();
    };
    EXPECT_NEAR(both, part(0, 4) + part(4, 5), 1e-9 * std::abs(both));
    // RNA residues take no part.
    batch.types = torch::full({1, L}, (int64_t) ResidueType::FirstNucleotide, torch::kInt64);
    EXPECT_EQ(GeometryPrior::backboneChainEnergy(atoms, batch.types, batch.chains, real, sigma, stats).item<double>(), 0.0);
}

namespace {

/** A random symmetric positive definite block-tridiagonal system: diagonal and upper blocks [B, L, 3, 3]. */
std::pair<torch::Tensor, torch::Tensor> randomBlockSystem(int64_t B, int64_t L) {
    torch::Tensor m = torch::randn({B, L, 3, 3}, torch::kFloat64);
    torch::Tensor upper = 0.4 * torch::randn({B, L, 3, 3}, torch::kFloat64);
    // Diagonal dominance by more than the two coupling blocks' row sums makes the whole matrix positive definite.
    torch::Tensor diagonal = torch::matmul(m, m.transpose(-1, -2)) + 4.0 * torch::eye(3, torch::kFloat64);
    return {diagonal, upper};
}

/** The dense [3L, 3L] matrix of a block-tridiagonal system (row b of the batch). */
torch::Tensor denseBlockMatrix(const torch::Tensor& diagonal, const torch::Tensor& upper, int64_t b) {
    const int64_t L = diagonal.size(1);
    torch::Tensor K = torch::zeros({3 * L, 3 * L}, torch::kFloat64);
    for (int64_t i = 0; i < L; i++) {
        K.narrow(0, 3 * i, 3).narrow(1, 3 * i, 3).copy_(diagonal[b][i]);
        if (i + 1 < L) {
            K.narrow(0, 3 * i, 3).narrow(1, 3 * i + 3, 3).copy_(upper[b][i]);
            K.narrow(0, 3 * i + 3, 3).narrow(1, 3 * i, 3).copy_(upper[b][i].t());
        }
    }
    return K;
}

/**
 * Version 4's chain term of row b from its definition with dense matrices: the present bond slots of the
 * backbone path (protein residues, links inside a chain), C_g + sigma^2 T over them with couplings only inside
 * unbroken stretches, torch's dense solver.
 */
double denseCorrelatedChainEnergy(const torch::Tensor& atoms, const torch::Tensor& types, const torch::Tensor& chains,
                                  const torch::Tensor& real, double sigma, double c0, double c1, double c2) {
    const int64_t L = atoms.size(1), M = 3 * L - 1;
    torch::Tensor path = atoms[0].reshape({3 * L, 3});
    std::vector<bool> present(M + 2, false);
    for (int64_t i = 0; i < L; i++) {
        const bool protein = real[0][i].item<bool>() && types[0][i].item<int64_t>() < ResidueType::FirstNucleotide;
        present[3 * i] = present[3 * i + 1] = protein;
        if (i + 1 < L)
            present[3 * i + 2] = protein && real[0][i + 1].item<bool>() && types[0][i + 1].item<int64_t>() < ResidueType::FirstNucleotide &&
                                 chains[0][i].item<int64_t>() == chains[0][i + 1].item<int64_t>();
    }
    std::vector<int64_t> slots;
    for (int64_t j = 0; j < M; j++)
        if (present[j])
            slots.push_back(j);
    const int64_t n = (int64_t) slots.size();
    if (n == 0)
        return 0.0;
    torch::Tensor K = torch::zeros({n, n}, torch::kFloat64), b = torch::zeros({n, 3}, torch::kFloat64);
    const double s2 = sigma * sigma;
    const double g = s2 / (s2 + 0.05 * 0.05); // the correlations' fade-in (CorrelationFadeSigma = 0.05 nm)
    for (int64_t u = 0; u < n; u++) {
        const int64_t j = slots[u];
        b[u] = path[j + 1] - path[j];
        for (int64_t v = 0; v < n; v++) {
            const int64_t k = slots[v], lag = std::abs(k - j);
            bool unbroken = true;
            for (int64_t m = std::min(j, k); m <= std::max(j, k); m++)
                unbroken = unbroken && present[m];
            if (!unbroken)
                continue;
            const double value = lag == 0 ? c0 + 2 * s2 : lag == 1 ? g * c1 - s2 : lag == 2 ? g * c2 : 0.0;
            K[u][v] = value;
        }
    }
    torch::Tensor y = torch::linalg_solve(K, b, true);
    return 0.5 * ((y * b).sum().item<double>() - b.pow(2).sum().item<double>() / (c0 + 2 * s2));
}

} // namespace

TEST(GeometryPrior, BlockTridiagonalSolveEqualsADenseSolve) {
    // Lengths that are and are not powers of two, several right-hand-side columns; the oracle is torch's
    // dense solver on the assembled matrix. The last upper block is ignored (nothing follows it).
    torch::manual_seed(11);
    for (int64_t L : {1, 2, 3, 7, 16, 33}) {
        const int64_t B = 2;
        auto [diagonal, upper] = randomBlockSystem(B, L);
        torch::Tensor rhs = torch::randn({B, L, 3, 2}, torch::kFloat64);
        torch::Tensor y = GeometryPrior::solveBlockTridiagonal(diagonal, upper, rhs);
        for (int64_t b = 0; b < B; b++) {
            torch::Tensor want = torch::linalg_solve(denseBlockMatrix(diagonal, upper, b), rhs[b].reshape({3 * L, 2}), true);
            EXPECT_LT((y[b].reshape({3 * L, 2}) - want).abs().max().item<double>(), 1e-10 * std::max(1.0, want.abs().max().item<double>()))
                << "L " << L << " row " << b;
        }
    }
}

TEST(GeometryPrior, CorrelatedChainTermIsTheDenseGaussianEnergy) {
    // A protein chain with a break (chain ids), an RNA residue and a padding residue inside it: the block solve
    // against the dense definition at small and large sigma, with the covariances measured on the training
    // split (docs/MODEL.md) and with stronger ones near the positive-definite limit.
    const int L = 14;
    torch::Tensor atoms = helixAtoms(L, 5);
    torch::Tensor types = torch::zeros({1, L}, torch::kInt64), chains = torch::zeros({1, L}, torch::kInt64);
    torch::Tensor real = torch::ones({1, L}, torch::kBool);
    for (int i = 6; i < L; i++)
        chains[0][i] = 1;
    types[0][9] = ResidueType::FirstNucleotide;
    real[0][12] = false;
    const double c0 = 0.00692;
    for (auto [r1, r2] : std::vector<std::pair<double, double>>{{0.436, 0.442}, {0.6, 0.2}, {0.0, 0.0}}) {
        const double c1 = r1 * c0, c2 = r2 * c0;
        ASSERT_GT(GeometryPrior::bondSpectrumMinimum(c0, c1, c2), 0.0);
        torch::Tensor covariance = torch::tensor({c0, c1, c2}, torch::kFloat64);
        for (double sigma : {0.0, 0.01, 0.1, 0.5, 2.0}) {
            const double want = denseCorrelatedChainEnergy(atoms, types, chains, real, sigma, c0, c1, c2);
            const double got =
                GeometryPrior::correlatedChainEnergy(atoms, types, chains, real, torch::full({1}, sigma, torch::kFloat64), covariance).item<double>();
            EXPECT_NEAR(got, want, 1e-9 * std::max(1.0, std::abs(want))) << "c1/c0 " << r1 << " sigma " << sigma;
        }
    }
    // Without correlations it is version 3's term with a = c0 (an independent implementation: the scalar solve).
    const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
    torch::Tensor stats = torch::stack({torch::full({K}, std::sqrt(3.0 * c0), torch::kFloat64), torch::full({K}, 0.004, torch::kFloat64)}, 1);
    for (double sigma : {0.05, 0.8}) {
        torch::Tensor s = torch::full({1}, sigma, torch::kFloat64);
        const double three = GeometryPrior::backboneChainEnergy(atoms, types, chains, real, s, stats).item<double>();
        const double four = GeometryPrior::correlatedChainEnergy(atoms, types, chains, real, s, torch::tensor({c0, 0.0, 0.0}, torch::kFloat64))
                                .item<double>();
        EXPECT_NEAR(four, three, 1e-9 * std::max(1.0, std::abs(three))) << sigma;
    }
    // A batch of two rows equals each row alone; with sigma per row.
    torch::Tensor covariance = torch::tensor({c0, 0.436 * c0, 0.442 * c0}, torch::kFloat64);
    torch::Tensor two = GeometryPrior::correlatedChainEnergy(torch::cat({atoms, helixAtoms(L, 6)}), types.repeat({2, 1}), chains.repeat({2, 1}),
                                                             real.repeat({2, 1}), torch::tensor({0.05, 1.0}, torch::kFloat64), covariance);
    EXPECT_NEAR(two[0].item<double>(), denseCorrelatedChainEnergy(atoms, types, chains, real, 0.05, c0, 0.436 * c0, 0.442 * c0), 1e-9);
    EXPECT_NEAR(two[1].item<double>(), denseCorrelatedChainEnergy(helixAtoms(L, 6), types, chains, real, 1.0, c0, 0.436 * c0, 0.442 * c0),
                1e-9 * std::max(1.0, std::abs(two[1].item<double>())));
}

TEST(GeometryPrior, BondSpectrumMinimumOfTheBandedCovariance) {
    // Against the smallest eigenvalue of a long chain's banded matrix (torch's eigensolver): finite sections
    // lie above the symbol's minimum and approach it.
    const int64_t M = 600;
    for (auto [c1, c2] : std::vector<std::pair<double, double>>{{0.436, 0.442}, {0.3, -0.1}, {-0.45, 0.0}, {0.2, 0.3}}) {
        torch::Tensor C = torch::eye(M, torch::kFloat64);
        for (int64_t j = 0; j + 1 < M; j++)
            C[j][j + 1] = C[j + 1][j] = c1;
        for (int64_t j = 0; j + 2 < M; j++)
            C[j][j + 2] = C[j + 2][j] = c2;
        const double smallest = std::get<0>(torch::linalg_eigh(C, "L"))[0].item<double>();
        const double symbol = GeometryPrior::bondSpectrumMinimum(1.0, c1, c2);
        EXPECT_GE(smallest, symbol - 1e-12) << c1 << " " << c2;
        EXPECT_NEAR(smallest, symbol, 2e-3) << c1 << " " << c2;
    }
}

TEST(GeometryPrior, CheckpointsCarryItAndOlderOnesLoadWithout) {
    ModelConfig config;
    config.geometryPrior = 1;
    EnergyModel model(config);
    const int64_t K = (int64_t) GeometryPrior::pairKinds().size();
    model->setGeometryPriorStats(torch::stack({torch::linspace(0.13, 0.4, K), torch::full({K}, 0.004)}, 1));
    const std::string path = "/tmp/flashipa_prior_" + std::to_string(getpid()) + ".safetensors";
    saveEnergyModel(model, path);
    EnergyModel loaded = loadEnergyModel(path);
    EXPECT_EQ(loaded->config().geometryPrior, 1);
    EXPECT_TRUE(torch::equal(loaded->geometryPriorStats, model->geometryPriorStats));
    // A checkpoint whose pair table differs from this build's is refused, naming the tensor.
    SafetensorsContents contents = Safetensors::read(path);
    std::vector<std::pair<std::string, torch::Tensor>> tensors(contents.tensors.begin(), contents.tensors.end());
    for (auto& [name, value] : tensors)
        if (name == "geometryPriorPairs")
            value = value.clone(), value[0][2] = 2.0;
    Safetensors::write(path, tensors, contents.metadata);
    try {
        loadEnergyModel(path);
        ADD_FAILURE() << "a changed pair table was accepted";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("geometryPriorPairs"), std::string::npos) << e.what();
    }
    // Metadata without the field (checkpoints written before it existed) reads as no prior.
    std::map<std::string, std::string> old = ModelConfig().toMetadata();
    old.erase("config.geometryPrior");
    EXPECT_EQ(ModelConfig::fromMetadata(old).geometryPrior, 0);
    // Version 4 carries its bond covariances; a file whose covariances are not positive definite is refused.
    config.geometryPrior = 4;
    EnergyModel four(config);
    four->setGeometryPriorStats(torch::stack({torch::linspace(0.13, 0.4, K), torch::full({K}, 0.004)}, 1));
    four->setGeometryPriorBondCovariance(torch::tensor({0.00692, 0.003, 0.003}, torch::kFloat64));
    saveEnergyModel(four, path);
    EnergyModel fourLoaded = loadEnergyModel(path);
    EXPECT_EQ(fourLoaded->config().geometryPrior, 4);
    EXPECT_TRUE(torch::equal(fourLoaded->geometryPriorBondCovariance, four->geometryPriorBondCovariance));
    contents = Safetensors::read(path);
    tensors.assign(contents.tensors.begin(), contents.tensors.end());
    for (auto& [name, value] : tensors)
        if (name == "geometryPriorBondCovariance")
            value = torch::tensor({0.007f, 0.007f, 0.007f});
    Safetensors::write(path, tensors, contents.metadata);
    try {
        loadEnergyModel(path);
        ADD_FAILURE() << "a covariance that is not positive definite was accepted";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("geometryPriorBondCovariance"), std::string::npos) << e.what();
    }
    unlink(path.c_str());
}
