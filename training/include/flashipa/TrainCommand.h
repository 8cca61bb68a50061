#ifndef FLASHIPA_TRAIN_COMMAND_H_
#define FLASHIPA_TRAIN_COMMAND_H_

#include "flashipa/Trainer.h"
#include <memory>
#include <string>
#include <vector>

namespace FlashIPAPlugin {

/** The command line of flashipa-train, parsed. */
struct TrainCommandLine {
    TrainerOptions options;
    int threads = 0;      ///< --threads (0: LibTorch's choice)
    bool help = false;    ///< --help: print trainUsage() and stop
};

/** The usage text of flashipa-train (also printed by `python -m openmmflashipa.train --help`). */
const std::string& trainUsage();

/**
 * Parses flashipa-train's options (args without the program name). Throws std::invalid_argument naming
 * the option on an unknown option, a missing or bad value, or a missing --out-dir / --data. options.commandLine
 * is set to commandLine, or to the shell-quoted args when commandLine is empty.
 */
TrainCommandLine parseTrainCommandLine(const std::vector<std::string>& args, const std::string& commandLine = "");

/**
 * flashipa-train as a function: parses args, trains (Trainer::run) and returns the process exit code
 * (0 done or stopped for a later --resume, 1 a failed run, 2 a bad command line), with errors on stderr
 * prefixed "flashipa-train:". With a communicator, this process is one of a data-parallel run
 * (docs/DESIGN-DECISIONS.md, "Data-parallel training"); its errors name the process's rank.
 */
int runTrainCommand(const std::vector<std::string>& args, std::shared_ptr<TrainingCommunicator> communicator = nullptr,
                    const std::string& commandLine = "");

/** args as one shell-quoted string (the provenance that checkpoints and models record). */
std::string quotedCommandLine(const std::vector<std::string>& args);

} // namespace FlashIPAPlugin

#endif
