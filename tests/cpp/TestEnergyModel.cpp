// FrameBuilder, the EnergyModel (invariance, backends, gradients) and its checkpoints.
#include "TestEnergyGradients.h"
#include "TestStructures.h"
#include "flashipa/Checkpoint.h"
#include "flashipa/EnergyModel.h"
#include "flashipa/ResidueTypes.h"
#include <gtest/gtest.h>
#include <unistd.h>

using namespace FlashIPAPlugin;
using namespace FlashIPATest;

namespace {

std::string tempPath(const std::string& name) {
    return "/tmp/flashipa_test_" + std::to_string(getpid()) + "_" + name;
}

StructureBatch mixedBatch(int L, unsigned seed) {
    // First half protein (types cycling through amino acids), second half an RNA chain.
    StructureBatch batch;
    batch.atoms = helixAtoms(L, seed);
    std::vector<int64_t> types, chains;
    for (int i = 0; i < L; i++) {
        bool rna = i >= L / 2;
        types.push_back(rna ? ResidueType::FirstNucleotide + i % 5 : i % 21);
        chains.push_back(rna ? 1 : 0);
    }
    batch.types = torch::tensor(types).view({1, L});
    batch.chains = torch::tensor(chains).view({1, L});
    return batch;
}

EnergyModel randomModel(uint64_t seed) {
    ModelConfig config;
    EnergyModel model(config);
    randomizeParameters(*model, seed, 0.5);
    model->to(torch::kFloat64);
    return model;
}

TEST(FrameBuilder, AnalyticFrame) {
    // a = (0, 1, 0), b = origin, c = (2, 0, 0): e1 = x, e2 = y, e3 = z.
    torch::Tensor atoms = torch::tensor({0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0}, torch::kFloat64).view({1, 3, 3});
    Frames f = FrameBuilder::build(atoms);
    EXPECT_LT((f.rotations[0] - torch::eye(3, torch::kFloat64)).abs().max().item<double>(), 1e-15);
    // Tilted a: e2 is the part of (a - b) orthogonal to e1, normalised.
    atoms = torch::tensor({1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 3.0}, torch::kFloat64).view({1, 3, 3});
    f = FrameBuilder::build(atoms);
    torch::Tensor expected = torch::tensor({0.0, 0.0, -1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0}, torch::kFloat64).view({3, 3});
    EXPECT_LT((f.rotations[0] - expected).abs().max().item<double>(), 1e-15) << f.rotations[0];
    EXPECT_LT((f.translations[0] - torch::tensor({1.0, 0.0, 0.0}, torch::kFloat64)).abs().max().item<double>(), 1e-15);
    EXPECT_NEAR(torch::det(f.rotations[0]).item<double>(), 1.0, 1e-14);
}

TEST(FrameBuilder, DegenerateInputIsAnError) {
    auto expectMessage = [](std::vector<double> xyz, const std::string& text) {
        torch::Tensor good = helixAtoms(3, 1).squeeze(0);
        good[1] = torch::tensor(xyz, torch::kFloat64).view({3, 3});
        try {
            FrameBuilder::build(good);
            ADD_FAILURE() << "no exception for " << text;
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("residue 1"), std::string::npos) << e.what();
        }
    };
    expectMessage({0, 1, 0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5}, "coincident");
    expectMessage({0, 0, 0, 0, 0, 0, 1, 1, 1}, "collinear");
    expectMessage({0, 0, 0, 1, 0, 0, 2, 0, 0}, "collinear");
    expectMessage({NAN, 0, 0, 1, 0, 0, 2, 1, 0}, "non-finite");
    // Unchecked mode (generation): finite frames even for coincident atoms.
    torch::Tensor degenerate = torch::zeros({1, 3, 3}, torch::kFloat64);
    EXPECT_TRUE(torch::isfinite(FrameBuilder::build(degenerate, false).rotations).all().item<bool>());
}

TEST(EnergyModel, InvariantFarFromOrigin) {
    // E(R x + t) = E(x) with |t| = 100 nm, in double: <= 1e-6 relative; forces rotate with the structure.
    EnergyModel model = randomModel(1);
    StructureBatch batch = mixedBatch(40, 2);
    torch::Tensor sigma = torch::full({1}, 0.1, torch::kFloat64);
    torch::Tensor R = randomRotation(3);
    torch::Tensor shift = torch::tensor({100.0, -30.0, 50.0}, torch::kFloat64);
    shift = shift * (100.0 / shift.norm());
    for (AttentionBackend backend : {AttentionBackend::Math, AttentionBackend::SDPA}) {
        torch::Tensor x = batch.atoms.clone().requires_grad_(true);
        StructureBatch b1 = batch;
        b1.atoms = x;
        torch::Tensor e1 = model->forward(b1, sigma, backend).sum();
        torch::Tensor g1 = torch::autograd::grad({e1}, {x})[0];
        torch::Tensor y = (torch::matmul(batch.atoms, R.t()) + shift).detach().requires_grad_(true);
        StructureBatch b2 = batch;
        b2.atoms = y;
        torch::Tensor e2 = model->forward(b2, sigma, backend).sum();
        torch::Tensor g2 = torch::autograd::grad({e2}, {y})[0];
        EXPECT_LT(std::abs(e2.item<double>() - e1.item<double>()) / std::abs(e1.item<double>()), 1e-6) << attentionBackendName(backend);
        EXPECT_LT(relativeError(g2, torch::matmul(g1, R.t())), 1e-6) << attentionBackendName(backend);
        EXPECT_GT(g1.abs().max().item<double>(), 0.0);
    }
}

TEST(EnergyModel, BackendsAgreeAndSigmaMatters) {
    EnergyModel model = randomModel(4);
    StructureBatch batch = mixedBatch(30, 5);
    torch::Tensor sigma = torch::full({1}, 0.2, torch::kFloat64);
    double math = model->forward(batch, sigma, AttentionBackend::Math).item<double>();
    double sdpa = model->forward(batch, sigma, AttentionBackend::SDPA).item<double>();
    EXPECT_NEAR(sdpa, math, 1e-10 * std::abs(math));
    double other = model->forward(batch, torch::full({1}, 0.5, torch::kFloat64), AttentionBackend::SDPA).item<double>();
    EXPECT_GT(std::abs(other - sdpa), 1e-6 * std::abs(sdpa));
}

TEST(EnergyModel, GradientMatchesFiniteDifferences) {
    EnergyModel model = randomModel(6);
    StructureBatch batch = mixedBatch(12, 7);
    EXPECT_LT(energyGradientError(model, batch, torch::full({1}, 0.1, torch::kFloat64), 1e-5), 1e-4);
}

TEST(EnergyModel, MathPathSupportsDoubleBackward) {
    // Training differentiates sigma * grad E with respect to the parameters.
    EnergyModel model = randomModel(8);
    StructureBatch batch = mixedBatch(10, 9);
    torch::Tensor x = batch.atoms.clone().requires_grad_(true);
    batch.atoms = x;
    torch::Tensor e = model->forward(batch, torch::full({1}, 0.1, torch::kFloat64), AttentionBackend::Math).sum();
    torch::Tensor g = torch::autograd::grad({e}, {x}, {}, true, true)[0];
    torch::Tensor loss = g.pow(2).sum();
    auto parameterGradients = torch::autograd::grad({loss}, model->parameters(), {}, false, false, true);
    double total = 0;
    for (auto& p : parameterGradients)
        if (p.defined())
            total += p.abs().sum().item<double>();
    EXPECT_GT(total, 0.0);
}

TEST(EnergyModel, DenoisingObjectiveGradientMatchesFiniteDifferences) {
    // The training objective, sum (sigma dE/dx~ - eps)^2, differentiated with respect to the parameters through
    // the double backward of the math path, against central differences of the objective itself (float64),
    // for entries of every kind of parameter; with the geometry prior in the energy.
    ModelConfig config;
    config.nodeDim = 16, config.headDim = 8, config.numHeads = 2, config.queryPoints = 2, config.valuePoints = 2;
    config.pairRank = 1, config.pairDim = 8, config.relPosFrequencies = 1, config.numBlocks = 1, config.geometryPrior = 1;
    EnergyModel model(config);
    randomizeParameters(*model, 12, 0.5);
    const int64_t K = model->geometryPriorStats.size(0);
    model->setGeometryPriorStats(torch::stack({torch::full({K}, 0.15), torch::full({K}, 0.01)}, 1));
    model->to(torch::kFloat64);
    StructureBatch batch = mixedBatch(8, 13);
    torch::manual_seed(3);
    torch::Tensor eps = torch::randn_like(batch.atoms);
    torch::Tensor sigma = torch::full({1}, 0.05, torch::kFloat64);
    batch.atoms = batch.atoms + 0.05 * eps;
    auto objective = [&](bool createGraph) {
        torch::Tensor x = batch.atoms.detach().clone().requires_grad_(true);
        StructureBatch b = batch;
        b.atoms = x;
        torch::Tensor e = model->forward(b, sigma, AttentionBackend::Math).sum();
        torch::Tensor g = torch::autograd::grad({e}, {x}, {}, createGraph, createGraph)[0];
        return (sigma * g - eps).pow(2).sum();
    };
    std::vector<std::pair<std::string, torch::Tensor>> trainable;
    for (auto& item : model->named_parameters())
        if (item.value().requires_grad())
            trainable.emplace_back(item.key(), item.value());
    std::vector<torch::Tensor> tensors;
    for (auto& [name, value] : trainable)
        tensors.push_back(value);
    auto gradients = torch::autograd::grad({objective(true)}, tensors, {}, false, false, true);
    int checked = 0;
    for (size_t i = 0; i < trainable.size(); i += 3) { // every third tensor, its first and last entry
        auto& [name, value] = trainable[i];
        for (int64_t index : {(int64_t) 0, value.numel() - 1}) {
            const double analytic = gradients[i].defined() ? gradients[i].reshape({-1})[index].item<double>() : 0.0;
            const double h = 1e-5;
            double plus, minus;
            {
                torch::NoGradGuard noGrad;
                value.view({-1})[index] += h;
            }
            plus = objective(false).item<double>();
            {
                torch::NoGradGuard noGrad;
                value.view({-1})[index] -= 2 * h;
            }
            minus = objective(false).item<double>();
            {
                torch::NoGradGuard noGrad;
                value.view({-1})[index] += h;
            }
            const double numeric = (plus - minus) / (2 * h);
            EXPECT_NEAR(analytic, numeric, 1e-5 * std::max(1.0, std::abs(numeric))) << name << "[" << index << "]";
            checked++;
        }
    }
    EXPECT_GT(checked, 10);
}

TEST(EnergyModel, RejectsBadInput) {
    EnergyModel model = randomModel(1);
    StructureBatch batch = mixedBatch(6, 1);
    torch::Tensor sigma = torch::full({1}, 0.1, torch::kFloat64);
    StructureBatch badType = batch;
    badType.types = batch.types.clone();
    badType.types[0][2] = 99;
    EXPECT_THROW(model->forward(badType, sigma, AttentionBackend::SDPA), std::invalid_argument);
    EXPECT_THROW(model->forward(batch, torch::full({1}, 0.0, torch::kFloat64), AttentionBackend::SDPA), std::invalid_argument);
    StructureBatch nan = batch;
    nan.atoms = batch.atoms.clone();
    nan.atoms[0][3][1][0] = NAN;
    EXPECT_THROW(model->forward(nan, sigma, AttentionBackend::SDPA), std::invalid_argument);
}

TEST(ModelConfig, MetadataRoundTripAndValidation) {
    ModelConfig config;
    config.numBlocks = 3;
    config.pairRank = 5;
    config.sigmaMax = 1.25;
    ModelConfig back = ModelConfig::fromMetadata(config.toMetadata());
    EXPECT_EQ(back.toMetadata(), config.toMetadata());
    auto metadata = config.toMetadata();
    metadata["config.numHeads"] = "four";
    EXPECT_THROW(ModelConfig::fromMetadata(metadata), std::invalid_argument);
    metadata = config.toMetadata();
    metadata.erase("config.headDim");
    EXPECT_THROW(ModelConfig::fromMetadata(metadata), std::invalid_argument);
    metadata = config.toMetadata();
    metadata["config.numHeads"] = "0";
    EXPECT_THROW(ModelConfig::fromMetadata(metadata), std::invalid_argument);
}

TEST(ModelConfig, ParameterCountMatchesTheBuiltModel) {
    std::vector<ModelConfig> configs(4);
    configs[1].pairRank = 0;
    configs[1].relPosFrequencies = 0;
    configs[2].nodeDim = 48;
    configs[2].numHeads = 3;
    configs[2].headDim = 8;
    configs[2].valuePoints = 5;
    configs[2].pairDim = 12;
    configs[2].numBlocks = 3;
    configs[3].transitionFactor = 4;
    configs[3].sigmaFeatures = 5;
    configs[3].queryPoints = 7;
    for (const ModelConfig& config : configs) {
        EnergyModel model(config);
        int64_t built = 0;
        for (const auto& item : model->named_parameters())
            built += item.value().numel();
        EXPECT_EQ(EnergyModelImpl::parameterCount(config), built) << config.nodeDim << " " << config.pairRank;
    }
}

TEST(Checkpoint, EnergyModelRoundTrip) {
    EnergyModel model = randomModel(10);
    model->to(torch::kFloat32);
    const std::string path = tempPath("roundtrip.safetensors");
    saveEnergyModel(model, path, {{"note", "test"}});
    std::map<std::string, std::string> metadata;
    EnergyModel loaded = loadEnergyModel(path, &metadata);
    EXPECT_EQ(metadata["note"], "test");
    EXPECT_EQ(metadata["units.length"], "nm");
    auto a = model->named_parameters(), b = loaded->named_parameters();
    ASSERT_EQ(a.size(), b.size());
    for (const auto& item : a)
        EXPECT_TRUE(torch::equal(item.value(), b[item.key()])) << item.key();
    unlink(path.c_str());
}

TEST(Checkpoint, RejectsWrongShapeDtypeAndNames) {
    EnergyModel model = randomModel(11);
    const std::string good = tempPath("good.safetensors");
    saveEnergyModel(model, good);
    SafetensorsContents contents = Safetensors::read(good);
    auto rewriteAndExpect = [&](std::function<void(SafetensorsContents&)> edit, const std::string& text) {
        SafetensorsContents copy = contents;
        edit(copy);
        const std::string bad = tempPath("bad.safetensors");
        Safetensors::write(bad, copy.tensors, copy.metadata);
        try {
            loadEnergyModel(bad);
            ADD_FAILURE() << "accepted a checkpoint with " << text;
        } catch (const std::runtime_error& e) {
            EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
        }
        unlink(bad.c_str());
    };
    rewriteAndExpect([](SafetensorsContents& c) { c.tensors[0].second = c.tensors[0].second.reshape({1, -1, 1}); }, "has shape");
    rewriteAndExpect([](SafetensorsContents& c) { c.tensors[0].second = c.tensors[0].second.to(torch::kInt32); }, "has dtype");
    rewriteAndExpect([](SafetensorsContents& c) { c.tensors.back().first = "renamed"; }, "missing tensor");
    rewriteAndExpect([](SafetensorsContents& c) { c.tensors.emplace_back("extra", torch::zeros({0})); }, "unexpected tensor");
    // Sizes are compared before anything is allocated: a header asking for a huge model fails at once.
    rewriteAndExpect([](SafetensorsContents& c) { c.tensors.pop_back(); }, "parameters but the file stores");
    rewriteAndExpect([](SafetensorsContents& c) { c.metadata["config.numBlocks"] = "100"; }, "parameters but the file stores");
    rewriteAndExpect([](SafetensorsContents& c) { c.metadata["config.numBlocks"] = "1000000000"; }, "must lie in [1, 128]");
    rewriteAndExpect([](SafetensorsContents& c) { c.metadata["config.nodeDim"] = "2147483647"; }, "must lie in");
    rewriteAndExpect([](SafetensorsContents& c) { c.metadata.erase("config.nodeDim"); }, "config.nodeDim");
    rewriteAndExpect([](SafetensorsContents& c) { c.metadata["format"] = "pickle"; }, "not an openmm-flashipa energy model");
    rewriteAndExpect([](SafetensorsContents& c) { c.tensors[1].second = torch::full_like(c.tensors[1].second, NAN); }, "non-finite");
    unlink(good.c_str());
}

} // namespace
