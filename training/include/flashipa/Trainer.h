#ifndef FLASHIPA_TRAINER_H_
#define FLASHIPA_TRAINER_H_

#include "flashipa/Dataset.h"
#include "flashipa/EnergyModel.h"
#include "flashipa/ModelConfig.h"
#include <map>
#include <memory>
#include <string>
#include <torch/torch.h>
#include <vector>

namespace FlashIPAPlugin {

/** Settings of a training run. With resume, the run's settings come from the checkpoint (see Trainer). */
struct TrainerOptions {
    std::string datasetPath;           ///< dataset file (Dataset.h)
    std::string outDir;                ///< checkpoint.safetensors, training.csv, model.safetensors go here
    ModelConfig model;                 ///< architecture; its sigmaMin/sigmaMax are the training noise range
    std::string device = "cpu";        ///< "cpu" or "cuda" (or "cuda:N")
    torch::Dtype dtype = torch::kFloat32;
    int batchSize = 4;                 ///< structures per process and step; a step's batch is batchSize x processes
    int crop = 128;                    ///< longest crop, residues
    int64_t steps = 10000;             ///< total optimiser steps of the run (the learning-rate schedule spans them)
    uint64_t seed = 0;
    double learningRate = 1e-3;        ///< peak learning rate
    int64_t warmupSteps = 200;         ///< linear warm-up, then cosine decay to minLearningRateFraction
    double minLearningRateFraction = 0.1;
    double weightDecay = 0.0;          ///< decoupled (AdamW), on matrices only
    double adamBeta1 = 0.9, adamBeta2 = 0.999, adamEpsilon = 1e-8;
    double gradClip = 1.0;             ///< global gradient-norm clip (<= 0: none)
    double emaDecay = 0.999;
    double rnaProbability = Dataset::DefaultRnaProbability;
    int64_t validateEvery = 200;       ///< steps between validations (<= 0: only at the start and the end)
    int validationBatches = 16;        ///< fixed validation batches (each validationBatchSize structures)
    int validationBatchSize = 0;       ///< structures per validation batch, all processes (0: the step's batch at
                                       ///< the run's start); a resumed run keeps its own, so its set never changes
    int resumeBatchSize = 0;           ///< with resume: structures per process and step from now on (0: the run's)
    int64_t checkpointEvery = 200;     ///< steps between checkpoints (<= 0: only at the end of a chunk)
    double maxMinutes = 0;             ///< stop this chunk (after a checkpoint) before this much wall time (<= 0: no limit)
    int64_t stopAfterSteps = 0;        ///< stop this chunk after this many steps (<= 0: no limit)
    bool resume = false;               ///< continue from outDir/checkpoint.safetensors
    double threadedWeight = 0;         ///< weight of the threading contrast (docs/MODEL.md, "Discrimination"): per
                                       ///< structure softplus((E(native) - E(threaded decoy)) / residues) at the same
                                       ///< sigma and noise; 0: off (pure denoising score matching)
    double resumeThreadedWeight = -1;  ///< with resume: >= 0 replaces the run's threadedWeight from this step on
    std::string initFrom;              ///< a new run starts from this exported model's weights (same architecture;
                                       ///< the geometry-prior version may differ: the prior is measured anew)
    bool verbose = true;               ///< progress lines on stdout
    std::string commandLine;           ///< recorded in the checkpoint and the exported model's provenance
};

/**
 * The collective operations of a data-parallel run (docs/DESIGN-DECISIONS.md, "Data-parallel training").
 * Every process of the run holds one and calls the same operations in the same order; an operation that
 * cannot complete (a process exited or hangs past the run's timeout) throws instead of blocking forever.
 */
class TrainingCommunicator {
public:
    virtual ~TrainingCommunicator() = default;
    /** This process's index in [0, worldSize()); rank 0 writes the checkpoint, the log and the model. */
    virtual int rank() const = 0;
    /** The number of processes of the run. */
    virtual int worldSize() const = 0;
    /** Replaces a contiguous tensor on the trainer's device by its elementwise sum over all processes; every
     *  process receives the same values. */
    virtual void allReduceSum(torch::Tensor& tensor) = 0;
    /** Replaces a contiguous tensor on the trainer's device by its elementwise maximum over all processes. */
    virtual void allReduceMax(torch::Tensor& tensor) = 0;
};

/** Upper edges (nm) of the noise bands that validation reports separately; the last band is open. */
const std::vector<double>& validationSigmaBands();

/** Validation losses of the EMA model on the fixed validation batches. */
struct ValidationResult {
    double loss = 0;                  ///< all bands together
    std::vector<double> bandLoss;     ///< one per band (NaN if a band holds no structure)
    std::vector<int64_t> bandCount;   ///< structures per band
    double baseline = 0;              ///< the loss of predicting zero (E|eps|^2 per coordinate, ~1)
};

/** What one optimiser step did. */
struct StepResult {
    double loss = 0;       ///< training loss of the batch, before the update
    double gradNorm = 0;   ///< global gradient norm before clipping
    double learningRate = 0;
    bool skipped = false;  ///< non-finite loss or gradient: no update
    double threadedLoss = NAN; ///< with threadedWeight > 0: the threading contrast's mean over the batch's structures
                               ///< that have a decoy (kT; log 2 when native and decoy are not told apart)
};

/**
 * Denoising score matching for the EnergyModel (docs/MATH.md §6): for each structure of a batch, centre it,
 * rotate it randomly, draw sigma log-uniformly in [sigmaMin, sigmaMax] and noise eps on the real frame
 * atoms, and minimise the mean over real atom coordinates of (sigma * dE/dx~ (x~, sigma) - eps)^2 with
 * x~ = x + sigma * eps, through double backward on the math attention backend. AdamW, global-norm
 * clipping, warm-up + cosine learning rate, and an exponential moving average (EMA) of the weights, which
 * is the model validated and exported.
 *
 * Randomness: every step draws from its own CPU generator seeded from (seed, step), so a run is
 * reproducible on the CPU and a resumed run continues exactly as an uninterrupted one: the checkpoint
 * holds model, EMA, Adam moments and the step, and the seed is its RNG state.
 *
 * With threadedWeight > 0 each step also compares every structure with a threading decoy: the clean backbone of
 * another structure of the batch of the same molecule type and at least its length (a random window of it),
 * carrying the first structure's sequence and noised with its sigma and eps. The loss adds threadedWeight x the
 * mean over structures of softplus((E(native) - E(decoy)) / residues), a logistic classifier of which of two backbones a
 * sequence belongs to, which denoising score matching alone does not constrain (docs/MODEL.md).
 *
 * Data parallel (with a TrainingCommunicator of N processes): every process draws the step's whole batch
 * of N x batchSize structures and its noise from the step's generator, keeps its own batchSize rows, and
 * scales its loss by the whole batch's coordinate count; the gradients are summed over the processes
 * before clipping and AdamW, so every process applies the same update, and N processes with batchSize B
 * train as one process with batchSize N x B up to the order of floating-point sums. Rank 0 alone writes
 * the checkpoint, the log and the model; the checkpoint holds the step's batch (N x B), so a run can
 * resume on any number of processes that divides it.
 */
class Trainer {
public:
    /** A fresh run, or (options.resume) the run saved in options.outDir, keeping options' steps,
     *  maxMinutes, stopAfterSteps, device, validateEvery, checkpointEvery and verbose. With a
     *  communicator, one process of a data-parallel run (see the class comment): every process must be
     *  given the same options, and construction fails on every process if their runs differ. */
    explicit Trainer(const TrainerOptions& options, std::shared_ptr<TrainingCommunicator> communicator = nullptr);

    /** Trains until the end of the run or of this chunk (maxMinutes, stopAfterSteps), validating,
     *  logging and checkpointing; at the end of the run, exports the EMA model. Returns true when the
     *  run is complete. */
    bool run();

    /** One optimiser step. */
    StepResult trainStep();
    /** Validation loss of the EMA model. */
    ValidationResult validate();
    /** Writes the resumable checkpoint (default: outDir/checkpoint.safetensors). */
    void saveCheckpoint(const std::string& path = "");
    /** Writes the EMA model with saveEnergyModel (default: outDir/model.safetensors) and provenance metadata. */
    void exportModel(const std::string& path = "");

    /** Optimiser steps done so far (the checkpoint's step after a resume). */
    int64_t step() const { return step_; }
    /** The run's settings (after a resume, those read from the checkpoint). */
    const TrainerOptions& options() const { return options_; }
    /** This process's rank in a data-parallel run (0 without a communicator). */
    int rank() const { return communicator_ ? communicator_->rank() : 0; }
    /** The number of processes of the run (1 without a communicator). */
    int worldSize() const { return communicator_ ? communicator_->worldSize() : 1; }
    /** Structures per step over all processes: options().batchSize x worldSize(). */
    int globalBatchSize() const { return options_.batchSize * worldSize(); }
    /** The model being trained. */
    EnergyModel& model() { return model_; }
    /** The exponential moving average of the weights (validated and exported). */
    EnergyModel& ema() { return ema_; }
    /** The training data. */
    const Dataset& dataset() const { return *dataset_; }
    /** Training losses (of the whole step's batch) of the steps this object ran. */
    const std::vector<double>& losses() const { return losses_; }
    /** Learning rate at a step (warm-up, then cosine). */
    double learningRate(int64_t step) const;

    /** outDir/checkpoint.safetensors. */
    std::string checkpointPath() const;
    /** outDir/training.csv. */
    std::string logPath() const;
    /** outDir/model.safetensors. */
    std::string modelPath() const;

private:
    struct Noised;
    Noised noise(const StructureBatch& batch, at::Generator& generator, const torch::Tensor* fixedSigma, bool keepShard,
                 bool withDecoys = false);
    void loadCheckpoint(const std::string& path);
    void initialiseFrom(const std::string& path);
    void checkProcessesAgree();
    bool anyProcess(bool flag);
    void buildValidationSet();
    void openLog(bool append);
    void logRow(const StepResult* train, const ValidationResult* val);

    TrainerOptions options_;
    std::unique_ptr<Dataset> dataset_;
    std::string datasetSha256_;
    torch::Device device_;
    EnergyModel model_{nullptr}, ema_{nullptr};
    std::vector<torch::Tensor> adamM_, adamV_;
    int64_t step_ = 0;
    double wallSeconds_ = 0;       // training wall time of all chunks so far
    double chunkStart_ = 0;        // monotonic time when this chunk's run() started
    std::vector<StructureBatch> validationBatches_;
    std::vector<torch::Tensor> validationSigma_, validationEps_, validationWeight_;
    std::vector<double> losses_;
    ValidationResult lastValidation_;
    bool haveValidation_ = false;
    StepResult lastStep_;
    std::string commandLines_;     // every chunk's command line, one per line
    std::string initFrom_;         // "path (sha256 ...)" of the model a warm-started run began from, or empty
    std::shared_ptr<TrainingCommunicator> communicator_; // null: a single process
};

} // namespace FlashIPAPlugin

#endif
