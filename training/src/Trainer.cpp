// Denoising score matching for the EnergyModel: batches, noise, the double-backward loss, AdamW, EMA,
// validation per noise band, CSV log, and resumable safetensors checkpoints.
#include "flashipa/Trainer.h"
#include "flashipa/Checkpoint.h"
#include "flashipa/GeometryPriorStatistics.h"
#include "flashipa/ThreadingDecoys.h"
#include <ATen/CPUGeneratorImpl.h>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>

namespace FlashIPAPlugin {

namespace {

const char* const CheckpointFormat = "openmm-flashipa-training-checkpoint";
const char* const CheckpointVersion = "1";
const char* const CsvHeaderStart = "step,";

// Independent random streams derived from the seed (splitmix64 finaliser over seed, stream and index):
// each training step, the model initialisation and the validation set get their own CPU generator, so
// a run's randomness is a function of (seed, step) alone and resuming needs no generator state.
enum Stream : uint64_t { InitStream = 1, TrainStream = 2, ValidationStream = 3 };
uint64_t mixSeed(uint64_t seed, uint64_t stream, uint64_t index) {
    uint64_t z = seed;
    for (uint64_t word : {stream, index}) {
        z += 0x9e3779b97f4a7c15ULL + word * 0xd1b54a32d192ed69ULL;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        z ^= z >> 31;
    }
    return z;
}

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string formatDouble(double value, int digits = 17) {
    char buffer[64];
    snprintf(buffer, sizeof(buffer), "%.*g", digits, value);
    return buffer;
}

std::string dtypeName(torch::Dtype dtype) { return dtype == torch::kFloat64 ? "float64" : "float32"; }

// mkdir -p without std::filesystem (see docs/DESIGN-DECISIONS.md, Build).
void makeDirectories(const std::string& path) {
    if (path.empty())
        return;
    std::string partial;
    std::stringstream parts(path);
    std::string part;
    if (path[0] == '/')
        partial = "/";
    while (std::getline(parts, part, '/')) {
        if (part.empty())
            continue;
        partial += part + "/";
        if (mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
            throw std::runtime_error("cannot create directory '" + partial + "': " + std::strerror(errno));
    }
}

bool fileExists(const std::string& path) {
    struct stat info;
    return stat(path.c_str(), &info) == 0;
}

// LibTorch initialises module weights from its global generator: whoever builds modules holds this lock, so
// trainers constructed at once in several threads (the data-parallel tests' ranks) never draw from each
// other's seeded stream.
std::mutex& moduleConstruction() {
    static std::mutex lock;
    return lock;
}

// A random proper rotation per structure from normalised Gaussian quaternions (uniform on SO(3)).
torch::Tensor randomRotations(int64_t B, at::Generator& generator) {
    torch::Tensor q = torch::randn({B, 4}, generator, torch::kFloat64);
    q = q / q.norm(2, 1, true);
    torch::Tensor w = q.select(1, 0), x = q.select(1, 1), y = q.select(1, 2), z = q.select(1, 3);
    return torch::stack({1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                         2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                         2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)}, 1)
        .view({B, 3, 3});
}

// Metadata readers for the checkpoint.
struct MetadataReader {
    const std::map<std::string, std::string>& metadata;
    std::string path;
    const std::string& text(const std::string& key) const {
        auto it = metadata.find(key);
        if (it == metadata.end())
            throw std::runtime_error("training checkpoint '" + path + "': metadata lacks '" + key + "'");
        return it->second;
    }
    // The whole value must parse (std::sto* stop quietly at the first bad character).
    template <typename T, typename Parse>
    T parsed(const std::string& key, Parse parse, const char* what) const {
        const std::string& t = text(key);
        size_t used = 0;
        T value = 0;
        try {
            value = parse(t, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (used == 0 || used != t.size())
            throw std::runtime_error("training checkpoint '" + path + "': metadata '" + key + "' = '" + t + "' is not " + what);
        return value;
    }
    double real(const std::string& key) const {
        return parsed<double>(key, [](const std::string& t, size_t* used) { return std::stod(t, used); }, "a number");
    }
    int64_t integer(const std::string& key) const {
        return parsed<int64_t>(key, [](const std::string& t, size_t* used) { return std::stoll(t, used); }, "an integer");
    }
    uint64_t unsignedInteger(const std::string& key) const {
        // std::stoull accepts "-1" (wrapping it), so a sign is refused here.
        auto parse = [](const std::string& t, size_t* used) { return t[0] == '-' ? (*used = 0, 0ULL) : std::stoull(t, used); };
        return parsed<uint64_t>(key, parse, "an unsigned integer");
    }
};

const std::vector<std::string>& bandColumnNames() {
    static const std::vector<std::string> names = {"val_sigma_lt_0.05", "val_sigma_0.05_0.2", "val_sigma_0.2_0.5", "val_sigma_ge_0.5"};
    return names;
}

} // namespace

const std::vector<double>& validationSigmaBands() {
    static const std::vector<double> edges = {0.05, 0.2, 0.5};
    return edges;
}

/** A noised batch on the training device: x~ in batch.atoms, plus the targets. */
struct Trainer::Noised {
    StructureBatch batch;   // atoms = x~ [B, L, 3, 3]
    torch::Tensor eps;      // [B, L, 3, 3], zero on padding
    torch::Tensor sigma;    // [B]
    torch::Tensor weight;   // [B, L, 1, 1] 1 on real residues
    torch::Tensor count;    // [B] real coordinates (9 per residue)
    torch::Tensor total;    // [] real coordinates of the whole batch, this process's shard and the others'
    StructureBatch decoy;   // withDecoys: the threading decoys (atoms noised with the same sigma and eps), same shape
    torch::Tensor decoyUse; // [B] 1 where the structure has a decoy
    torch::Tensor decoys;   // [] structures with a decoy in the whole batch
};

namespace {
// Per-structure sums of (sigma * dE/dx~ - eps)^2 over real coordinates, [B]. With createGraph the sums
// are differentiable w.r.t. the model's parameters (double backward through the math backend).
torch::Tensor residualSums(EnergyModel& model, const StructureBatch& batch, const torch::Tensor& eps, const torch::Tensor& sigma,
                           const torch::Tensor& weight, bool createGraph, torch::Tensor* energyOut = nullptr) {
    torch::Tensor xt = batch.atoms.detach().requires_grad_(true);
    StructureBatch input = batch;
    input.atoms = xt;
    // validate = false: noisy structures at large sigma may hold nearly degenerate frames, which the
    // model guards numerically; it also avoids host synchronisations.
    torch::Tensor energy = model->forward(input, sigma, AttentionBackend::Math, false);
    torch::Tensor grad = torch::autograd::grad({energy.sum()}, {xt}, {}, createGraph, createGraph)[0];
    if (energyOut)
        *energyOut = energy;
    torch::Tensor residual = (sigma.view({-1, 1, 1, 1}) * grad - eps) * weight;
    return residual.pow(2).sum({1, 2, 3});
}
} // namespace

Trainer::Trainer(const TrainerOptions& options, std::shared_ptr<TrainingCommunicator> communicator)
    : options_(options), device_(torch::kCPU), communicator_(std::move(communicator)) {
    if (options_.outDir.empty())
        throw std::invalid_argument("trainer: outDir is required");
    if (communicator_ && (communicator_->worldSize() < 1 || communicator_->rank() < 0 || communicator_->rank() >= communicator_->worldSize()))
        throw std::invalid_argument("trainer: rank " + std::to_string(communicator_->rank()) + " is not in [0, " +
                                    std::to_string(communicator_->worldSize()) + ")");
    if (rank() != 0)
        options_.verbose = false; // rank 0 reports for the run
    commandLines_ = options_.commandLine;
    if (options_.resume) {
        loadCheckpoint(checkpointPath());
    } else {
        if (options_.datasetPath.empty())
            throw std::invalid_argument("trainer: datasetPath is required");
        if (fileExists(checkpointPath()))
            throw std::runtime_error("trainer: '" + options_.outDir + "' already holds a training checkpoint; continue it with "
                                     "--resume or choose another --out-dir");
        if (options_.steps < 1)
            throw std::invalid_argument("trainer: steps must be >= 1");
        options_.model.validate();
        if (options_.batchSize < 1 || options_.crop < 1)
            throw std::invalid_argument("trainer: batch size and crop must be >= 1");
        if (options_.resumeBatchSize != 0)
            throw std::invalid_argument("trainer: resumeBatchSize changes the batch of a resumed run; a new run takes batchSize");
        if (options_.validationBatchSize < 0)
            throw std::invalid_argument("trainer: validationBatchSize must be >= 0");
        if (options_.validationBatchSize == 0)
            options_.validationBatchSize = globalBatchSize();
        if (!(std::isfinite(options_.threadedWeight) && options_.threadedWeight >= 0))
            throw std::invalid_argument("trainer: threadedWeight must be finite and >= 0");
        if (options_.resumeThreadedWeight >= 0)
            throw std::invalid_argument("trainer: resumeThreadedWeight changes a resumed run; a new run takes threadedWeight");
        if (options_.dtype != torch::kFloat32 && options_.dtype != torch::kFloat64)
            throw std::invalid_argument("trainer: dtype must be float32 or float64");
        if (!(options_.emaDecay >= 0 && options_.emaDecay < 1))
            throw std::invalid_argument("trainer: emaDecay must lie in [0, 1)");
        if (!(options_.learningRate > 0))
            throw std::invalid_argument("trainer: learningRate must be positive");
        device_ = torch::Device(options_.device);
        if (device_.is_cuda() && !torch::cuda::is_available())
            throw std::runtime_error("trainer: device '" + options_.device + "' requested but CUDA is not available");
        dataset_ = std::make_unique<Dataset>(options_.datasetPath);
        datasetSha256_ = sha256File(options_.datasetPath);
        // The initial weights come from LibTorch's default initialisation under a seed derived from the
        // run's seed (the global generator is reseeded here, so construction order does not matter). Every
        // module construction, the EMA copy's included, holds the lock: a module built in another thread
        // while this one draws would take numbers from this trainer's seeded stream (the data-parallel
        // ranks of one test process then started with different weights).
        std::unique_lock<std::mutex> initialising(moduleConstruction());
        torch::manual_seed(mixSeed(options_.seed, InitStream, 0));
        model_ = EnergyModel(options_.model);
        ema_ = EnergyModel(options_.model);
        initialising.unlock();
        if (options_.model.geometryPrior) {
            torch::Tensor stats = GeometryPrior::measure(*dataset_);
            model_->setGeometryPriorStats(stats);
            if (options_.verbose) {
                std::cout << "geometry prior (d0, s0 in nm, training split):";
                for (size_t k = 0; k < GeometryPrior::pairKinds().size(); k++)
                    std::cout << " " << GeometryPrior::pairKinds()[k].name << " " << stats[k][0].item<double>() << " "
                              << stats[k][1].item<double>() << ";";
                std::cout << std::endl;
            }
            if (options_.model.geometryPrior >= 4) {
                torch::Tensor covariance = GeometryPrior::measureBondCovariance(*dataset_);
                model_->setGeometryPriorBondCovariance(covariance);
                if (options_.verbose)
                    std::cout << "geometry prior bond covariance (nm^2 per component, training split): c0 " << covariance[0].item<double>()
                              << ", c1 " << covariance[1].item<double>() << ", c2 " << covariance[2].item<double>() << std::endl;
            }
        }
        if (!options_.initFrom.empty())
            initialiseFrom(options_.initFrom);
        model_->to(device_, options_.dtype);
        ema_->to(device_, options_.dtype);
        torch::NoGradGuard noGrad;
        auto source = model_->parameters();
        auto target = ema_->parameters();
        for (size_t i = 0; i < source.size(); i++) {
            target[i].copy_(source[i]);
            adamM_.push_back(torch::zeros_like(source[i]));
            adamV_.push_back(torch::zeros_like(source[i]));
        }
    }
    for (auto& p : ema_->parameters())
        p.set_requires_grad(false);
    makeDirectories(options_.outDir);
    if (rank() == 0) {
        // A process killed while writing leaves the temporary file that Safetensors::write renames when
        // complete; it was never the checkpoint (or the model), so it is removed here.
        for (const std::string& path : {checkpointPath(), modelPath()})
            if (fileExists(path + ".tmp"))
                std::remove((path + ".tmp").c_str());
    }
    buildValidationSet();
    checkProcessesAgree();
}

namespace {
// FNV-1a over a tensor's bytes (on the CPU): an exact fingerprint, independent of summation order.
uint64_t hashBytes(uint64_t h, const torch::Tensor& tensor) {
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    const unsigned char* bytes = static_cast<const unsigned char*>(t.data_ptr());
    for (size_t i = 0, n = t.numel() * t.element_size(); i < n; i++)
        h = (h ^ bytes[i]) * 0x100000001b3ULL;
    return h;
}
} // namespace

void Trainer::checkProcessesAgree() {
    if (worldSize() == 1)
        return;
    // Each entry is exact in a double (integers below 2^53); the maximum and minimum over the processes
    // (one all-reduce of [v, -v]) are equal when every process holds the same value.
    uint64_t modelHash = 0xcbf29ce484222325ULL, emaHash = modelHash, adamHash = modelHash;
    auto emaParams = ema_->parameters();
    auto params = model_->parameters();
    for (size_t i = 0; i < params.size(); i++) {
        modelHash = hashBytes(modelHash, params[i]);
        emaHash = hashBytes(emaHash, emaParams[i]);
        adamHash = hashBytes(hashBytes(adamHash, adamM_[i]), adamV_[i]);
    }
    const uint64_t low = 0xffffffffULL;
    const std::vector<std::pair<std::string, double>> entries = {
        {"the step", (double) step_},
        {"the run's length (steps)", (double) options_.steps},
        {"the batch per process", (double) options_.batchSize},
        {"the crop", (double) options_.crop},
        {"the seed (high bits)", (double) (options_.seed >> 32)},
        {"the seed (low bits)", (double) (options_.seed & low)},
        {"the dtype", (double) (options_.dtype == torch::kFloat64)},
        {"the dataset (sha256)", (double) std::stoull(datasetSha256_.substr(0, 12), nullptr, 16)},
        {"the model's weights", (double) (modelHash >> 32)}, {"the model's weights", (double) (modelHash & low)},
        {"the EMA weights", (double) (emaHash >> 32)}, {"the EMA weights", (double) (emaHash & low)},
        {"the optimiser state", (double) (adamHash >> 32)}, {"the optimiser state", (double) (adamHash & low)},
    };
    const int64_t n = (int64_t) entries.size();
    torch::Tensor values = torch::empty({2 * n}, torch::kFloat64);
    for (int64_t i = 0; i < n; i++) {
        values[i] = entries[i].second;
        values[n + i] = -entries[i].second;
    }
    torch::Tensor reduced = values.to(device_);
    communicator_->allReduceMax(reduced);
    reduced = reduced.to(torch::kCPU);
    for (int64_t i = 0; i < n; i++) {
        const double high = reduced[i].item<double>(), lowest = -reduced[n + i].item<double>();
        if (high != lowest)
            throw std::runtime_error("trainer: the processes of the data-parallel run disagree on " + entries[i].first +
                                     " (process " + std::to_string(rank()) + " of " + std::to_string(worldSize()) + " has " +
                                     formatDouble(entries[i].second) + ", the processes range from " + formatDouble(lowest) + " to " +
                                     formatDouble(high) + "); start every process with the same options, data and checkpoint");
    }
}

bool Trainer::anyProcess(bool flag) {
    if (worldSize() == 1)
        return flag;
    torch::Tensor value = torch::full({1}, flag ? 1.0 : 0.0, torch::TensorOptions().dtype(torch::kFloat64).device(device_));
    communicator_->allReduceMax(value);
    return value.item<double>() > 0;
}

std::string Trainer::checkpointPath() const { return options_.outDir + "/checkpoint.safetensors"; }
std::string Trainer::logPath() const { return options_.outDir + "/training.csv"; }
std::string Trainer::modelPath() const { return options_.outDir + "/model.safetensors"; }

double Trainer::learningRate(int64_t step) const {
    const double peak = options_.learningRate;
    if (step < options_.warmupSteps)
        return peak * (step + 1) / (double) options_.warmupSteps;
    double span = std::max<double>(1.0, (double) (options_.steps - options_.warmupSteps));
    double progress = std::min(1.0, std::max(0.0, (step - options_.warmupSteps) / span));
    double f = options_.minLearningRateFraction;
    return peak * (f + (1 - f) * 0.5 * (1 + std::cos(M_PI * progress)));
}

Trainer::Noised Trainer::noise(const StructureBatch& batch, at::Generator& generator, const torch::Tensor* fixedSigma, bool keepShard,
                               bool withDecoys) {
    // Everything random is drawn on the CPU in double, then moved: the same numbers on every device.
    // The draws are those of the whole batch on every process; keepShard then keeps this process's rows.
    const int64_t B = batch.atoms.size(0), L = batch.atoms.size(1);
    torch::Tensor weight = batch.mask.to(torch::kFloat64).view({B, L, 1, 1});
    torch::Tensor count = 9.0 * batch.mask.to(torch::kFloat64).sum(1); // [B] real coordinates
    auto centred = [&](const torch::Tensor& v) {
        // Subtract each structure's mean over its real atoms; padding stays zero.
        torch::Tensor mean = (v * weight).sum({1, 2}, true) / (count / 3.0).view({B, 1, 1, 1});
        return (v - mean) * weight;
    };
    torch::Tensor x = centred(batch.atoms.to(torch::kFloat64));
    torch::Tensor R = randomRotations(B, generator);
    x = torch::einsum("bij,blkj->blki", {R, x});
    torch::Tensor u = torch::rand({B}, generator, torch::kFloat64);
    // sigma log-uniform in [sigmaMin, sigmaMax] of the model's configuration (default 0.01 - 2.0 nm).
    // 0.01 nm lies below the thermal spread of backbone atoms (~0.03-0.05 nm), so the small-sigma end is
    // the refinement regime (default flashipaSigma 0.05 nm); 2 nm is the size of a cropped domain (a
    // 128-residue crop has a radius of gyration of ~1.5 nm), so at sigma_max the noised structure is
    // close to the centred Gaussian that generation starts from. Log-uniform gives each decade equal weight.
    const double logMin = std::log(options_.model.sigmaMin), logMax = std::log(options_.model.sigmaMax);
    torch::Tensor sigma = fixedSigma ? fixedSigma->to(torch::kFloat64) : torch::exp(logMin + u * (logMax - logMin));
    // Noise on the real frame atoms, without its mean: the energy is translation invariant (its gradient
    // sums to zero over atoms), so a translation of the noise could never be predicted; removing it keeps
    // the zero-predictor baseline at (n - 1) / n ~ 1 per coordinate with no irreducible floor.
    torch::Tensor eps = centred(torch::randn({B, L, 3, 3}, generator, torch::kFloat64));

    auto options = torch::TensorOptions().device(device_).dtype(options_.dtype);
    Noised n;
    n.total = count.to(options).sum();
    // The rows of this process (all of them on a single process); padding stays that of the whole batch.
    int64_t first = 0, rows = B;
    if (keepShard && worldSize() > 1) {
        if (B % worldSize() != 0)
            throw std::logic_error("trainer: a batch of " + std::to_string(B) + " does not split over " + std::to_string(worldSize()) + " processes");
        rows = B / worldSize();
        first = rows * rank();
    }
    auto shard = [&](const torch::Tensor& t) { return t.narrow(0, first, rows); };
    n.sigma = shard(sigma).to(options);
    n.eps = shard(eps).to(options);
    n.weight = shard(weight).to(options);
    n.count = shard(count).to(options);
    n.batch.atoms = shard(x).to(options) + n.sigma.view({rows, 1, 1, 1}) * n.eps;
    n.batch.types = shard(batch.types).to(device_);
    n.batch.chains = shard(batch.chains).to(device_);
    n.batch.mask = shard(batch.mask).to(device_);
    if (withDecoys) {
        ThreadingDecoys decoys = threadingDecoys(batch, x, sigma, eps, generator);
        n.decoy.atoms = shard(decoys.atoms).to(options);
        n.decoy.types = n.batch.types;
        n.decoy.chains = shard(decoys.chains).to(device_);
        n.decoy.mask = n.batch.mask;
        n.decoyUse = shard(decoys.use).to(options);
        n.decoys = decoys.use.sum().to(options);
    }
    return n;
}

StepResult Trainer::trainStep() {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(mixSeed(options_.seed, TrainStream, step_));
    StructureBatch batch = dataset_->sampleBatch(DatasetSplit::Train, globalBatchSize(), options_.crop, generator, options_.rnaProbability);
    const bool threading = options_.threadedWeight > 0;
    Noised n = noise(batch, generator, nullptr, true, threading);

    model_->train();
    for (auto& p : model_->parameters())
        p.mutable_grad().reset();
    torch::Tensor nativeEnergy;
    torch::Tensor sums = residualSums(model_, n.batch, n.eps, n.sigma, n.weight, true, threading ? &nativeEnergy : nullptr);
    // Normalised by the whole batch's coordinates: the processes' losses and gradients add up to the batch's.
    torch::Tensor loss = sums.sum() / n.total;
    torch::Tensor threaded;
    if (threading) {
        // The same noise on a backbone the sequence does not belong to: a logistic loss on the energy gap per residue
        // (an extensive gap's gradient grows with the chain and outweighs the score matching's under the clip;
        // docs/MODEL.md "Discrimination"), normalised by the whole batch's decoys (one step's losses add up over
        // processes as the score-matching term's do).
        torch::Tensor decoyEnergy = model_->forward(n.decoy, n.sigma, AttentionBackend::Math, false);
        torch::Tensor residues = n.batch.mask.to(nativeEnergy.options()).sum(1).clamp_min(1.0);
        torch::Tensor gap = (nativeEnergy - decoyEnergy) / residues;
        threaded = (torch::nn::functional::softplus(gap) * n.decoyUse).sum() / n.decoys.clamp_min(1.0);
    }
    // Gradients of the trained parameters only: the noised atoms are a leaf of the graph too, and their gradient
    // (a Hessian-vector product of the energy, through the network and the prior's pairwise exclusion term,
    // GeometryPrior::ExclusionEvaluation) is not wanted here.
    std::vector<torch::Tensor> trained;
    for (const auto& p : model_->parameters())
        if (p.requires_grad())
            trained.push_back(p);
    torch::autograd::backward({threading ? loss + options_.threadedWeight * threaded : loss}, {}, std::nullopt, false, trained);

    StepResult result;
    result.learningRate = learningRate(step_);
    std::vector<torch::Tensor> params = model_->parameters();
    if (worldSize() == 1) {
        result.loss = loss.item<double>();
        if (threading)
            result.threadedLoss = threaded.item<double>();
    } else {
        // One all-reduce of [every gradient, whether each is defined, the loss]: a gradient is defined for
        // the batch when it is on some process, as autograd defines it on a single process.
        std::vector<torch::Tensor> pieces;
        std::vector<double> defined;
        for (auto& p : params) {
            defined.push_back(p.grad().defined() ? 1.0 : 0.0);
            pieces.push_back(p.grad().defined() ? p.grad().reshape({-1}).to(options_.dtype) : torch::zeros({p.numel()}, p.options().dtype(options_.dtype)));
        }
        pieces.push_back(torch::tensor(defined, torch::kFloat64).to(loss.options()));
        pieces.push_back((threading ? threaded.detach() : torch::zeros({}, loss.options())).reshape({1}));
        pieces.push_back(loss.detach().reshape({1}));
        torch::Tensor flat = torch::cat(pieces);
        communicator_->allReduceSum(flat);
        torch::Tensor flags = flat.narrow(0, flat.size(0) - 2 - (int64_t) params.size(), (int64_t) params.size()).to(torch::kCPU);
        int64_t offset = 0;
        for (size_t i = 0; i < params.size(); i++) {
            if (flags[i].item<double>() > 0)
                params[i].mutable_grad() = flat.narrow(0, offset, params[i].numel()).view_as(params[i]).to(params[i].dtype());
            else
                params[i].mutable_grad().reset();
            offset += params[i].numel();
        }
        result.loss = flat[-1].item<double>();
        if (threading)
            result.threadedLoss = flat[-2].item<double>();
    }
    torch::Tensor squaredNorm = torch::zeros({}, torch::TensorOptions().device(device_).dtype(torch::kFloat64));
    for (auto& p : params)
        if (p.grad().defined())
            squaredNorm = squaredNorm + p.grad().to(torch::kFloat64).pow(2).sum();
    result.gradNorm = std::sqrt(squaredNorm.item<double>());
    if (!std::isfinite(result.loss) || !std::isfinite(result.gradNorm)) {
        // Skip the update (the step's batch is a function of the step, so it is not retried).
        result.skipped = true;
    } else {
        torch::NoGradGuard noGrad;
        const double clip = (options_.gradClip > 0 && result.gradNorm > options_.gradClip) ? options_.gradClip / (result.gradNorm + 1e-12) : 1.0;
        const double t = (double) (step_ + 1);
        const double b1 = options_.adamBeta1, b2 = options_.adamBeta2;
        const double correction1 = 1 - std::pow(b1, t), correction2 = 1 - std::pow(b2, t);
        const double lr = result.learningRate;
        // EMA decay warmed up so the average is not dominated by the initial weights early on.
        const double decay = std::min(options_.emaDecay, (1.0 + t) / (10.0 + t));
        auto emaParams = ema_->parameters();
        for (size_t i = 0; i < params.size(); i++) {
            torch::Tensor& p = params[i];
            if (p.grad().defined()) {
                torch::Tensor g = p.grad() * clip;
                if (options_.weightDecay > 0 && p.dim() >= 2)
                    p.mul_(1 - lr * options_.weightDecay); // decoupled (AdamW); not on biases, norms, gains
                adamM_[i].mul_(b1).add_(g, 1 - b1);
                adamV_[i].mul_(b2).addcmul_(g, g, 1 - b2);
                torch::Tensor denominator = (adamV_[i] / correction2).sqrt_().add_(options_.adamEpsilon);
                p.addcdiv_(adamM_[i], denominator, -lr / correction1);
            }
            if (p.requires_grad())
                emaParams[i].mul_(decay).add_(p, 1 - decay);
            else
                emaParams[i].copy_(p); // data, not weights (the geometry prior's tables): kept exactly
        }
    }
    for (auto& p : params)
        p.mutable_grad().reset();
    step_++;
    losses_.push_back(result.loss);
    lastStep_ = result;
    return result;
}

void Trainer::buildValidationSet() {
    validationBatches_.clear();
    validationSigma_.clear();
    validationEps_.clear();
    validationWeight_.clear();
    if (dataset_->chains(DatasetSplit::Validation).empty() || options_.validationBatches < 1)
        return;
    // A fixed set: its own generator, and sigma stratified log-uniformly over [sigmaMin, sigmaMax] so
    // that every band holds structures.
    // Batches of the run's validation size (the step's batch at its start), each split over the processes as
    // in training, so the set depends neither on the number of processes nor on a batch changed on resume.
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(mixSeed(options_.seed, ValidationStream, 0));
    const int64_t batchSize = options_.validationBatchSize;
    const int64_t total = (int64_t) options_.validationBatches * batchSize;
    torch::Tensor u = (torch::arange(total, torch::kFloat64) + torch::rand({total}, generator, torch::kFloat64)) / (double) total;
    const double logMin = std::log(options_.model.sigmaMin), logMax = std::log(options_.model.sigmaMax);
    torch::Tensor sigma = torch::exp(logMin + u * (logMax - logMin));
    for (int b = 0; b < options_.validationBatches; b++) {
        StructureBatch batch = dataset_->sampleBatch(DatasetSplit::Validation, (int) batchSize, options_.crop, generator,
                                                     options_.rnaProbability);
        torch::Tensor s = sigma.narrow(0, (int64_t) b * batchSize, batchSize);
        Noised n = noise(batch, generator, &s, true);
        validationBatches_.push_back(n.batch);
        validationSigma_.push_back(n.sigma);
        validationEps_.push_back(n.eps);
        validationWeight_.push_back(n.weight);
    }
}

ValidationResult Trainer::validate() {
    const std::vector<double>& edges = validationSigmaBands();
    const size_t bands = edges.size() + 1;
    std::vector<double> sum(bands, 0.0), count(bands, 0.0);
    std::vector<int64_t> structures(bands, 0);
    double total = 0, totalCount = 0, baseline = 0;
    ema_->eval();
    for (size_t b = 0; b < validationBatches_.size(); b++) {
        const torch::Tensor& weight = validationWeight_[b];
        torch::Tensor sums = residualSums(ema_, validationBatches_[b], validationEps_[b], validationSigma_[b], weight, false)
                                 .detach().to(torch::kCPU, torch::kFloat64);
        torch::Tensor counts = (9.0 * validationBatches_[b].mask.to(torch::kFloat64).sum(1)).to(torch::kCPU);
        torch::Tensor zero = (validationEps_[b] * weight).pow(2).sum({1, 2, 3}).to(torch::kCPU, torch::kFloat64);
        torch::Tensor sigma = validationSigma_[b].to(torch::kCPU, torch::kFloat64);
        for (int64_t i = 0; i < sums.size(0); i++) {
            double s = sigma[i].item<double>();
            size_t band = 0;
            while (band < edges.size() && s >= edges[band])
                band++;
            sum[band] += sums[i].item<double>();
            count[band] += counts[i].item<double>();
            structures[band]++;
            total += sums[i].item<double>();
            totalCount += counts[i].item<double>();
            baseline += zero[i].item<double>();
        }
    }
    if (worldSize() > 1) {
        // The sums of every process's share of the validation set, in one all-reduce.
        std::vector<double> local = {total, totalCount, baseline};
        for (size_t band = 0; band < bands; band++) {
            local.push_back(sum[band]);
            local.push_back(count[band]);
            local.push_back((double) structures[band]);
        }
        torch::Tensor reduced = torch::tensor(local, torch::kFloat64).to(device_);
        communicator_->allReduceSum(reduced);
        reduced = reduced.to(torch::kCPU);
        total = reduced[0].item<double>();
        totalCount = reduced[1].item<double>();
        baseline = reduced[2].item<double>();
        for (size_t band = 0; band < bands; band++) {
            sum[band] = reduced[3 + 3 * band].item<double>();
            count[band] = reduced[4 + 3 * band].item<double>();
            structures[band] = (int64_t) reduced[5 + 3 * band].item<double>();
        }
    }
    ValidationResult result;
    result.loss = totalCount > 0 ? total / totalCount : NAN;
    result.baseline = totalCount > 0 ? baseline / totalCount : NAN;
    for (size_t band = 0; band < bands; band++) {
        result.bandLoss.push_back(count[band] > 0 ? sum[band] / count[band] : NAN);
        result.bandCount.push_back(structures[band]);
    }
    lastValidation_ = result;
    haveValidation_ = true;
    return result;
}

void Trainer::openLog(bool append) {
    if (rank() != 0)
        return;
    // On resume, drop rows past the checkpoint (logged by a chunk that stopped before saving).
    std::vector<std::string> kept;
    if (append && fileExists(logPath())) {
        std::ifstream in(logPath());
        std::string line;
        while (std::getline(in, line)) {
            if (line.rfind(CsvHeaderStart, 0) == 0)
                continue;
            size_t comma = line.find(',');
            if (comma == std::string::npos)
                continue;
            try {
                if (std::stoll(line.substr(0, comma)) > step_)
                    continue;
            } catch (const std::exception&) {
                continue;
            }
            kept.push_back(line);
        }
    }
    std::ofstream out(logPath(), std::ios::trunc);
    if (!out)
        throw std::runtime_error("cannot write the training log '" + logPath() + "'");
    out << "step,wall_s,train_loss,val_loss";
    for (const auto& name : bandColumnNames())
        out << "," << name;
    out << ",val_baseline,lr,grad_norm,threaded_loss\n";
    for (const auto& line : kept)
        out << line << "\n";
}

void Trainer::logRow(const StepResult* train, const ValidationResult* val) {
    if (rank() != 0)
        return;
    std::ofstream out(logPath(), std::ios::app);
    if (!out)
        throw std::runtime_error("cannot write the training log '" + logPath() + "'");
    auto number = [](double v) { return std::isfinite(v) ? formatDouble(v, 9) : std::string(); };
    out << step_ << "," << formatDouble(wallSeconds_, 6) << "," << (train ? number(train->loss) : "") << ",";
    out << (val ? number(val->loss) : "");
    for (size_t band = 0; band < bandColumnNames().size(); band++)
        out << "," << (val ? number(val->bandLoss[band]) : "");
    out << "," << (val ? number(val->baseline) : "");
    out << "," << (train ? number(train->learningRate) : "") << "," << (train ? number(train->gradNorm) : "");
    out << "," << (train ? number(train->threadedLoss) : "") << "\n";
}

bool Trainer::run() {
    chunkStart_ = now();
    const double wallBase = wallSeconds_;
    auto updateWall = [&]() { wallSeconds_ = wallBase + (now() - chunkStart_); };
    openLog(options_.resume);
    const bool validation = !validationBatches_.empty();
    if (!validation && options_.verbose)
        std::cout << "no validation chains (or --val-batches 0): validation is skipped\n";
    double validationSeconds = 0, checkpointSeconds = 1.0, longestStep = 0;
    auto runValidation = [&]() {
        double t0 = now();
        ValidationResult v = validate();
        validationSeconds = now() - t0;
        return v;
    };
    if (step_ == 0 && validation) {
        ValidationResult v = runValidation();
        updateWall();
        logRow(nullptr, &v);
        if (options_.verbose)
            std::cout << "step 0: validation loss " << formatDouble(v.loss, 5) << " (zero predictor " << formatDouble(v.baseline, 5)
                      << ")" << std::endl;
    }
    double smoothed = NAN;
    int64_t chunkSteps = 0;
    while (step_ < options_.steps) {
        if (options_.stopAfterSteps > 0 && chunkSteps >= options_.stopAfterSteps)
            break;
        const bool validateNext = validation && ((options_.validateEvery > 0 && (step_ + 1) % options_.validateEvery == 0) ||
                                                 step_ + 1 == options_.steps);
        if (options_.maxMinutes > 0 && chunkSteps > 0) {
            // Leave room for one more (slow) step, its validation and the final checkpoint. The processes of
            // a data-parallel run stop together, when any of them would.
            double needed = 2 * longestStep + (validateNext ? validationSeconds : 0) + 2 * checkpointSeconds;
            if (anyProcess(now() - chunkStart_ + needed > options_.maxMinutes * 60))
                break;
        }
        double t0 = now();
        StepResult r = trainStep();
        chunkSteps++;
        longestStep = std::max(longestStep, now() - t0);
        smoothed = std::isfinite(smoothed) ? 0.98 * smoothed + 0.02 * r.loss : r.loss;
        ValidationResult v;
        if (validateNext)
            v = runValidation();
        updateWall();
        logRow(&r, validateNext ? &v : nullptr);
        if (options_.verbose && (validateNext || step_ % 10 == 0 || step_ == 1)) {
            std::cout << "step " << step_ << "/" << options_.steps << "  loss " << formatDouble(r.loss, 5) << " (avg "
                      << formatDouble(smoothed, 5) << ")  |g| " << formatDouble(r.gradNorm, 4) << "  lr "
                      << formatDouble(r.learningRate, 4) << "  " << formatDouble(now() - t0, 3) << " s" << (r.skipped ? "  SKIPPED (non-finite)" : "");
            if (std::isfinite(r.threadedLoss))
                std::cout << "  threaded " << formatDouble(r.threadedLoss, 4);
            if (validateNext) {
                std::cout << "  | val " << formatDouble(v.loss, 5) << " [";
                for (size_t band = 0; band < v.bandLoss.size(); band++)
                    std::cout << (band ? " " : "") << formatDouble(v.bandLoss[band], 4);
                std::cout << "] zero " << formatDouble(v.baseline, 4);
            }
            std::cout << std::endl;
        }
        if (options_.checkpointEvery > 0 && step_ % options_.checkpointEvery == 0 && step_ < options_.steps) {
            double c0 = now();
            saveCheckpoint();
            checkpointSeconds = now() - c0;
        }
    }
    updateWall();
    saveCheckpoint();
    const bool complete = step_ >= options_.steps;
    if (complete)
        exportModel();
    // No process returns before rank 0 has written: a failure to write then stops every process.
    anyProcess(false);
    if (complete) {
        if (options_.verbose)
            std::cout << "training complete: " << step_ << " steps, " << formatDouble(wallSeconds_, 4) << " s; EMA model written to "
                      << modelPath() << std::endl;
        return true;
    }
    if (options_.verbose)
        std::cout << "stopped at step " << step_ << " of " << options_.steps << " (checkpoint " << checkpointPath()
                  << "); continue with --resume" << std::endl;
    return false;
}

void Trainer::saveCheckpoint(const std::string& pathIn) {
    checkProcessesAgree();
    if (rank() != 0)
        return;
    const std::string path = pathIn.empty() ? checkpointPath() : pathIn;
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    auto named = model_->named_parameters();
    auto emaParams = ema_->parameters();
    for (size_t i = 0; i < named.size(); i++) {
        const std::string& name = named[i].key();
        tensors.emplace_back("model/" + name, named[i].value().detach().to(torch::kCPU));
        tensors.emplace_back("ema/" + name, emaParams[i].detach().to(torch::kCPU));
        tensors.emplace_back("adam_m/" + name, adamM_[i].to(torch::kCPU));
        tensors.emplace_back("adam_v/" + name, adamV_[i].to(torch::kCPU));
    }
    tensors.emplace_back("step", torch::tensor({step_}, torch::kInt64));
    std::map<std::string, std::string> metadata = options_.model.toMetadata();
    metadata["format"] = CheckpointFormat;
    metadata["format_version"] = CheckpointVersion;
    metadata["training.software_version"] = FLASHIPA_VERSION;
    metadata["dataset.path"] = options_.datasetPath;
    metadata["dataset.sha256"] = datasetSha256_;
    metadata["trainer.dtype"] = dtypeName(options_.dtype);
    metadata["trainer.batch_size"] = std::to_string(globalBatchSize()); // structures per step, all processes
    metadata["trainer.processes"] = std::to_string(worldSize());         // of the chunk that wrote it (information)
    metadata["trainer.crop"] = std::to_string(options_.crop);
    metadata["trainer.steps"] = std::to_string(options_.steps);
    metadata["trainer.learning_rate"] = formatDouble(options_.learningRate);
    metadata["trainer.warmup_steps"] = std::to_string(options_.warmupSteps);
    metadata["trainer.min_lr_fraction"] = formatDouble(options_.minLearningRateFraction);
    metadata["trainer.weight_decay"] = formatDouble(options_.weightDecay);
    metadata["trainer.adam_beta1"] = formatDouble(options_.adamBeta1);
    metadata["trainer.adam_beta2"] = formatDouble(options_.adamBeta2);
    metadata["trainer.adam_epsilon"] = formatDouble(options_.adamEpsilon);
    metadata["trainer.grad_clip"] = formatDouble(options_.gradClip);
    metadata["trainer.ema_decay"] = formatDouble(options_.emaDecay);
    metadata["trainer.rna_probability"] = formatDouble(options_.rnaProbability);
    metadata["trainer.validation_batches"] = std::to_string(options_.validationBatches);
    metadata["trainer.validation_batch_size"] = std::to_string(options_.validationBatchSize);
    metadata["trainer.threaded_weight"] = formatDouble(options_.threadedWeight);
    metadata["trainer.threaded_gap"] = "per_residue";
    metadata["counters.step"] = std::to_string(step_);
    metadata["counters.wall_seconds"] = formatDouble(wallSeconds_);
    metadata["rng.seed"] = std::to_string(options_.seed);
    metadata["rng.scheme"] = "each step draws from a CPU generator seeded with splitmix64(seed, stream 2, step); "
                             "initialisation stream 1, validation set stream 3";
    metadata["command_lines"] = commandLines_;
    if (!initFrom_.empty())
        metadata["init.from"] = initFrom_;
    Safetensors::write(path, tensors, metadata);
}

void Trainer::initialiseFrom(const std::string& path) {
    // Warm start: every trained weight from an exported model of the same architecture. The prior's tables
    // are not weights (they were measured on this run's data above), so the prior's version may differ:
    // a run can move a trained network onto a new prior (docs/MODEL.md).
    std::map<std::string, std::string> metadata;
    EnergyModel source = loadEnergyModel(path, &metadata);
    std::map<std::string, std::string> want = options_.model.toMetadata(), have = source->config().toMetadata();
    want.erase("config.geometryPrior");
    have.erase("config.geometryPrior");
    for (const auto& [key, value] : want)
        if (have[key] != value)
            throw std::invalid_argument("trainer: --init-from '" + path + "' has another architecture than this run (" + key + " " +
                                        have[key] + " against " + value + ")");
    torch::NoGradGuard noGrad;
    auto from = source->named_parameters();
    for (auto& item : model_->named_parameters()) {
        if (item.key().find("geometryPrior") != std::string::npos)
            continue;
        item.value().copy_(from[item.key()]);
    }
    initFrom_ = path + " (sha256 " + sha256File(path) + ")";
    if (options_.verbose)
        std::cout << "initialised from " << initFrom_ << ", trained " << (metadata.count("training.steps") ? metadata["training.steps"] : "?")
                  << " steps" << std::endl;
}

void Trainer::loadCheckpoint(const std::string& path) {
    if (!fileExists(path))
        throw std::runtime_error("cannot resume: no checkpoint '" + path + "'");
    SafetensorsContents contents = Safetensors::read(path);
    auto fail = [&](const std::string& cause) { throw std::runtime_error("training checkpoint '" + path + "': " + cause); };
    MetadataReader meta{contents.metadata, path};
    if (meta.text("format") != CheckpointFormat)
        fail(std::string("not a FlashIPA training checkpoint (format must be '") + CheckpointFormat + "')");
    if (meta.text("format_version") != CheckpointVersion)
        fail("unsupported checkpoint version '" + meta.text("format_version") + "'");

    // The run's settings come from the checkpoint; the caller keeps steps (if > 0), the chunk limits,
    // the device, the validation/checkpoint intervals, verbosity and the dataset path (if given).
    TrainerOptions o = options_;
    try {
        o.model = ModelConfig::fromMetadata(contents.metadata);
    } catch (const std::exception& e) {
        fail(e.what());
    }
    const std::string dtype = meta.text("trainer.dtype");
    if (dtype != "float32" && dtype != "float64")
        fail("trainer.dtype '" + dtype + "' is not float32 or float64");
    o.dtype = dtype == "float64" ? torch::kFloat64 : torch::kFloat32;
    // The step's batch is the run's, each process taking an equal share of it, unless the resume asks for
    // another batch per process from this step on (a launch-bound step trains on more structures at about the
    // same cost: docs/MODEL.md, "Training throughput on the GPU"). The optimiser state carries over as it is.
    const int64_t stepBatch = meta.integer("trainer.batch_size");
    if (options_.resumeBatchSize < 0)
        fail("the batch given on resume must be >= 1 structure per process");
    if (options_.resumeBatchSize > 0) {
        o.batchSize = options_.resumeBatchSize;
    } else {
        if (stepBatch < 1 || stepBatch % worldSize() != 0)
            fail("the run's batch of " + std::to_string(stepBatch) + " structures per step does not split evenly over " +
                 std::to_string(worldSize()) + " processes; resume with a number of processes that divides it");
        o.batchSize = (int) (stepBatch / worldSize());
    }
    o.resumeBatchSize = 0;
    // The validation set keeps its batches (checkpoints written before the setting existed: the step's batch).
    o.validationBatchSize = contents.metadata.count("trainer.validation_batch_size")
                                ? (int) meta.integer("trainer.validation_batch_size") : (int) stepBatch;
    if (o.validationBatchSize < 1 || o.validationBatchSize % worldSize() != 0)
        fail("the run's validation batches of " + std::to_string(o.validationBatchSize) + " structures do not split evenly over " +
             std::to_string(worldSize()) + " processes; resume with a number of processes that divides it");
    o.crop = (int) meta.integer("trainer.crop");
    if (options_.steps <= 0)
        o.steps = meta.integer("trainer.steps");
    o.learningRate = meta.real("trainer.learning_rate");
    o.warmupSteps = meta.integer("trainer.warmup_steps");
    o.minLearningRateFraction = meta.real("trainer.min_lr_fraction");
    o.weightDecay = meta.real("trainer.weight_decay");
    o.adamBeta1 = meta.real("trainer.adam_beta1");
    o.adamBeta2 = meta.real("trainer.adam_beta2");
    o.adamEpsilon = meta.real("trainer.adam_epsilon");
    o.gradClip = meta.real("trainer.grad_clip");
    o.emaDecay = meta.real("trainer.ema_decay");
    o.rnaProbability = meta.real("trainer.rna_probability");
    o.validationBatches = (int) meta.integer("trainer.validation_batches");
    // The threading contrast: the run's (checkpoints written before it existed: off) unless the resume sets it.
    o.threadedWeight = contents.metadata.count("trainer.threaded_weight") ? meta.real("trainer.threaded_weight") : 0.0;
    // The contrast's gap is per residue; a checkpoint trained with the contrast on the whole chain's gap (builds before
    // trainer.threaded_gap existed) would continue under a different loss.
    if (o.threadedWeight > 0 && (!contents.metadata.count("trainer.threaded_gap") || contents.metadata.at("trainer.threaded_gap") != "per_residue"))
        fail("this run's threading contrast used the whole chain's energy gap (an earlier build); this build's is per residue");
    if (options_.resumeThreadedWeight >= 0)
        o.threadedWeight = options_.resumeThreadedWeight;
    if (!(std::isfinite(o.threadedWeight) && o.threadedWeight >= 0))
        fail("trainer.threaded_weight must be finite and >= 0");
    o.resumeThreadedWeight = -1;
    o.seed = meta.unsignedInteger("rng.seed");
    if (o.datasetPath.empty())
        o.datasetPath = meta.text("dataset.path");
    o.resume = true;
    options_ = o;
    step_ = meta.integer("counters.step");
    wallSeconds_ = meta.real("counters.wall_seconds");
    commandLines_ = meta.text("command_lines") + (options_.commandLine.empty() ? "" : "\n" + options_.commandLine);
    auto init = contents.metadata.find("init.from");
    initFrom_ = init == contents.metadata.end() ? "" : init->second;

    device_ = torch::Device(options_.device);
    if (device_.is_cuda() && !torch::cuda::is_available())
        throw std::runtime_error("trainer: device '" + options_.device + "' requested but CUDA is not available");
    dataset_ = std::make_unique<Dataset>(options_.datasetPath);
    datasetSha256_ = sha256File(options_.datasetPath);
    if (datasetSha256_ != meta.text("dataset.sha256"))
        fail("the dataset '" + options_.datasetPath + "' (sha256 " + datasetSha256_ + ") is not the one this run trained on (sha256 " +
             meta.text("dataset.sha256") + ")");

    std::map<std::string, torch::Tensor> stored(contents.tensors.begin(), contents.tensors.end());
    auto take = [&](const std::string& name, const torch::Tensor& like) {
        auto it = stored.find(name);
        if (it == stored.end())
            fail("missing tensor '" + name + "'");
        torch::Tensor value = it->second;
        if (value.scalar_type() != options_.dtype)
            fail("tensor '" + name + "' has dtype " + std::string(c10::toString(value.scalar_type())) + ", expected " + dtypeName(options_.dtype));
        if (value.sizes() != like.sizes())
            fail("tensor '" + name + "' has shape " + c10::str(value.sizes()) + ", expected " + c10::str(like.sizes()));
        stored.erase(it);
        return value.to(device_);
    };
    {
        // Built under the lock although every weight is overwritten below: construction draws from the
        // global generator, which a trainer starting afresh in another thread has seeded for itself.
        std::lock_guard<std::mutex> constructing(moduleConstruction());
        model_ = EnergyModel(options_.model);
        ema_ = EnergyModel(options_.model);
    }
    model_->to(device_, options_.dtype);
    ema_->to(device_, options_.dtype);
    torch::NoGradGuard noGrad;
    auto named = model_->named_parameters();
    auto emaParams = ema_->parameters();
    adamM_.clear();
    adamV_.clear();
    for (size_t i = 0; i < named.size(); i++) {
        const std::string& name = named[i].key();
        named[i].value().copy_(take("model/" + name, named[i].value()));
        emaParams[i].copy_(take("ema/" + name, emaParams[i]));
        adamM_.push_back(take("adam_m/" + name, named[i].value()).clone());
        adamV_.push_back(take("adam_v/" + name, named[i].value()).clone());
    }
    auto stepTensor = stored.find("step");
    if (stepTensor == stored.end())
        fail("missing tensor 'step'");
    if (stepTensor->second.scalar_type() != torch::kInt64 || stepTensor->second.numel() != 1 ||
        stepTensor->second.item<int64_t>() != step_)
        fail("tensor 'step' does not match metadata counters.step = " + std::to_string(step_));
    stored.erase(stepTensor);
    if (!stored.empty())
        fail("unexpected tensor '" + stored.begin()->first + "'");
    if (step_ > options_.steps)
        fail("the checkpoint is at step " + std::to_string(step_) + ", past the requested " + std::to_string(options_.steps) + " steps");
}

void Trainer::exportModel(const std::string& pathIn) {
    if (rank() != 0)
        return;
    const std::string path = pathIn.empty() ? modelPath() : pathIn;
    std::map<std::string, std::string> metadata;
    metadata["provenance"] = "trained by flashipa-train (denoising score matching; EMA weights); command line(s):\n" + commandLines_;
    metadata["training"] = "denoising score matching, " + std::to_string(step_) + " steps";
    metadata["training.command_lines"] = commandLines_;
    metadata["training.dataset_path"] = options_.datasetPath;
    metadata["training.dataset_sha256"] = datasetSha256_;
    metadata["training.software_version"] = FLASHIPA_VERSION; // the repository's VERSION file (models/CMakeLists.txt)
    metadata["training.steps"] = std::to_string(step_);
    metadata["training.wall_seconds"] = formatDouble(wallSeconds_, 6);
    metadata["training.seed"] = std::to_string(options_.seed);
    metadata["training.batch_size"] = std::to_string(globalBatchSize());
    metadata["training.processes"] = std::to_string(worldSize());
    metadata["training.crop"] = std::to_string(options_.crop);
    metadata["training.dtype"] = dtypeName(options_.dtype);
    metadata["training.ema_decay"] = formatDouble(options_.emaDecay);
    if (!initFrom_.empty())
        metadata["training.init_from"] = initFrom_;
    if (!losses_.empty()) {
        // Mean of the last (up to) 100 training losses of this process.
        size_t n = std::min<size_t>(100, losses_.size());
        double mean = 0;
        for (size_t i = losses_.size() - n; i < losses_.size(); i++)
            mean += losses_[i] / n;
        metadata["training.final_train_loss"] = formatDouble(mean, 6);
    }
    if (haveValidation_) {
        metadata["training.final_val_loss"] = formatDouble(lastValidation_.loss, 6);
        metadata["training.final_val_baseline"] = formatDouble(lastValidation_.baseline, 6);
        for (size_t band = 0; band < lastValidation_.bandLoss.size(); band++)
            metadata["training.final_" + bandColumnNames()[band]] = formatDouble(lastValidation_.bandLoss[band], 6);
    }
    saveEnergyModel(ema_, path, metadata);
}

} // namespace FlashIPAPlugin
