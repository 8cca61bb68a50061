#include "flashipa/DefaultModel.h"
#include <cstdlib>
#include <dlfcn.h>
#include <fstream>
#include <stdexcept>

namespace FlashIPAPlugin {

std::string defaultModelPath() {
    std::string path;
    if (const char* fromEnvironment = std::getenv("FLASHIPA_DEFAULT_MODEL"); fromEnvironment && *fromEnvironment)
        path = fromEnvironment;
    else {
        // The checkpoint is installed beside this library; find the library's own folder.
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(&defaultModelPath), &info) == 0 || info.dli_fname == nullptr)
            throw std::runtime_error("cannot locate libFlashIPAModels to find the default model; set FLASHIPA_DEFAULT_MODEL");
        std::string library = info.dli_fname;
        size_t slash = library.find_last_of('/');
        path = (slash == std::string::npos ? std::string(".") : library.substr(0, slash)) + "/" + DefaultModelFileName;
    }
    if (!std::ifstream(path).good())
        throw std::runtime_error("the default FlashIPA model '" + path + "' does not exist (was the package built completely?)");
    return path;
}

std::string resolveModelPath(const std::string& modelPath) {
    return modelPath.empty() ? defaultModelPath() : modelPath;
}

} // namespace FlashIPAPlugin
