// The training dataset (loading, validation, sampling) and the denoising-score-matching Trainer
// (loss decreases, determinism, exact resume, data parallel over threads standing in for processes), on a
// tiny synthetic dataset and a tiny model.
#include "TestStructures.h"
#include "flashipa/Checkpoint.h"
#include "flashipa/Dataset.h"
#include "flashipa/GeometryPriorStatistics.h"
#include "flashipa/ResidueTypes.h"
#include "flashipa/ThreadingDecoys.h"
#include "flashipa/Trainer.h"
#include <ATen/CPUGeneratorImpl.h>
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <gtest/gtest.h>
#include <numeric>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <ftw.h>
#include <unistd.h>

using namespace FlashIPAPlugin;
using namespace FlashIPATest;

namespace {

using TensorList = std::vector<std::pair<std::string, torch::Tensor>>;
using Metadata = std::map<std::string, std::string>;

// A temporary directory, removed with its contents at the end of the test.
struct TempDir {
    std::string path;
    TempDir() {
        char pattern[] = "/tmp/flashipa_trainer_XXXXXX";
        const char* dir = mkdtemp(pattern);
        if (!dir)
            throw std::runtime_error("mkdtemp failed");
        path = dir;
    }
    ~TempDir() {
        nftw(path.c_str(), [](const char* file, const struct stat*, int, struct FTW*) { return remove(file); }, 16,
             FTW_DEPTH | FTW_PHYS);
    }
    operator const std::string&() const { return path; }
};

struct SyntheticChain {
    int length;
    bool rna;
    int split;
    int breakAt; // first residue of a second segment (0: one segment)
};

// A small dataset in the file format of scripts/build_dataset.py: helical chains (protein and RNA,
// train and validation), one protein chain with a break. edit may change the tensors or the metadata.
std::string writeDataset(const std::string& dir, const std::string& name,
                         const std::function<void(TensorList&, Metadata&)>& edit = nullptr) {
    const std::vector<SyntheticChain> chains = {{40, false, 0, 0}, {28, false, 0, 14}, {22, false, 0, 0}, {18, true, 0, 0},
                                                {24, true, 0, 0},  {26, false, 1, 0},  {16, true, 1, 0}};
    std::vector<torch::Tensor> atoms;
    std::vector<int64_t> types, segment, offsets = {0};
    std::vector<uint8_t> isRna, split;
    unsigned seed = 11;
    for (const auto& c : chains) {
        atoms.push_back(helixAtoms(c.length, seed++, torch::kFloat32).squeeze(0));
        for (int i = 0; i < c.length; i++) {
            types.push_back(c.rna ? ResidueType::FirstNucleotide + i % 4 : i % 20);
            segment.push_back(c.breakAt > 0 && i >= c.breakAt ? 1 : 0);
        }
        offsets.push_back(offsets.back() + c.length);
        isRna.push_back(c.rna);
        split.push_back(c.split);
    }
    const int64_t N = offsets.back();
    TensorList tensors = {
        {"atoms", torch::cat(atoms, 0)},
        {"types", torch::tensor(types, torch::kInt64)},
        {"segment", torch::tensor(segment, torch::kInt64)},
        {"chain_offsets", torch::tensor(offsets, torch::kInt64)},
        {"is_rna", torch::tensor(std::vector<int64_t>(isRna.begin(), isRna.end())).to(torch::kUInt8)},
        {"split", torch::tensor(std::vector<int64_t>(split.begin(), split.end())).to(torch::kUInt8)},
        {"protein_O", torch::zeros({N, 3}, torch::kFloat32)},
    };
    Metadata metadata = {{"format", "openmm-flashipa-dataset"}, {"version", "1"}};
    if (edit)
        edit(tensors, metadata);
    std::string path = dir + "/" + name;
    Safetensors::write(path, tensors, metadata);
    return path;
}

ModelConfig tinyConfig() {
    ModelConfig c;
    c.nodeDim = 16;
    c.headDim = 8;
    c.numHeads = 2;
    c.queryPoints = 2;
    c.valuePoints = 2;
    c.pairRank = 1;
    c.pairDim = 8;
    c.relPosFrequencies = 2;
    c.numBlocks = 1;
    c.sigmaFeatures = 4;
    return c;
}

TrainerOptions tinyOptions(const std::string& data, const std::string& outDir, int64_t steps) {
    TrainerOptions o;
    o.datasetPath = data;
    o.outDir = outDir;
    o.model = tinyConfig();
    o.batchSize = 4;
    o.crop = 24;
    o.steps = steps;
    o.seed = 7;
    o.learningRate = 3e-3;
    o.warmupSteps = 5;
    o.validateEvery = 10;
    o.validationBatches = 2;
    o.checkpointEvery = 0;
    o.verbose = false;
    return o;
}

/** Options that resume the run in outDir with the checkpoint's settings (quiet, no checkpoint until the end). */
TrainerOptions resumeOptions(const std::string& outDir, int64_t validateEvery) {
    TrainerOptions o;
    o.outDir = outDir;
    o.resume = true;
    o.steps = 0; // the checkpoint's
    o.verbose = false;
    o.checkpointEvery = 0;
    o.validateEvery = validateEvery;
    return o;
}

/** The largest absolute difference between two lists of tensors. */
double maxDifference(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
    double worst = 0;
    for (size_t i = 0; i < a.size(); i++)
        worst = std::max(worst, (a[i].to(torch::kFloat64) - b[i].to(torch::kFloat64)).abs().max().item<double>());
    return worst;
}

void expectThrowsWith(const std::function<void()>& f, const std::string& text) {
    try {
        f();
        ADD_FAILURE() << "no exception; expected one mentioning '" << text << "'";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
}

std::vector<torch::Tensor> parameters(EnergyModel& model) {
    std::vector<torch::Tensor> out;
    for (auto& p : model->parameters())
        out.push_back(p.detach().clone());
    return out;
}

} // namespace

TEST(Dataset, LoadsAndSamplesCrops) {
    TempDir tmp;
    const std::string& dir = tmp.path;
    Dataset data(writeDataset(dir, "data.safetensors"));
    EXPECT_EQ(data.numChains(), 7);
    EXPECT_EQ(data.numResidues(), 40 + 28 + 22 + 18 + 24 + 26 + 16);
    EXPECT_EQ(data.chains(DatasetSplit::Train), (std::vector<int64_t>{0, 1, 2, 3, 4}));
    EXPECT_EQ(data.chains(DatasetSplit::Validation), (std::vector<int64_t>{5, 6}));
    EXPECT_TRUE(data.chainIsRna(3));

    auto gen = [](uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); };
    at::Generator g1 = gen(3), g2 = gen(3);
    StructureBatch a = data.sampleBatch(DatasetSplit::Train, 8, 20, g1);
    StructureBatch b = data.sampleBatch(DatasetSplit::Train, 8, 20, g2);
    ASSERT_EQ(a.atoms.dim(), 4);
    EXPECT_EQ(a.atoms.size(0), 8);
    EXPECT_LE(a.atoms.size(1), 20);
    EXPECT_TRUE(torch::equal(a.atoms, b.atoms) && torch::equal(a.types, b.types) && torch::equal(a.mask, b.mask));
    // Padding: chains -1, zero atoms; real residues have segment ids >= 0.
    EXPECT_TRUE(torch::equal(a.chains < 0, a.mask.logical_not()));
    EXPECT_EQ(a.atoms.masked_select(a.mask.logical_not().view({8, -1, 1, 1})).abs().sum().item<double>(), 0.0);
    // Crops are contiguous windows: consecutive CA distances stay those of the helix (< 0.5 nm).
    for (int i = 0; i < 8; i++) {
        int64_t n = a.mask[i].sum().item<int64_t>();
        torch::Tensor ca = a.atoms[i].narrow(0, 0, n).select(1, 1);
        if (n > 1)
            EXPECT_LT((ca.narrow(0, 1, n - 1) - ca.narrow(0, 0, n - 1)).norm(2, -1).max().item<double>(), 0.5);
    }
    // rnaProbability 1 (0): only RNA (protein) chains; validation draws only validation chains.
    at::Generator g3 = gen(4);
    StructureBatch rna = data.sampleBatch(DatasetSplit::Train, 16, 64, g3, 1.0);
    EXPECT_TRUE((rna.types.masked_select(rna.mask) >= ResidueType::FirstNucleotide).all().item<bool>());
    StructureBatch protein = data.sampleBatch(DatasetSplit::Train, 16, 64, g3, 0.0);
    EXPECT_TRUE((protein.types.masked_select(protein.mask) <= ResidueType::UnknownAminoAcid).all().item<bool>());
    // Uncropped chain 1 carries its break as a segment change.
    bool sawBreak = false;
    for (int i = 0; i < 16; i++)
        if (protein.mask[i].sum().item<int64_t>() == 28)
            sawBreak = sawBreak || protein.chains[i][14].item<int64_t>() == 1;
    EXPECT_TRUE(sawBreak);
    StructureBatch val = data.sampleBatch(DatasetSplit::Validation, 16, 64, g3);
    std::set<int64_t> lengths;
    for (int i = 0; i < 16; i++)
        lengths.insert(val.mask[i].sum().item<int64_t>());
    EXPECT_TRUE(std::all_of(lengths.begin(), lengths.end(), [](int64_t n) { return n == 26 || n == 16; }));
}

TEST(Dataset, ValidationErrors) {
    TempDir tmp;
    const std::string& dir = tmp.path;
    auto load = [&](const std::string& name, const std::function<void(TensorList&, Metadata&)>& edit) {
        std::string path = writeDataset(dir, name, edit);
        return [path]() { Dataset d(path); };
    };
    auto remove = [](TensorList& t, const std::string& name) {
        t.erase(std::remove_if(t.begin(), t.end(), [&](const auto& item) { return item.first == name; }), t.end());
    };
    auto replace = [](TensorList& t, const std::string& name, const torch::Tensor& value) {
        for (auto& item : t)
            if (item.first == name)
                item.second = value;
    };
    expectThrowsWith(load("format.st", [](TensorList&, Metadata& m) { m["format"] = "openmm-flashipa-energy-model"; }),
                     "metadata 'format' is 'openmm-flashipa-energy-model', expected 'openmm-flashipa-dataset'");
    expectThrowsWith(load("noformat.st", [](TensorList&, Metadata& m) { m.erase("format"); }), "metadata lacks 'format'");
    expectThrowsWith(load("version.st", [](TensorList&, Metadata& m) { m["version"] = "2"; }), "unsupported dataset version '2'");
    expectThrowsWith(load("notypes.st", [&](TensorList& t, Metadata&) { remove(t, "types"); }), "missing tensor 'types'");
    expectThrowsWith(load("noO.st", [&](TensorList& t, Metadata&) { remove(t, "protein_O"); }), "missing tensor 'protein_O'");
    expectThrowsWith(load("dtype.st", [&](TensorList& t, Metadata&) { replace(t, "atoms", t[0].second.to(torch::kFloat64)); }),
                     "tensor 'atoms' has dtype F64, expected F32");
    expectThrowsWith(load("offsets.st", [&](TensorList& t, Metadata&) { replace(t, "chain_offsets", torch::tensor({0L, 40L, 174L})); }),
                     "tensor 'is_rna' has shape");
    expectThrowsWith(load("end.st", [&](TensorList& t, Metadata&) {
                         torch::Tensor o = t[3].second.clone();
                         o[-1] = 100;
                         replace(t, "chain_offsets", o);
                     }),
                     "chain_offsets[7] = 100, expected the number of residues 174");
    expectThrowsWith(load("kind.st", [&](TensorList& t, Metadata&) {
                         torch::Tensor types = t[1].second.clone();
                         types[0] = ResidueType::FirstNucleotide; // protein chain 0
                         replace(t, "types", types);
                     }),
                     "expected an amino-acid type");
    expectThrowsWith(load("flag.st", [&](TensorList& t, Metadata&) {
                         torch::Tensor s = t[5].second.clone();
                         s[2] = 2;
                         replace(t, "split", s);
                     }),
                     "split[2] = 2");
    expectThrowsWith(load("nan.st", [&](TensorList& t, Metadata&) {
                         torch::Tensor a = t[0].second.clone();
                         a[45][1][0] = NAN;
                         replace(t, "atoms", a);
                     }),
                     "the first is residue 45 (chain 1, residue 5 of the chain)");
    expectThrowsWith([]() { Dataset d("/nonexistent/flashipa/data.safetensors"); }, "cannot read dataset");
}

TEST(Trainer, LossDecreases) {
    // 100 steps of a tiny model (seed 7, batch 8, lr 1e-2): the mean training loss of the last 5 steps
    // is below 0.85x that of the first 5 (observed 0.72 vs 0.98; the per-batch loss is noisy because
    // sigma is random), and the EMA model's loss on the fixed validation set falls below 0.9x its value at
    // step 0 (observed 0.98 -> 0.79).
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    TrainerOptions o = tinyOptions(data, dir + "/run", 100);
    o.batchSize = 8;
    o.learningRate = 1e-2;
    o.validateEvery = 100;
    Trainer trainer(o);
    ValidationResult before = trainer.validate();
    EXPECT_NEAR(before.baseline, 1.0, 0.1); // the zero predictor: ~1 per coordinate
    ASSERT_TRUE(trainer.run());
    const std::vector<double>& losses = trainer.losses();
    ASSERT_EQ(losses.size(), 100u);
    double first = std::accumulate(losses.begin(), losses.begin() + 5, 0.0) / 5;
    double last = std::accumulate(losses.end() - 5, losses.end(), 0.0) / 5;
    std::cout << "first 5: " << first << ", last 5: " << last << ", val " << before.loss << " -> " << trainer.validate().loss << "\n";
    EXPECT_LT(last, 0.85 * first);
    EXPECT_LT(trainer.validate().loss, 0.9 * before.loss);
    // The exported EMA model loads and carries its provenance.
    std::map<std::string, std::string> metadata;
    EnergyModel exported = loadEnergyModel(trainer.modelPath(), &metadata);
    EXPECT_EQ(metadata.at("training.steps"), "100");
    EXPECT_EQ(metadata.at("training.dataset_sha256"), sha256File(data));
    std::ifstream versionFile(FLASHIPA_VERSION_FILE);
    std::string version;
    std::getline(versionFile, version);
    EXPECT_FALSE(version.empty());
    EXPECT_EQ(metadata.at("training.software_version"), version);
    EXPECT_EQ(exported->config().nodeDim, 16);
    // The log: a header, the step-0 validation row and one row per step.
    std::ifstream csv(trainer.logPath());
    std::string header, line;
    std::getline(csv, header);
    EXPECT_EQ(header.rfind("step,wall_s,train_loss,val_loss,val_sigma_lt_0.05", 0), 0u) << header;
    int rows = 0;
    while (std::getline(csv, line))
        rows++;
    EXPECT_EQ(rows, 101);
}

TEST(Trainer, DeterministicGivenSeed) {
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    auto train = [&](const std::string& out, uint64_t seed) {
        TrainerOptions o = tinyOptions(data, dir + "/" + out, 8);
        o.seed = seed;
        Trainer trainer(o);
        for (int i = 0; i < 8; i++)
            trainer.trainStep();
        return std::make_pair(trainer.losses(), parameters(trainer.ema()));
    };
    auto a = train("a", 7), b = train("b", 7), c = train("c", 8);
    EXPECT_EQ(a.first, b.first);
    for (size_t i = 0; i < a.second.size(); i++)
        EXPECT_TRUE(torch::equal(a.second[i], b.second[i]));
    EXPECT_NE(a.first, c.first);
}

TEST(Trainer, ResumeEqualsStraightRun) {
    // 20 steps straight == 10 steps, checkpoint, resume, 10 more: same losses and weights, bitwise.
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    TrainerOptions straight = tinyOptions(data, dir + "/straight", 20);
    Trainer a(straight);
    ASSERT_TRUE(a.run());

    TrainerOptions first = tinyOptions(data, dir + "/chunked", 20);
    first.stopAfterSteps = 10;
    {
        Trainer b(first);
        ASSERT_FALSE(b.run());
        EXPECT_EQ(b.step(), 10);
    }
    TrainerOptions second = resumeOptions(dir + "/chunked", 10);
    Trainer c(second);
    EXPECT_EQ(c.step(), 10);
    EXPECT_EQ(c.options().steps, 20);
    EXPECT_EQ(c.options().model.nodeDim, 16);
    ASSERT_TRUE(c.run());
    ASSERT_EQ(c.losses().size(), 10u);
    for (int i = 0; i < 10; i++)
        EXPECT_EQ(c.losses()[i], a.losses()[10 + i]) << "step " << 10 + i;
    auto pa = parameters(a.model()), pc = parameters(c.model());
    auto ea = parameters(a.ema()), ec = parameters(c.ema());
    for (size_t i = 0; i < pa.size(); i++) {
        EXPECT_TRUE(torch::equal(pa[i], pc[i]));
        EXPECT_TRUE(torch::equal(ea[i], ec[i]));
    }
    // Both logs hold the same losses for every step (the resumed log appends to the first chunk's).
    auto column = [](const std::string& path) {
        std::ifstream in(path);
        std::string line;
        std::vector<std::string> losses;
        std::getline(in, line);
        while (std::getline(in, line)) {
            std::stringstream row(line);
            std::string step, wall, loss;
            std::getline(row, step, ',');
            std::getline(row, wall, ',');
            std::getline(row, loss, ',');
            losses.push_back(step + ":" + loss);
        }
        return losses;
    };
    EXPECT_EQ(column(a.logPath()), column(c.logPath()));
    // A fresh run never overwrites a checkpoint.
    expectThrowsWith([&]() { Trainer d(straight); }, "already holds a training checkpoint");
    // A changed dataset is refused on resume.
    std::string other = writeDataset(dir, "other.safetensors", [](TensorList& t, Metadata&) { t[0].second = t[0].second * 1.01; });
    TrainerOptions wrong = second;
    wrong.datasetPath = other;
    expectThrowsWith([&]() { Trainer d(wrong); }, "is not the one this run trained on");
    TrainerOptions missing = second;
    missing.outDir = dir + "/nothing";
    expectThrowsWith([&]() { Trainer d(missing); }, "cannot resume: no checkpoint");
}

TEST(Trainer, ResumeWithANewBatchKeepsTheValidationSet) {
    // A run stopped at step 10 (batch 4) continues with batch 8: the validation set, and so the validation
    // loss of the same EMA weights, is exactly the first chunk's; the new batch is recorded and kept by a later
    // resume; a checkpoint written before the validation batch was recorded validates with its step's batch.
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    TrainerOptions first = tinyOptions(data, dir + "/run", 20);
    first.stopAfterSteps = 10;
    double before = 0;
    std::vector<double> straightLosses;
    {
        Trainer a(first);
        ASSERT_FALSE(a.run());
        before = a.validate().loss;
        a.trainStep();
        straightLosses = a.losses();
    }
    EXPECT_EQ(Safetensors::read(dir + "/run/checkpoint.safetensors").metadata.at("trainer.validation_batch_size"), "4");
    TrainerOptions resume = resumeOptions(dir + "/run", 0);
    resume.resumeBatchSize = 8;
    resume.stopAfterSteps = 1;
    {
        Trainer b(resume);
        EXPECT_EQ(b.step(), 10);
        EXPECT_EQ(b.options().batchSize, 8);
        EXPECT_EQ(b.options().validationBatchSize, 4);
        EXPECT_EQ(b.validate().loss, before);
        ASSERT_FALSE(b.run());
        ASSERT_EQ(b.losses().size(), 1u);
        EXPECT_NE(b.losses()[0], straightLosses.back()); // step 10 trained on another (larger) batch
    }
    SafetensorsContents written = Safetensors::read(dir + "/run/checkpoint.safetensors");
    EXPECT_EQ(written.metadata.at("trainer.batch_size"), "8");
    EXPECT_EQ(written.metadata.at("trainer.validation_batch_size"), "4");
    TrainerOptions again = resume;
    again.resumeBatchSize = 0;
    {
        Trainer c(again);
        EXPECT_EQ(c.step(), 11);
        EXPECT_EQ(c.options().batchSize, 8);
        EXPECT_EQ(c.options().validationBatchSize, 4);
    }
    // A checkpoint without the key (written before it existed) validates with its step's batch.
    std::vector<std::pair<std::string, torch::Tensor>> tensors(written.tensors.begin(), written.tensors.end());
    written.metadata.erase("trainer.validation_batch_size");
    Safetensors::write(dir + "/run/checkpoint.safetensors", tensors, written.metadata);
    {
        Trainer d(again);
        EXPECT_EQ(d.options().validationBatchSize, 8);
    }
    TrainerOptions bad = resume;
    bad.resumeBatchSize = -1;
    expectThrowsWith([&]() { Trainer e(bad); }, "the batch given on resume must be >= 1");
    TrainerOptions fresh = tinyOptions(data, dir + "/fresh", 4);
    fresh.resumeBatchSize = 8;
    try {
        Trainer f(fresh);
        ADD_FAILURE() << "a new run took resumeBatchSize";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("resumeBatchSize changes the batch of a resumed run"), std::string::npos) << e.what();
    }
}

TEST(Trainer, InitFromStartsANewRunFromAnExportedModel) {
    // A run of 6 steps (prior version 3) exports its EMA weights; a new run initialised from them validates
    // exactly as the first run's EMA did (the same weights, validation set and prior), and one with prior
    // version 4 holds the same network with its own measured prior. Another architecture is refused.
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    TrainerOptions first = tinyOptions(data, dir + "/first", 6);
    first.model.geometryPrior = 3;
    Trainer a(first);
    ASSERT_TRUE(a.run());
    const double aLoss = a.validate().loss;

    TrainerOptions same = tinyOptions(data, dir + "/same", 6);
    same.model.geometryPrior = 3;
    same.initFrom = a.modelPath();
    Trainer b(same);
    EXPECT_EQ(b.validate().loss, aLoss);
    EXPECT_EQ(maxDifference(parameters(b.model()), parameters(b.ema())), 0.0);
    EXPECT_EQ(maxDifference(parameters(b.model()), parameters(a.ema())), 0.0);

    TrainerOptions moved = tinyOptions(data, dir + "/moved", 2);
    moved.model.geometryPrior = 4;
    moved.initFrom = a.modelPath();
    Trainer c(moved);
    EXPECT_TRUE(c.model()->geometryPriorBondCovariance.defined());
    for (auto& item : c.model()->named_parameters())
        if (item.key().find("geometryPrior") == std::string::npos)
            EXPECT_TRUE(torch::equal(item.value(), a.ema()->named_parameters()[item.key()])) << item.key();
    ASSERT_TRUE(c.run());
    // The warm start is recorded in the checkpoint and the exported model.
    std::map<std::string, std::string> metadata;
    loadEnergyModel(c.modelPath(), &metadata);
    ASSERT_TRUE(metadata.count("training.init_from"));
    EXPECT_NE(metadata["training.init_from"].find(a.modelPath()), std::string::npos);
    EXPECT_NE(metadata["training.init_from"].find("sha256 "), std::string::npos);

    TrainerOptions wider = tinyOptions(data, dir + "/wider", 2);
    wider.model.nodeDim = 24;
    wider.initFrom = a.modelPath();
    try {
        Trainer d(wider);
        ADD_FAILURE() << "a model of another width was accepted";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("nodeDim"), std::string::npos) << e.what();
    }
}

TEST(Trainer, GeometryPriorIsMeasuredOnTrainingChainsAndNeverTrained) {
    // The prior's statistics come from the training split (median, 1.4826 MAD; version 4's bond covariances),
    // are exported with the model, and stay exactly as measured through steps, the EMA and a resume.
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    TrainerOptions options = tinyOptions(data, dir + "/prior", 8);
    options.model.geometryPrior = 4;
    options.stopAfterSteps = 4;
    torch::Tensor measured, covariance;
    {
        Trainer first(options);
        ASSERT_FALSE(first.run());
        measured = first.model()->geometryPriorStats.detach().clone();
        covariance = first.model()->geometryPriorBondCovariance.detach().clone();
        EXPECT_TRUE(torch::equal(measured, first.ema()->geometryPriorStats));
        EXPECT_TRUE(torch::equal(covariance, first.ema()->geometryPriorBondCovariance));
    }
    // The oracle: the N-CA distances of the training chains' protein residues, straight from the file.
    SafetensorsContents contents = Safetensors::read(data);
    std::map<std::string, torch::Tensor> t(contents.tensors.begin(), contents.tensors.end());
    auto offsets = t["chain_offsets"], isRna = t["is_rna"], split = t["split"], atoms = t["atoms"].to(torch::kFloat64);
    std::vector<double> distances;
    for (int64_t c = 0; c + 1 < offsets.numel(); c++) {
        if (isRna[c].item<int>() || split[c].item<int>())
            continue;
        for (int64_t n = offsets[c].item<int64_t>(); n < offsets[c + 1].item<int64_t>(); n++)
            distances.push_back((atoms[n][0] - atoms[n][1]).norm().item<double>());
    }
    std::sort(distances.begin(), distances.end());
    const double median = distances[(distances.size() - 1) / 2]; // torch's median: the lower middle value
    EXPECT_NEAR(measured[0][0].item<double>(), median, 1e-6);
    EXPECT_GT(measured[0][1].item<double>(), 0.0);
    // The bond covariances, by loops over each training protein chain's unbroken backbone path: the mean of
    // b_j . b_{j+lag} / 3 over pairs in one segment. Where those would not be positive definite enough, the
    // trainer shrinks c1 and c2 together to the floor: their ratio and c0 stay, the symbol sits on the floor.
    auto segment = t["segment"];
    double sums[3] = {0, 0, 0};
    int64_t counts[3] = {0, 0, 0};
    for (int64_t c = 0; c + 1 < offsets.numel(); c++) {
        if (isRna[c].item<int>() || split[c].item<int>())
            continue;
        std::vector<torch::Tensor> bonds; // one unbroken stretch at a time
        auto flush = [&]() {
            for (size_t j = 0; j < bonds.size(); j++)
                for (int lag = 0; lag < 3 && j + lag < bonds.size(); lag++)
                    sums[lag] += bonds[j].dot(bonds[j + lag]).item<double>(), counts[lag]++;
            bonds.clear();
        };
        for (int64_t n = offsets[c].item<int64_t>(); n < offsets[c + 1].item<int64_t>(); n++) {
            if (n > offsets[c].item<int64_t>()) {
                if (segment[n].item<int64_t>() != segment[n - 1].item<int64_t>())
                    flush();
                else
                    bonds.push_back(atoms[n][0] - atoms[n - 1][2]);
            }
            bonds.push_back(atoms[n][1] - atoms[n][0]);
            bonds.push_back(atoms[n][2] - atoms[n][1]);
        }
        flush();
    }
    const double c0 = sums[0] / counts[0] / 3, c1 = sums[1] / counts[1] / 3, c2 = sums[2] / counts[2] / 3;
    EXPECT_NEAR(covariance[0].item<double>(), c0, 1e-6 * c0);
    if (GeometryPrior::bondSpectrumMinimum(c0, c1, c2) >= GeometryPrior::MinimumBondSpectrum * c0) {
        EXPECT_NEAR(covariance[1].item<double>(), c1, 1e-6 * c0);
        EXPECT_NEAR(covariance[2].item<double>(), c2, 1e-6 * c0);
    } else {
        EXPECT_NEAR(covariance[2].item<double>() / covariance[1].item<double>(), c2 / c1, 1e-5 * std::abs(c2 / c1));
        EXPECT_LT(std::abs(covariance[1].item<double>()), std::abs(c1));
        EXPECT_NEAR(GeometryPrior::bondSpectrumMinimum(covariance[0].item<double>(), covariance[1].item<double>(), covariance[2].item<double>()),
                    GeometryPrior::MinimumBondSpectrum * c0, 1e-4 * c0);
    }
    TrainerOptions resume = resumeOptions(dir + "/prior", TrainerOptions().validateEvery);
    Trainer second(resume);
    ASSERT_TRUE(second.run());
    EXPECT_TRUE(torch::equal(second.model()->geometryPriorStats, measured));
    EXPECT_TRUE(torch::equal(second.ema()->geometryPriorStats, measured));
    EXPECT_TRUE(torch::equal(second.model()->geometryPriorBondCovariance, covariance));
    EnergyModel exported = loadEnergyModel(second.modelPath());
    EXPECT_EQ(exported->config().geometryPrior, 4);
    EXPECT_TRUE(torch::equal(exported->geometryPriorStats, measured.to(torch::kFloat32)));
    EXPECT_TRUE(torch::equal(exported->geometryPriorBondCovariance, covariance.to(torch::kFloat32)));
}

namespace {

// The processes of a data-parallel run played by threads of this process: an all-reduce that waits for
// every rank (or fails after 120 s, so a broken test cannot hang). Two ranks add in either order with the
// same result (IEEE addition commutes), so the sum does not depend on which thread arrives first.
class ThreadGroup {
public:
    explicit ThreadGroup(int size) : size_(size) {}
    torch::Tensor reduce(const torch::Tensor& tensor, bool maximum) {
        std::unique_lock<std::mutex> lock(mutex_);
        const int64_t generation = generation_;
        torch::Tensor t = tensor.to(torch::kCPU);
        accumulated_ = arrived_ == 0 ? t.clone() : (maximum ? torch::maximum(accumulated_, t) : accumulated_ + t);
        if (++arrived_ == size_) {
            result_ = accumulated_;
            arrived_ = 0;
            generation_++;
            changed_.notify_all();
        } else if (!changed_.wait_for(lock, std::chrono::seconds(120), [&]() { return generation_ != generation; })) {
            throw std::runtime_error("thread group: a rank did not arrive");
        }
        return result_.clone();
    }

private:
    int size_, arrived_ = 0;
    int64_t generation_ = 0;
    torch::Tensor accumulated_, result_;
    std::mutex mutex_;
    std::condition_variable changed_;
};

class ThreadCommunicator : public TrainingCommunicator {
public:
    ThreadCommunicator(std::shared_ptr<ThreadGroup> group, int rank, int size) : group_(std::move(group)), rank_(rank), size_(size) {}
    int rank() const override { return rank_; }
    int worldSize() const override { return size_; }
    void allReduceSum(torch::Tensor& tensor) override { tensor.copy_(group_->reduce(tensor, false)); }
    void allReduceMax(torch::Tensor& tensor) override { tensor.copy_(group_->reduce(tensor, true)); }

private:
    std::shared_ptr<ThreadGroup> group_;
    int rank_, size_;
};

// Runs body(rank, communicator) in one thread per rank; rethrows the first rank's exception, if any.
void runRanks(int size, const std::function<void(int, std::shared_ptr<TrainingCommunicator>)>& body,
              std::vector<std::string>* errors = nullptr) {
    auto group = std::make_shared<ThreadGroup>(size);
    std::vector<std::thread> threads;
    std::vector<std::string> messages(size);
    for (int r = 0; r < size; r++)
        threads.emplace_back([&, r]() {
            try {
                body(r, std::make_shared<ThreadCommunicator>(group, r, size));
            } catch (const std::exception& e) {
                messages[r] = e.what();
            }
        });
    for (auto& t : threads)
        t.join();
    if (errors)
        *errors = messages;
    else
        for (int r = 0; r < size; r++)
            if (!messages[r].empty())
                throw std::runtime_error("rank " + std::to_string(r) + ": " + messages[r]);
}

} // namespace

TEST(Trainer, DataParallelEqualsOneProcessWithTheWholeBatch) {
    // Two ranks of batch 2 draw the same structures and noise as one process of batch 4 (each rank keeps
    // its half), so their losses, validation and weights after 6 steps match the single process's. In
    // float64 they differ only by the order of the gradient sums: 1e-10 in the weights bounds rounding
    // (observed 6e-13: AdamW divides small gradients by their own size) and is 1e5 times smaller than one
    // step's change, so a wrong shard, a missing average or a rank drawing other noise fails it.
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    auto options = [&](const std::string& out, int batch) {
        TrainerOptions o = tinyOptions(data, dir + "/" + out, 6);
        o.dtype = torch::kFloat64;
        o.batchSize = batch;
        o.validateEvery = 3;
        return o;
    };
    Trainer single(options("single", 4));
    ValidationResult singleStart = single.validate();
    ASSERT_TRUE(single.run());

    std::vector<std::vector<double>> losses(2);
    std::vector<std::vector<torch::Tensor>> weights(2), emaWeights(2);
    std::vector<ValidationResult> starts(2), ends(2);
    runRanks(2, [&](int rank, std::shared_ptr<TrainingCommunicator> communicator) {
        Trainer trainer(options("parallel", 2), communicator);
        EXPECT_EQ(trainer.globalBatchSize(), 4);
        starts[rank] = trainer.validate();
        EXPECT_TRUE(trainer.run());
        losses[rank] = trainer.losses();
        weights[rank] = parameters(trainer.model());
        emaWeights[rank] = parameters(trainer.ema());
        ends[rank] = trainer.validate();
    });
    // The ranks hold identical weights (the same update everywhere).
    EXPECT_EQ(maxDifference(weights[0], weights[1]), 0.0);
    EXPECT_EQ(losses[0], losses[1]);
    ASSERT_EQ(losses[0].size(), 6u);
    for (int i = 0; i < 6; i++)
        EXPECT_NEAR(losses[0][i], single.losses()[i], 1e-12 * std::abs(single.losses()[i])) << "step " << i;
    double change = maxDifference(parameters(single.model()), weights[0]);
    std::cout << "max |w(2 ranks) - w(1 process)| = " << change << ", EMA " << maxDifference(parameters(single.ema()), emaWeights[0]) << "\n";
    EXPECT_LT(change, 1e-10);
    EXPECT_LT(maxDifference(parameters(single.ema()), emaWeights[0]), 1e-10);
    EXPECT_NEAR(starts[0].loss, singleStart.loss, 1e-12);
    EXPECT_EQ(starts[0].bandCount, singleStart.bandCount);
    EXPECT_NEAR(ends[1].loss, single.validate().loss, 1e-10);

    // Rank 0 alone wrote: the checkpoint holds the step's batch (4), and the log one row per step.
    SafetensorsContents checkpoint = Safetensors::read(dir + "/parallel/checkpoint.safetensors");
    EXPECT_EQ(checkpoint.metadata.at("trainer.batch_size"), "4");
    EXPECT_EQ(checkpoint.metadata.at("trainer.processes"), "2");
    std::map<std::string, std::string> metadata;
    loadEnergyModel(dir + "/parallel/model.safetensors", &metadata);
    EXPECT_EQ(metadata.at("training.batch_size"), "4");
}

TEST(Trainer, DataParallelResumesOnAnyDivisorOfTheBatch) {
    // A 2-rank run stopped after 3 of 6 steps continues on one process (batch 4) as the single-process
    // oracle does; 3 processes cannot split a batch of 4; ranks given different runs refuse to start.
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    TrainerOptions oracle = tinyOptions(data, dir + "/oracle", 6);
    oracle.dtype = torch::kFloat64;
    Trainer single(oracle);
    ASSERT_TRUE(single.run());

    runRanks(2, [&](int, std::shared_ptr<TrainingCommunicator> communicator) {
        TrainerOptions o = tinyOptions(data, dir + "/run", 6);
        o.dtype = torch::kFloat64;
        o.batchSize = 2;
        o.stopAfterSteps = 3;
        Trainer trainer(o, communicator);
        EXPECT_FALSE(trainer.run());
    });
    TrainerOptions resume = resumeOptions(dir + "/run", 10);
    Trainer continued(resume);
    EXPECT_EQ(continued.step(), 3);
    EXPECT_EQ(continued.options().batchSize, 4);
    ASSERT_TRUE(continued.run());
    EXPECT_LT(maxDifference(parameters(single.model()), parameters(continued.model())), 1e-10);
    for (int i = 0; i < 3; i++)
        EXPECT_NEAR(continued.losses()[i], single.losses()[3 + i], 1e-12);

    std::vector<std::string> errors;
    runRanks(3, [&](int, std::shared_ptr<TrainingCommunicator> communicator) { Trainer t(resume, communicator); }, &errors);
    for (const auto& e : errors)
        EXPECT_NE(e.find("batch of 4 structures per step does not split evenly over 3 processes"), std::string::npos) << e;

    runRanks(2, [&](int rank, std::shared_ptr<TrainingCommunicator> communicator) {
        TrainerOptions o = tinyOptions(data, dir + "/mismatch", 6);
        o.seed = rank == 0 ? 7 : 8;
        Trainer t(o, communicator);
    }, &errors);
    for (const auto& e : errors)
        EXPECT_NE(e.find("the processes of the data-parallel run disagree on the seed"), std::string::npos) << e;
}

TEST(ThreadingDecoys, EachDecoyIsACentredWindowOfAChainOfItsKindAtLeastAsLongWithItsOwnNoise) {
    // Proteins of 5, 7, 7 and 3 residues (one with a chain break) and one RNA of 4 (no other RNA: no decoy), padded
    // to 8. Each decoy, less its own sigma x eps, must equal a centred contiguous window of the clean backbone of
    // another structure of its kind with at least its length, with that window's chain ids; padding stays empty;
    // and over many generators every allowed donor is drawn.
    const int64_t B = 5, L = 8;
    const std::vector<int64_t> length = {5, 7, 7, 3, 4};
    StructureBatch batch;
    batch.mask = torch::zeros({B, L}, torch::kBool);
    batch.types = torch::zeros({B, L}, torch::kInt64);
    batch.chains = torch::full({B, L}, -1, torch::kInt64);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < length[b]; i++) {
            batch.mask[b][i] = true;
            batch.types[b][i] = b == 4 ? ResidueType::FirstNucleotide + i % 4 : (i + b) % 20;
            batch.chains[b][i] = b == 1 && i >= 4 ? 11 : 10 * b;
        }
    torch::manual_seed(3);
    torch::Tensor real = batch.mask.to(torch::kFloat64).view({B, L, 1, 1});
    torch::Tensor clean = torch::randn({B, L, 3, 3}, torch::kFloat64) * real, eps = torch::randn({B, L, 3, 3}, torch::kFloat64) * real;
    torch::Tensor sigma = torch::tensor({0.1, 0.2, 0.3, 0.4, 0.5}, torch::kFloat64);
    std::vector<std::set<int64_t>> drawn(B);
    for (uint64_t seed = 0; seed < 60; seed++) {
        at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
        ThreadingDecoys decoys = threadingDecoys(batch, clean, sigma, eps, generator);
        for (int64_t b = 0; b < B; b++) {
            const int64_t n = length[b];
            EXPECT_EQ(decoys.atoms[b].narrow(0, n, L - n).abs().max().item<double>(), 0.0);
            if (b == 4) {
                EXPECT_EQ(decoys.use[b].item<double>(), 0.0);
                continue;
            }
            ASSERT_EQ(decoys.use[b].item<double>(), 1.0) << b;
            torch::Tensor backbone = decoys.atoms[b].narrow(0, 0, n) - sigma[b] * eps[b].narrow(0, 0, n);
            EXPECT_LT(backbone.mean(std::vector<int64_t>{0, 1}).abs().max().item<double>(), 1e-12);
            int matches = 0;
            for (int64_t d = 0; d < 4; d++) {
                if (d == b || length[d] < n)
                    continue;
                for (int64_t start = 0; start + n <= length[d]; start++) {
                    torch::Tensor window = clean[d].narrow(0, start, n);
                    window = window - window.mean(std::vector<int64_t>{0, 1}, true);
                    if ((window - backbone).abs().max().item<double>() < 1e-12 &&
                        torch::equal(decoys.chains[b].narrow(0, 0, n), batch.chains[d].narrow(0, start, n))) {
                        matches++;
                        drawn[b].insert(d);
                    }
                }
            }
            EXPECT_EQ(matches, 1) << "structure " << b << " seed " << seed;
        }
    }
    EXPECT_EQ(drawn[0], (std::set<int64_t>{1, 2}));
    EXPECT_EQ(drawn[1], (std::set<int64_t>{2}));
    EXPECT_EQ(drawn[2], (std::set<int64_t>{1}));
    EXPECT_EQ(drawn[3], (std::set<int64_t>{0, 1, 2}));
}

TEST(Trainer, ThreadingContrastKeepsTheDrawsResumesAndSplitsOverProcesses) {
    // With threadedWeight > 0: (1) the first step's score-matching loss equals that of a run without the contrast
    // (the decoys are drawn after the batch and its noise), and the contrast is reported, near log 2 for an untrained
    // model that barely tells backbones apart; (2) 3 + 3 resumed steps equal 6 straight, bitwise, the weight kept by
    // the checkpoint, and a resume may change it; (3) two processes of batch 2 train as one of batch 4 (float64,
    // 1e-10 as in DataParallelEqualsOneProcessWithTheWholeBatch).
    TempDir tmp;
    const std::string& dir = tmp.path;
    std::string data = writeDataset(dir, "data.safetensors");
    auto options = [&](const std::string& out, double weight) {
        TrainerOptions o = tinyOptions(data, dir + "/" + out, 6);
        o.dtype = torch::kFloat64;
        o.threadedWeight = weight;
        return o;
    };
    Trainer plain(options("plain", 0.0)), threaded(options("threaded", 0.5));
    StepResult p = plain.trainStep(), t = threaded.trainStep();
    EXPECT_EQ(p.loss, t.loss);
    EXPECT_TRUE(std::isnan(p.threadedLoss));
    ASSERT_TRUE(std::isfinite(t.threadedLoss));
    EXPECT_NEAR(t.threadedLoss, std::log(2.0), 0.5);
    EXPECT_GT(maxDifference(parameters(plain.model()), parameters(threaded.model())), 0.0); // the contrast moved the weights

    Trainer straight(options("straight", 0.5));
    ASSERT_TRUE(straight.run());
    TrainerOptions first = options("chunked", 0.5);
    first.stopAfterSteps = 3;
    {
        Trainer a(first);
        ASSERT_FALSE(a.run());
    }
    SafetensorsContents checkpoint = Safetensors::read(dir + "/chunked/checkpoint.safetensors");
    EXPECT_EQ(checkpoint.metadata.at("trainer.threaded_weight"), "0.5");
    EXPECT_EQ(checkpoint.metadata.at("trainer.threaded_gap"), "per_residue");
    {
        // A run whose contrast used the whole chain's gap (a checkpoint without trainer.threaded_gap) is refused.
        SafetensorsContents legacy = checkpoint;
        legacy.metadata.erase("trainer.threaded_gap");
        TempDir legacyDir;
        Safetensors::write(legacyDir.path + "/checkpoint.safetensors", legacy.tensors, legacy.metadata);
        expectThrowsWith([&] { Trainer t(resumeOptions(legacyDir.path, 10)); }, "whole chain's energy gap");
    }
    {
        Trainer resumed(resumeOptions(dir + "/chunked", 10));
        EXPECT_EQ(resumed.options().threadedWeight, 0.5);
        ASSERT_TRUE(resumed.run());
        EXPECT_EQ(maxDifference(parameters(straight.model()), parameters(resumed.model())), 0.0);
        EXPECT_EQ(maxDifference(parameters(straight.ema()), parameters(resumed.ema())), 0.0);
    }
    TrainerOptions changed = resumeOptions(dir + "/chunked", 10);
    changed.resumeThreadedWeight = 2.0;
    changed.steps = 7;
    EXPECT_EQ(Trainer(changed).options().threadedWeight, 2.0);

    TrainerOptions single = options("single", 0.5);
    single.batchSize = 4;
    single.steps = 3;
    Trainer one(single);
    ASSERT_TRUE(one.run());
    std::vector<std::vector<torch::Tensor>> weights(2);
    runRanks(2, [&](int rank, std::shared_ptr<TrainingCommunicator> communicator) {
        TrainerOptions o = options("ranks", 0.5);
        o.batchSize = 2;
        o.steps = 3;
        Trainer trainer(o, communicator);
        EXPECT_TRUE(trainer.run());
        weights[rank] = parameters(trainer.model());
    });
    EXPECT_EQ(maxDifference(weights[0], weights[1]), 0.0);
    EXPECT_LT(maxDifference(parameters(one.model()), weights[0]), 1e-10);
}
