#ifndef FLASHIPA_DEFAULT_MODEL_H_
#define FLASHIPA_DEFAULT_MODEL_H_

#include <string>

namespace FlashIPAPlugin {

/** File name of the shipped model, installed next to libFlashIPAModels. */
constexpr const char* DefaultModelFileName = "flashipa-default.safetensors";

/**
 * Where the shipped model is: $FLASHIPA_DEFAULT_MODEL if set, else DefaultModelFileName in the folder
 * holding libFlashIPAModels. Throws std::runtime_error if the file does not exist.
 */
std::string defaultModelPath();

/** modelPath itself, or defaultModelPath() when modelPath is empty. */
std::string resolveModelPath(const std::string& modelPath);

} // namespace FlashIPAPlugin

#endif
