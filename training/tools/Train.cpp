// flashipa-train: trains the EnergyModel by denoising score matching (training/include/flashipa/Trainer.h).
// Runs in chunks: --max-minutes stops after a checkpoint, --resume continues exactly where it stopped.
// The options are parsed by training/src/TrainCommand.cpp, which the data-parallel launcher's processes share.
#include "flashipa/TrainCommand.h"
#include <string>
#include <vector>

int main(int argc, char** argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    return FlashIPAPlugin::runTrainCommand(args, nullptr, FlashIPAPlugin::quotedCommandLine(std::vector<std::string>(argv, argv + argc)));
}
