#include "flashipa/ModelConfig.h"
#include <cmath>
#include <stdexcept>
#include <vector>

namespace FlashIPAPlugin {

namespace {
// One table drives validation and (de)serialisation, so a new field cannot be forgotten in one of them.
// The maxima are far above any trained model and keep a damaged or hostile checkpoint's metadata from
// asking for an unbounded allocation before its tensors are compared with the architecture.
struct IntField {
    const char* name;
    int ModelConfig::*member;
    int minimum, maximum;
    bool optional = false; ///< may be absent from metadata (fields added later); then it reads as 0
};
const std::vector<IntField>& intFields() {
    static const std::vector<IntField> fields = {
        {"nodeDim", &ModelConfig::nodeDim, 1, 4096},          {"headDim", &ModelConfig::headDim, 1, 512},
        {"numHeads", &ModelConfig::numHeads, 1, 128},         {"queryPoints", &ModelConfig::queryPoints, 1, 64},
        {"valuePoints", &ModelConfig::valuePoints, 1, 64},    {"pairRank", &ModelConfig::pairRank, 0, 64},
        {"pairDim", &ModelConfig::pairDim, 1, 1024},          {"relPosFrequencies", &ModelConfig::relPosFrequencies, 0, 256},
        {"numBlocks", &ModelConfig::numBlocks, 1, 128},       {"transitionFactor", &ModelConfig::transitionFactor, 1, 16},
        {"sigmaFeatures", &ModelConfig::sigmaFeatures, 1, 256},
        {"geometryPrior", &ModelConfig::geometryPrior, 0, 6, true},
    };
    return fields;
}
struct DoubleField {
    const char* name;
    double ModelConfig::*member;
};
const std::vector<DoubleField>& doubleFields() {
    static const std::vector<DoubleField> fields = {{"sigmaMin", &ModelConfig::sigmaMin}, {"sigmaMax", &ModelConfig::sigmaMax}};
    return fields;
}
const std::string& lookup(const std::map<std::string, std::string>& metadata, const std::string& key) {
    auto it = metadata.find(key);
    if (it == metadata.end())
        throw std::invalid_argument("model configuration: metadata lacks '" + key + "'");
    return it->second;
}
} // namespace

int ModelConfig::pairValueDim() const { return pairRank > 0 ? std::max(1, pairDim / 4) : 0; }

int ModelConfig::biasRank() const { return pairRank + 2 * relPosFrequencies; }

void ModelConfig::validate() const {
    for (const auto& f : intFields())
        if (this->*(f.member) < f.minimum || this->*(f.member) > f.maximum)
            throw std::invalid_argument("model configuration: " + std::string(f.name) + " = " +
                                        std::to_string(this->*(f.member)) + " must lie in [" + std::to_string(f.minimum) +
                                        ", " + std::to_string(f.maximum) + "]");
    if (!(sigmaMin > 0 && sigmaMax > sigmaMin) || !std::isfinite(sigmaMax))
        throw std::invalid_argument("model configuration: need 0 < sigmaMin < sigmaMax (nm)");
}

std::map<std::string, std::string> ModelConfig::toMetadata() const {
    std::map<std::string, std::string> out;
    for (const auto& f : intFields())
        out["config." + std::string(f.name)] = std::to_string(this->*(f.member));
    for (const auto& f : doubleFields()) {
        char buffer[64];
        snprintf(buffer, sizeof(buffer), "%.17g", this->*(f.member));
        out["config." + std::string(f.name)] = buffer;
    }
    return out;
}

ModelConfig ModelConfig::fromMetadata(const std::map<std::string, std::string>& metadata) {
    ModelConfig config;
    for (const auto& f : intFields()) {
        const std::string key = "config." + std::string(f.name);
        if (f.optional && !metadata.count(key)) {
            config.*(f.member) = 0;
            continue;
        }
        const std::string& text = lookup(metadata, key);
        size_t used = 0;
        try {
            config.*(f.member) = std::stoi(text, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (used == 0 || used != text.size())
            throw std::invalid_argument("model configuration: '" + key + "' = '" + text + "' is not an integer");
    }
    for (const auto& f : doubleFields()) {
        const std::string key = "config." + std::string(f.name);
        const std::string& text = lookup(metadata, key);
        size_t used = 0;
        try {
            config.*(f.member) = std::stod(text, &used);
        } catch (const std::exception&) {
            used = 0;
        }
        if (used == 0 || used != text.size())
            throw std::invalid_argument("model configuration: '" + key + "' = '" + text + "' is not a number");
    }
    config.validate();
    return config;
}

} // namespace FlashIPAPlugin
