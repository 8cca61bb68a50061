#include "FlashIPAForceProxy.h"
#include "FlashIPAForce.h"
#include "openmm/OpenMMException.h"
#include "openmm/serialization/SerializationNode.h"
#include "openmm/serialization/SerializationProxy.h"
#include <filesystem>
#include <memory>

using namespace FlashIPAPlugin;
using namespace OpenMM;

namespace {
constexpr int ProxyVersion = 2; // 2: degenerateFramePolicy and residue labels (version 1 files read as "error", no labels)
}

FlashIPAForceProxy::FlashIPAForceProxy() : SerializationProxy("FlashIPAForce") {}

void FlashIPAForceProxy::serialize(const void* object, SerializationNode& node) const {
    node.setIntProperty("version", ProxyVersion);
    const FlashIPAForce& force = *reinterpret_cast<const FlashIPAForce*>(object);
    // An absolute path: the XML may be read from another working directory ("" stays the shipped model).
    const std::string& path = force.getModelPath();
    node.setStringProperty("modelPath", path.empty() ? path : std::filesystem::absolute(path).lexically_normal().string());
    node.setStringProperty("modelSha256", force.getModelChecksum());
    node.setStringProperty("attentionBackend", force.getAttentionBackend());
    node.setStringProperty("degenerateFramePolicy", force.getDegenerateFramePolicy());
    node.setIntProperty("forceGroup", force.getForceGroup());
    node.setStringProperty("name", force.getName());
    node.setDoubleProperty("defaultScale", force.getDefaultScale());
    node.setDoubleProperty("defaultSigma", force.getDefaultSigma());
    node.setDoubleProperty("defaultTemperature", force.getDefaultTemperature());
    SerializationNode& properties = node.createChildNode("Properties");
    for (const auto& [name, value] : force.getProperties())
        properties.createChildNode("Property").setStringProperty("name", name).setStringProperty("value", value);
    SerializationNode& residues = node.createChildNode("Residues");
    for (int i = 0; i < force.getNumResidues(); i++) {
        int a, b, c, type, chain;
        force.getResidueParameters(i, a, b, c, type, chain);
        SerializationNode& residue = residues.createChildNode("Residue")
                                         .setIntProperty("a", a)
                                         .setIntProperty("b", b)
                                         .setIntProperty("c", c)
                                         .setIntProperty("type", type)
                                         .setIntProperty("chain", chain);
        if (!force.getResidueLabel(i).empty())
            residue.setStringProperty("label", force.getResidueLabel(i));
    }
}

void* FlashIPAForceProxy::deserialize(const SerializationNode& node) const {
    int version = node.getIntProperty("version");
    if (version < 1 || version > ProxyVersion)
        throw OpenMMException("FlashIPAForce XML: unsupported version " + std::to_string(version));
    auto force = std::make_unique<FlashIPAForce>(node.getStringProperty("modelPath"));
    const std::string recorded = node.getStringProperty("modelSha256");
    if (force->getModelChecksum() != recorded)
        throw OpenMMException("FlashIPAForce XML: the model file '" + force->getResolvedModelPath() + "' has SHA-256 " +
                              force->getModelChecksum() + " but the XML was written for " + recorded +
                              " (the checkpoint changed since serialisation)");
    force->setAttentionBackend(node.getStringProperty("attentionBackend"));
    if (version >= 2)
        force->setDegenerateFramePolicy(node.getStringProperty("degenerateFramePolicy"));
    force->setForceGroup(node.getIntProperty("forceGroup"));
    force->setName(node.getStringProperty("name"));
    force->setDefaultScale(node.getDoubleProperty("defaultScale"));
    force->setDefaultSigma(node.getDoubleProperty("defaultSigma"));
    force->setDefaultTemperature(node.getDoubleProperty("defaultTemperature"));
    for (const SerializationNode& property : node.getChildNode("Properties").getChildren())
        force->setProperty(property.getStringProperty("name"), property.getStringProperty("value"));
    for (const SerializationNode& residue : node.getChildNode("Residues").getChildren()) {
        int index = force->addResidue(residue.getIntProperty("a"), residue.getIntProperty("b"), residue.getIntProperty("c"),
                                      residue.getIntProperty("type"), residue.getIntProperty("chain"));
        if (residue.hasProperty("label"))
            force->setResidueLabel(index, residue.getStringProperty("label"));
    }
    return force.release();
}
