// flashipa-init-model: writes a deterministically initialised (untrained) EnergyModel checkpoint.
// It stands in for the trained model until training produces one (docs/MODEL.md).
#include "flashipa/EnergyModel.h"
#include <cstring>
#include <iostream>

using namespace FlashIPAPlugin;

int main(int argc, char** argv) {
    uint64_t seed = 2025;
    std::string out;
    for (int i = 1; i < argc; i++) {
        if (!std::strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = std::stoull(argv[++i]);
        else if (!std::strcmp(argv[i], "--out") && i + 1 < argc)
            out = argv[++i];
        else {
            std::cerr << "usage: flashipa-init-model [--seed N] --out FILE.safetensors\n";
            return 2;
        }
    }
    if (out.empty()) {
        std::cerr << "flashipa-init-model: --out is required\n";
        return 2;
    }
    try {
        ModelConfig config;
        EnergyModel model(config);
        // Every parameter from one seeded generator: the file is the same on every machine. The output
        // projections are not left at zero, so the attention contributes to this untrained energy.
        randomizeParameters(*model, seed, 0.5);
        saveEnergyModel(model, out,
                        {{"provenance", "untrained deterministic initialisation: flashipa-init-model --seed " + std::to_string(seed)},
                         {"training", "none"}});
        std::cout << "wrote " << out << "\n";
    } catch (const std::exception& e) {
        std::cerr << "flashipa-init-model: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
