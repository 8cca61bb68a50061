#include "ReferenceFlashIPAKernels.h"
#include "flashipa/DefaultModel.h"
#include "flashipa/FrameBuilder.h"
#include "internal/ReleasedGIL.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/reference/ReferencePlatform.h"

using namespace FlashIPAPlugin;
using namespace OpenMM;

namespace {
ReferencePlatform::PlatformData& platformData(ContextImpl& context) {
    return *reinterpret_cast<ReferencePlatform::PlatformData*>(context.getPlatformData());
}
} // namespace

void ReferenceCalcFlashIPAForceKernel::initialize(const System& system, const FlashIPAForce& force) {
    // "auto" becomes sdpa here (CPU, double precision).
    const AttentionBackend backend = resolveAttentionBackend(parseAttentionBackend(force.getAttentionBackend()), false, true);
    if (isFusedBackend(backend))
        throw OpenMMException("FlashIPAForce: the \"" + force.getAttentionBackend() +
                              "\" attention backend needs the CUDA platform; use \"auto\", \"sdpa\" or \"math\" on Reference");
    try {
        EnergyModel model = loadEnergyModel(resolveModelPath(force.getModelPath()));
        evaluator = std::make_unique<ForceEvaluator>(model, torch::kCPU, torch::kFloat64, backend);
        evaluator->setSkipDegenerateFrames(force.getDegenerateFramePolicy() == "skip");
    } catch (const std::exception& e) {
        throw OpenMMException(std::string("FlashIPAForce: ") + e.what());
    }
    setResidues(force);
}

void ReferenceCalcFlashIPAForceKernel::setResidues(const FlashIPAForce& force) {
    std::vector<int64_t> atoms, types, chains;
    frameAtoms.clear();
    for (int i = 0; i < force.getNumResidues(); i++) {
        int a, b, c, type, chain;
        force.getResidueParameters(i, a, b, c, type, chain);
        for (int atom : {a, b, c}) {
            atoms.push_back(atom);
            frameAtoms.push_back(atom);
        }
        types.push_back(type);
        chains.push_back(chain);
    }
    evaluator->setResidues(atoms, types, chains);
    recordResidueNames(force);
}

double ReferenceCalcFlashIPAForceKernel::execute(ContextImpl& context, bool includeForces, bool includeEnergy) {
    ReferencePlatform::PlatformData& data = platformData(context);
    const std::vector<Vec3>& positions = *data.positions;
    // Reference keeps positions as integrated (never wrapped), so chains arrive whole.
    torch::Tensor positionTensor = torch::from_blob((void*) positions.data(), {(int64_t) positions.size(), 3}, torch::kFloat64);
    const GlobalParameters globals = readGlobalParameters(context);
    const double scale = globals.scale, sigma = globals.sigma, temperature = globals.temperature;
    warnIfSigmaUntrained(sigma, evaluator->model()->config().sigmaMin, evaluator->model()->config().sigmaMax);
    ForceEvaluation result;
    try {
        ReleasedGIL released; // LibTorch's autograd engine refuses a thread that holds Python's GIL (ReleasedGIL.h)
        result = evaluator->evaluate(positionTensor, scale, sigma, temperature, includeForces);
    } catch (const DegenerateFrameError& e) {
        throw OpenMMException(degenerateFrameMessage(e.residue, e.problem));
    } catch (const std::exception& e) {
        throw OpenMMException(std::string("FlashIPAForce: ") + e.what());
    }
    if (result.skippedResidues > 0) {
        skippedResidues += result.skippedResidues;
        warnSkippedResidues();
    }
    if (includeForces) {
        std::vector<Vec3>& forces = *data.forces;
        torch::Tensor f = result.frameAtomForces.contiguous();
        const double* values = f.data_ptr<double>();
        for (size_t i = 0; i < frameAtoms.size(); i++)
            forces[frameAtoms[i]] += Vec3(values[3 * i], values[3 * i + 1], values[3 * i + 2]);
        std::map<std::string, double>& derivatives = *data.energyParameterDerivatives;
        derivatives[FlashIPAForce::Scale()] += result.dEnergyDScale;
        derivatives[FlashIPAForce::Sigma()] += result.dEnergyDSigma;
        derivatives[FlashIPAForce::Temperature()] += result.dEnergyDTemperature;
    }
    return result.energy;
}

void ReferenceCalcFlashIPAForceKernel::copyParametersToContext(ContextImpl& context, const FlashIPAForce& force) {
    if (force.getNumResidues() != evaluator->numResidues())
        throw OpenMMException("FlashIPAForce: updateParametersInContext cannot change the number of residues");
    setResidues(force);
}
