// flashipa-train's command line (training/include/flashipa/TrainCommand.h): shared by the executable
// (training/tools/Train.cpp) and the data-parallel launcher's processes (wrappers/python/TrainingModule.cpp).
#include "flashipa/TrainCommand.h"
#include <functional>
#include <iostream>
#include <map>
#include <stdexcept>
#include <torch/torch.h>

namespace FlashIPAPlugin {

const std::string& trainUsage() {
    static const std::string usage = R"(usage: flashipa-train --data DATASET.safetensors --out-dir DIR [options]

Denoising score matching for the FlashIPA energy model. Writes DIR/checkpoint.safetensors (resumable),
DIR/training.csv (one row per step; validation columns every --val-every steps) and, when all --steps
are done, DIR/model.safetensors (the EMA weights, loadable by FlashIPAForce).

run:
  --data PATH              dataset file (scripts/build_dataset.py)
  --out-dir DIR            output folder (created)
  --resume                 continue the run in DIR; its settings come from the checkpoint, except
                           --steps, --max-minutes, --stop-after-steps, --device, --val-every,
                           --checkpoint-every, --threads and --batch-size (a new batch from this
                           step on; the validation set keeps its own) (--data may point to a moved
                           copy; its sha256 must match)
  --init-from MODEL        start a new run from an exported model's weights (the same architecture; the
                           geometry-prior version may differ, its statistics are measured anew)
  --steps N                total optimiser steps (default 10000; with --resume: the checkpoint's)
  --max-minutes M          stop (after a checkpoint) before M minutes of wall time (default: no limit)
  --stop-after-steps N     stop (after a checkpoint) after N steps of this chunk
  --device cpu|cuda        (default cpu)
  --dtype float32|float64  (default float32)
  --threads N              CPU threads for LibTorch (default: LibTorch's choice)
  --seed N                 (default 0)
data and noise:
  --batch-size N           structures per step and process (default 4)
  --crop N                 longest crop in residues (default 128)
  --rna-prob P             probability that a sampled structure is RNA (default 0.3)
  --sigma-min S --sigma-max S   noise range in nm (default: the model configuration's, 0.01 and 2.0)
  --threaded-weight W      add W x the threading contrast (per-residue energy gap of each sequence's native
                           backbone against another structure's, same noise; docs/MODEL.md), default 0: off; on --resume it
                           changes the run's weight from this step on
optimiser:
  --lr X                   peak learning rate (default 1e-3)
  --warmup N               linear warm-up steps, then cosine decay (default 200)
  --min-lr-fraction F      final learning rate / peak (default 0.1)
  --weight-decay X         decoupled (AdamW) weight decay on matrices (default 0)
  --grad-clip X            global gradient-norm clip, 0 = none (default 1.0)
  --ema-decay X            EMA decay of the exported weights (default 0.999)
validation and checkpoints:
  --val-every N            steps between validations (default 200)
  --val-batches N          fixed validation batches (default 16)
  --checkpoint-every N     steps between checkpoints (default 200)
  --quiet                  no progress lines
model size (default: ModelConfig's):
  --node-dim N --heads N --head-dim N --query-points N --value-points N --pair-rank N --pair-dim N
  --blocks N --rel-pos-frequencies N --transition-factor N --sigma-features N
  --geometry-prior 0..6    add the analytic geometry prior to the energy (docs/MODEL.md; default 0:
                           none; 1 bond terms, 2 weighted, 3 with the chain term, 4 with the bond-angle
                           correlated chain term, 5 with the exclusion between non-neighbouring residues,
                           6 with it only between residues at least three apart along a segment),
                           its statistics measured on the training split
data parallel (several processes, one per GPU, or Gloo processes on the CPU):
  python -m openmmflashipa.train --nproc N [these options]
                           N processes of --batch-size structures each: one step trains on N x
                           --batch-size structures, as one process with that batch would. Also under
                           torchrun (torchrun --nproc-per-node N -m openmmflashipa.train ...); see
                           `python -m openmmflashipa.train --help` for --nproc and --dist-timeout.
)";
    return usage;
}

std::string quotedCommandLine(const std::vector<std::string>& args) {
    std::string out;
    for (size_t i = 0; i < args.size(); i++) {
        const std::string& arg = args[i];
        bool plain = !arg.empty() && arg.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+@") == std::string::npos;
        if (i)
            out += " ";
        if (plain)
            out += arg;
        else {
            out += "'";
            for (char c : arg)
                out += c == '\'' ? std::string("'\\''") : std::string(1, c);
            out += "'";
        }
    }
    return out;
}

TrainCommandLine parseTrainCommandLine(const std::vector<std::string>& args, const std::string& commandLine) {
    TrainCommandLine parsed;
    TrainerOptions& options = parsed.options;
    int& threads = parsed.threads;
    bool stepsGiven = false, batchGiven = false, threadedGiven = false;
    double sigmaMin = 0, sigmaMax = 0;
    std::map<std::string, std::function<void(const std::string&)>> valued = {
        {"--data", [&](const std::string& v) { options.datasetPath = v; }},
        {"--out-dir", [&](const std::string& v) { options.outDir = v; }},
        {"--steps", [&](const std::string& v) { options.steps = std::stoll(v); stepsGiven = true; }},
        {"--max-minutes", [&](const std::string& v) { options.maxMinutes = std::stod(v); }},
        {"--stop-after-steps", [&](const std::string& v) { options.stopAfterSteps = std::stoll(v); }},
        {"--device", [&](const std::string& v) { options.device = v; }},
        {"--dtype", [&](const std::string& v) {
             if (v == "float32")
                 options.dtype = torch::kFloat32;
             else if (v == "float64")
                 options.dtype = torch::kFloat64;
             else
                 throw std::invalid_argument("--dtype must be float32 or float64");
         }},
        {"--threads", [&](const std::string& v) { threads = std::stoi(v); }},
        {"--seed", [&](const std::string& v) { options.seed = std::stoull(v); }},
        {"--batch-size", [&](const std::string& v) { options.batchSize = std::stoi(v); batchGiven = true; }},
        {"--crop", [&](const std::string& v) { options.crop = std::stoi(v); }},
        {"--rna-prob", [&](const std::string& v) { options.rnaProbability = std::stod(v); }},
        {"--sigma-min", [&](const std::string& v) { sigmaMin = std::stod(v); }},
        {"--sigma-max", [&](const std::string& v) { sigmaMax = std::stod(v); }},
        {"--lr", [&](const std::string& v) { options.learningRate = std::stod(v); }},
        {"--warmup", [&](const std::string& v) { options.warmupSteps = std::stoll(v); }},
        {"--min-lr-fraction", [&](const std::string& v) { options.minLearningRateFraction = std::stod(v); }},
        {"--weight-decay", [&](const std::string& v) { options.weightDecay = std::stod(v); }},
        {"--grad-clip", [&](const std::string& v) { options.gradClip = std::stod(v); }},
        {"--ema-decay", [&](const std::string& v) { options.emaDecay = std::stod(v); }},
        {"--val-every", [&](const std::string& v) { options.validateEvery = std::stoll(v); }},
        {"--val-batches", [&](const std::string& v) { options.validationBatches = std::stoi(v); }},
        {"--checkpoint-every", [&](const std::string& v) { options.checkpointEvery = std::stoll(v); }},
        {"--node-dim", [&](const std::string& v) { options.model.nodeDim = std::stoi(v); }},
        {"--heads", [&](const std::string& v) { options.model.numHeads = std::stoi(v); }},
        {"--head-dim", [&](const std::string& v) { options.model.headDim = std::stoi(v); }},
        {"--query-points", [&](const std::string& v) { options.model.queryPoints = std::stoi(v); }},
        {"--value-points", [&](const std::string& v) { options.model.valuePoints = std::stoi(v); }},
        {"--pair-rank", [&](const std::string& v) { options.model.pairRank = std::stoi(v); }},
        {"--pair-dim", [&](const std::string& v) { options.model.pairDim = std::stoi(v); }},
        {"--blocks", [&](const std::string& v) { options.model.numBlocks = std::stoi(v); }},
        {"--rel-pos-frequencies", [&](const std::string& v) { options.model.relPosFrequencies = std::stoi(v); }},
        {"--transition-factor", [&](const std::string& v) { options.model.transitionFactor = std::stoi(v); }},
        {"--sigma-features", [&](const std::string& v) { options.model.sigmaFeatures = std::stoi(v); }},
        {"--geometry-prior", [&](const std::string& v) { options.model.geometryPrior = std::stoi(v); }},
        {"--init-from", [&](const std::string& v) { options.initFrom = v; }},
        {"--threaded-weight", [&](const std::string& v) { options.threadedWeight = std::stod(v); threadedGiven = true; }},
    };
    for (size_t i = 0; i < args.size(); i++) {
        const std::string& arg = args[i];
        if (arg == "--help" || arg == "-h") {
            parsed.help = true;
            return parsed;
        }
        if (arg == "--resume") {
            options.resume = true;
            continue;
        }
        if (arg == "--quiet") {
            options.verbose = false;
            continue;
        }
        auto it = valued.find(arg);
        if (it == valued.end())
            throw std::invalid_argument("unknown option '" + arg + "'");
        if (i + 1 >= args.size())
            throw std::invalid_argument(arg + " needs a value");
        const std::string& value = args[++i];
        try {
            it->second(value);
        } catch (const std::exception& e) {
            throw std::invalid_argument("bad value '" + value + "' for " + arg + " (" + e.what() + ")");
        }
    }
    if (options.outDir.empty() || (!options.resume && options.datasetPath.empty()))
        throw std::invalid_argument("--out-dir and --data are required (--data is optional with --resume)");
    if (options.resume && !options.initFrom.empty())
        throw std::invalid_argument("--init-from starts a new run; a resumed run continues from its checkpoint");
    if (sigmaMin > 0)
        options.model.sigmaMin = sigmaMin;
    if (sigmaMax > 0)
        options.model.sigmaMax = sigmaMax;
    if (options.resume && !stepsGiven)
        options.steps = 0; // the checkpoint's
    if (options.resume && threadedGiven) {
        if (!(std::isfinite(options.threadedWeight) && options.threadedWeight >= 0))
            throw std::invalid_argument("--threaded-weight must be finite and >= 0");
        options.resumeThreadedWeight = options.threadedWeight; // from this step on
        options.threadedWeight = 0;
    }
    if (options.resume && batchGiven) {
        if (options.batchSize < 1)
            throw std::invalid_argument("--batch-size must be >= 1");
        options.resumeBatchSize = options.batchSize; // from this step on; the validation set keeps its batches
    }
    options.commandLine = commandLine.empty() ? quotedCommandLine(args) : commandLine;
    return parsed;
}

int runTrainCommand(const std::vector<std::string>& args, std::shared_ptr<TrainingCommunicator> communicator,
                    const std::string& commandLine) {
    TrainCommandLine parsed;
    try {
        parsed = parseTrainCommandLine(args, commandLine);
    } catch (const std::invalid_argument& e) {
        std::cerr << "flashipa-train: " << e.what() << "\n" << trainUsage();
        return 2;
    }
    if (parsed.help) {
        std::cout << trainUsage();
        return 0;
    }
    const TrainerOptions& options = parsed.options;
    if (parsed.threads > 0)
        torch::set_num_threads(parsed.threads);
    const std::string who = communicator ? "process " + std::to_string(communicator->rank()) + " of " +
                                               std::to_string(communicator->worldSize()) + ": "
                                         : std::string();
    try {
        Trainer trainer(options, communicator);
        const TrainerOptions& o = trainer.options();
        if (o.verbose) {
            const Dataset& d = trainer.dataset();
            int64_t parameters = 0;
            for (const auto& p : trainer.model()->parameters())
                parameters += p.numel();
            std::cout << (options.resume ? "resuming at step " + std::to_string(trainer.step()) : std::string("new run")) << ": "
                      << d.numChains() << " chains (" << d.chains(DatasetSplit::Train).size() << " train, "
                      << d.chains(DatasetSplit::Validation).size() << " validation), " << d.numResidues() << " residues; model "
                      << parameters << " parameters; batch " << trainer.globalBatchSize();
            if (trainer.worldSize() > 1)
                std::cout << " (" << trainer.worldSize() << " processes x " << o.batchSize << ")";
            std::cout << ", crop " << o.crop << ", " << (o.dtype == torch::kFloat64 ? "float64" : "float32") << " on " << o.device
                      << "; sigma " << o.model.sigmaMin << "-" << o.model.sigmaMax << " nm" << std::endl;
        }
        trainer.run();
    } catch (const std::exception& e) {
        std::cerr << "flashipa-train: " << who << e.what() << std::endl;
        return 1;
    }
    return 0;
}

} // namespace FlashIPAPlugin
