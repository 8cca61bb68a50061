// Saving and loading EnergyModel checkpoints (safetensors + metadata). Loading never executes code:
// the architecture is rebuilt from the metadata, then every tensor is checked against it.
#include "flashipa/Checkpoint.h"
#include "flashipa/EnergyModel.h"
#include "flashipa/GeometryPrior.h"
#include <set>
#include <stdexcept>

namespace FlashIPAPlugin {

namespace {
const char* const FormatKey = "format";
const char* const FormatName = "openmm-flashipa-energy-model";
const char* const VersionKey = "format_version";
const char* const Version = "1";
} // namespace

void saveEnergyModel(EnergyModel& model, const std::string& path, const std::map<std::string, std::string>& extraMetadata) {
    std::map<std::string, std::string> metadata = extraMetadata;
    for (const auto& [key, value] : model->config().toMetadata())
        metadata[key] = value;
    metadata[FormatKey] = FormatName;
    metadata[VersionKey] = Version;
    metadata["units.length"] = "nm";
    metadata["units.energy"] = "kT";
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (const auto& item : model->named_parameters())
        tensors.emplace_back(item.key(), item.value().detach().to(torch::kCPU, torch::kFloat32));
    Safetensors::write(path, tensors, metadata);
}

EnergyModel loadEnergyModel(const std::string& path, std::map<std::string, std::string>* metadataOut) {
    SafetensorsContents contents = Safetensors::read(path);
    auto fail = [&](const std::string& cause) { throw std::runtime_error("model checkpoint '" + path + "': " + cause); };
    auto format = contents.metadata.find(FormatKey);
    if (format == contents.metadata.end() || format->second != FormatName)
        fail(std::string("not an openmm-flashipa energy model (metadata '") + FormatKey + "' must be '" + FormatName + "')");
    auto version = contents.metadata.find(VersionKey);
    if (version == contents.metadata.end() || version->second != Version)
        fail(std::string("unsupported format version (this build reads version ") + Version + ")");
    ModelConfig config;
    try {
        config = ModelConfig::fromMetadata(contents.metadata);
    } catch (const std::exception& e) {
        fail(e.what());
    }
    // The architecture must be exactly the stored tensors: compare sizes before building it, so a damaged
    // or hostile header cannot make the loader allocate more than the file holds.
    int64_t storedElements = 0;
    for (const auto& [name, value] : contents.tensors)
        storedElements += value.numel();
    const int64_t expectedElements = EnergyModelImpl::parameterCount(config);
    if (expectedElements != storedElements)
        fail("the metadata describes a model of " + std::to_string(expectedElements) + " parameters but the file stores " +
             std::to_string(storedElements) + " values");
    EnergyModel model(config);
    std::map<std::string, torch::Tensor> stored(contents.tensors.begin(), contents.tensors.end());
    std::set<std::string> used;
    torch::NoGradGuard noGrad;
    for (auto& item : model->named_parameters()) {
        auto it = stored.find(item.key());
        if (it == stored.end())
            fail("missing tensor '" + item.key() + "'");
        const torch::Tensor& value = it->second;
        if (value.scalar_type() != torch::kFloat32 && value.scalar_type() != torch::kFloat64)
            fail("tensor '" + item.key() + "' has dtype " + std::string(c10::toString(value.scalar_type())) + ", expected F32 or F64");
        if (value.sizes() != item.value().sizes())
            fail("tensor '" + item.key() + "' has shape " + c10::str(value.sizes()) + ", expected " + c10::str(item.value().sizes()));
        if (!torch::isfinite(value).all().item<bool>())
            fail("tensor '" + item.key() + "' holds non-finite values");
        item.value().copy_(value);
        used.insert(item.key());
    }
    for (const auto& [name, value] : contents.tensors)
        if (!used.count(name))
            fail("unexpected tensor '" + name + "' (not part of the architecture in the metadata)");
    if (model->geometryPriorPairs.defined()) {
        if (!torch::equal(model->geometryPriorPairs, GeometryPrior::pairTable(model->geometryPriorPairs.options())))
            fail("tensor 'geometryPriorPairs' lists other atom pairs than this build's geometry prior (GeometryPrior.cpp)");
        if (!(model->geometryPriorStats > 0).all().item<bool>())
            fail("tensor 'geometryPriorStats' must be positive (d0, s0 in nm)");
        if (model->geometryPriorBondCovariance.defined()) {
            torch::Tensor c = model->geometryPriorBondCovariance.to(torch::kFloat64);
            if (!GeometryPrior::isPositiveDefiniteBondCovariance(c[0].item<double>(), c[1].item<double>(), c[2].item<double>()))
                fail("tensor 'geometryPriorBondCovariance' does not define a positive definite chain covariance");
        }
    }
    if (metadataOut)
        *metadataOut = contents.metadata;
    return model;
}

} // namespace FlashIPAPlugin
