#include "FlashIPAForce.h"
#include "internal/FlashIPAForceImpl.h"
#include "flashipa/AttentionBackend.h"
#include "flashipa/Checkpoint.h"
#include "flashipa/DefaultModel.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include <cmath>

using namespace FlashIPAPlugin;
using OpenMM::OpenMMException;

FlashIPAForce::FlashIPAForce(const std::string& modelPath)
    : modelPath(modelPath), attentionBackend("auto"), degenerateFramePolicy("error"), defaultScale(1.0), defaultSigma(0.05), defaultTemperature(300.0) {
    try {
        modelChecksum = sha256File(resolveModelPath(modelPath));
    } catch (const std::exception& e) {
        throw OpenMMException(std::string("FlashIPAForce: ") + e.what());
    }
}

std::string FlashIPAForce::getResolvedModelPath() const {
    try {
        return resolveModelPath(modelPath);
    } catch (const std::exception& e) {
        throw OpenMMException(std::string("FlashIPAForce: ") + e.what());
    }
}

int FlashIPAForce::addResidue(int atomA, int atomB, int atomC, int residueType, int chain) {
    residues.push_back({atomA, atomB, atomC, residueType, chain, ""});
    return residues.size() - 1;
}

void FlashIPAForce::checkIndex(int index) const {
    if (index < 0 || index >= (int) residues.size())
        throw OpenMMException("FlashIPAForce: residue index " + std::to_string(index) + " out of range [0, " +
                              std::to_string(residues.size()) + ")");
}

void FlashIPAForce::getResidueParameters(int index, int& atomA, int& atomB, int& atomC, int& residueType, int& chain) const {
    checkIndex(index);
    const Residue& r = residues[index];
    atomA = r.atomA;
    atomB = r.atomB;
    atomC = r.atomC;
    residueType = r.type;
    chain = r.chain;
}

void FlashIPAForce::setResidueParameters(int index, int atomA, int atomB, int atomC, int residueType, int chain) {
    checkIndex(index);
    Residue& r = residues[index];
    r.atomA = atomA;
    r.atomB = atomB;
    r.atomC = atomC;
    r.type = residueType;
    r.chain = chain;
}

void FlashIPAForce::setResidueLabel(int index, const std::string& label) {
    checkIndex(index);
    residues[index].label = label;
}

const std::string& FlashIPAForce::getResidueLabel(int index) const {
    checkIndex(index);
    return residues[index].label;
}

std::string FlashIPAForce::describeResidue(int index) const {
    std::string text = "residue " + std::to_string(index);
    if (index >= 0 && index < (int) residues.size() && !residues[index].label.empty())
        text += " (" + residues[index].label + ")";
    return text;
}

void FlashIPAForce::setAttentionBackend(const std::string& backend) {
    try {
        parseAttentionBackend(backend);
    } catch (const std::exception& e) {
        throw OpenMMException(std::string("FlashIPAForce: ") + e.what());
    }
    attentionBackend = backend;
}

void FlashIPAForce::setDegenerateFramePolicy(const std::string& policy) {
    if (policy != "error" && policy != "skip")
        throw OpenMMException("FlashIPAForce: the degenerate-frame policy must be \"error\" or \"skip\", not \"" + policy + "\"");
    degenerateFramePolicy = policy;
}

long long FlashIPAForce::getNumSkippedResidues(const OpenMM::Context& context) const {
    return dynamic_cast<const FlashIPAForceImpl&>(getImplInContext(context)).getNumSkippedResidues();
}

void FlashIPAForce::setProperty(const std::string& name, const std::string& value) {
    properties[name] = value;
}

const std::string& FlashIPAForce::Scale() {
    static const std::string name = "flashipaScale";
    return name;
}

const std::string& FlashIPAForce::Sigma() {
    static const std::string name = "flashipaSigma";
    return name;
}

const std::string& FlashIPAForce::Temperature() {
    static const std::string name = "flashipaTemperature";
    return name;
}

void FlashIPAForce::setDefaultScale(double scale) {
    if (!std::isfinite(scale))
        throw OpenMMException("FlashIPAForce: the scale must be finite");
    defaultScale = scale;
}

void FlashIPAForce::setDefaultSigma(double sigma) {
    if (!(sigma > 0) || !std::isfinite(sigma))
        throw OpenMMException("FlashIPAForce: sigma must be a positive number of nm");
    defaultSigma = sigma;
}

void FlashIPAForce::setDefaultTemperature(double temperature) {
    if (!(temperature > 0) || !std::isfinite(temperature))
        throw OpenMMException("FlashIPAForce: the temperature must be a positive number of kelvin");
    defaultTemperature = temperature;
}

void FlashIPAForce::updateParametersInContext(OpenMM::Context& context) {
    dynamic_cast<FlashIPAForceImpl&>(getImplInContext(context)).updateParametersInContext(getContextImpl(context));
}

OpenMM::ForceImpl* FlashIPAForce::createImpl() const {
    return new FlashIPAForceImpl(*this);
}
