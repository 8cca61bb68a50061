#include "CudaCalcFlashIPAForceKernel.h"
#include "flashipa/FusedAttention.h"
#include "FlashIPAForceInfo.h"
#include "flashipa/DefaultModel.h"
#include "flashipa/FrameBuilder.h"
#include "internal/ReleasedGIL.h"
#include "openmm/OpenMMException.h"
#include "openmm/common/ContextSelector.h"
#include "openmm/internal/ContextImpl.h"
#include <c10/cuda/CUDAGuard.h>
#include <iostream>

using namespace FlashIPAPlugin;
using namespace OpenMM;

namespace {
void checkDriver(CUresult result, const char* what) {
    if (result != CUDA_SUCCESS) {
        const char* message = nullptr;
        cuGetErrorString(result, &message);
        throw OpenMMException(std::string("FlashIPAForce (CUDA): ") + what + ": " + (message ? message : "unknown error"));
    }
}

void checkRuntime(cudaError_t result, const char* what) {
    if (result != cudaSuccess)
        throw OpenMMException(std::string("FlashIPAForce (CUDA): ") + what + ": " + cudaGetErrorString(result));
}

/** Makes the device's primary context (LibTorch's) current for a scope, restoring OpenMM's after. */
class PrimaryContextScope {
public:
    explicit PrimaryContextScope(CUcontext primary) {
        checkDriver(cuCtxPushCurrent(primary), "cuCtxPushCurrent");
    }
    ~PrimaryContextScope() {
        CUcontext popped;
        cuCtxPopCurrent(&popped);
    }
};

bool parseBoolProperty(const std::map<std::string, std::string>& properties, const std::string& name, bool fallback) {
    auto it = properties.find(name);
    if (it == properties.end())
        return fallback;
    std::string value = it->second;
    for (char& c : value)
        c = std::tolower(c);
    if (value == "true" || value == "1")
        return true;
    if (value == "false" || value == "0")
        return false;
    throw OpenMMException("FlashIPAForce: property " + name + " must be \"true\" or \"false\", not \"" + it->second + "\"");
}
} // namespace

CudaCalcFlashIPAForceKernel::CudaCalcFlashIPAForceKernel(std::string name, const Platform& platform, CudaContext& cu)
    : CalcFlashIPAForceKernel(name, platform), cu(cu), device(torch::kCUDA, cu.getDeviceIndex()),
      dtype(cu.getUseDoublePrecision() ? torch::kFloat64 : torch::kFloat32) {}

CudaCalcFlashIPAForceKernel::~CudaCalcFlashIPAForceKernel() {
    // Destruction must not throw; release LibTorch state in its context, OpenMM's event in OpenMM's.
    if (primaryContext == nullptr)
        return;
    try {
        PrimaryContextScope scope(primaryContext);
        graph.reset();
        outputs = DeviceForceEvaluation();
        atoms = parameters = sortedIndex = frameAtomIndices = torch::Tensor();
        evaluator.reset();
        if (modelDone)
            cuEventDestroy(modelDone);
        if (invalidFlagHost)
            cudaFreeHost(invalidFlagHost);
    } catch (...) {
    }
    if (openmmReady) {
        ContextSelector selector(cu);
        cuEventDestroy(openmmReady);
    }
    cuDevicePrimaryCtxRelease(cu.getDevice());
}

void CudaCalcFlashIPAForceKernel::initialize(const System& system, const FlashIPAForce& force) {
    // "auto" is settled once here: fused in single and mixed precision, sdpa in double.
    const AttentionBackend backend = resolveAttentionBackend(parseAttentionBackend(force.getAttentionBackend()), true, dtype == torch::kFloat64);
    if (isFusedBackend(backend) && dtype == torch::kFloat64)
        throw OpenMMException("FlashIPAForce: the \"" + force.getAttentionBackend() + "\" attention backend runs in single precision "
                              "(float32 or bfloat16); use \"auto\", \"sdpa\" or \"math\" with Precision=double");
    if (isFusedBackend(backend) && !fusedAttentionAvailable())
        throw OpenMMException("FlashIPAForce: this build has no fused attention kernels; use \"sdpa\" or \"math\"");
    useGraphs = parseBoolProperty(force.getProperties(), "useCUDAGraphs", true);
    for (const std::string& name : {FlashIPAForce::Scale(), FlashIPAForce::Sigma(), FlashIPAForce::Temperature()})
        cu.addEnergyParameterDerivative(name);
    cu.addForce(new FlashIPAForceInfo(force));
    {
        ContextSelector selector(cu);
        checkDriver(cuEventCreate(&openmmReady, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
    }
    checkDriver(cuDevicePrimaryCtxRetain(&primaryContext, cu.getDevice()), "cuDevicePrimaryCtxRetain");
    PrimaryContextScope scope(primaryContext);
    try {
        EnergyModel model = loadEnergyModel(resolveModelPath(force.getModelPath()));
        evaluator = std::make_unique<ForceEvaluator>(model, device, dtype, backend);
        skipDegenerate = force.getDegenerateFramePolicy() == "skip";
        evaluator->setSkipDegenerateFrames(skipDegenerate);
    } catch (const std::exception& e) {
        throw OpenMMException(std::string("FlashIPAForce: ") + e.what());
    }
    stream = std::make_unique<c10::cuda::CUDAStream>(c10::cuda::getStreamFromPool(false, device.index()));
    checkDriver(cuEventCreate(&modelDone, CU_EVENT_DISABLE_TIMING), "cuEventCreate");
    checkRuntime(cudaHostAlloc((void**) &invalidFlagHost, sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
    *invalidFlagHost = 0;
    checkRuntime(cudaHostGetDevicePointer((void**) &invalidFlagDevice, invalidFlagHost, 0), "cudaHostGetDevicePointer");
    sortedIndex = torch::zeros({cu.getNumAtoms()}, torch::TensorOptions().dtype(torch::kInt32).device(device));
    skippedTotal = torch::zeros({}, torch::TensorOptions().dtype(torch::kInt64).device(device));
    setResidues(force);
}

void CudaCalcFlashIPAForceKernel::setResidues(const FlashIPAForce& force) {
    // Called with the primary context current.
    std::vector<int64_t> frameAtoms, types, chains;
    for (int i = 0; i < force.getNumResidues(); i++) {
        int a, b, c, type, chain;
        force.getResidueParameters(i, a, b, c, type, chain);
        frameAtoms.insert(frameAtoms.end(), {a, b, c});
        types.push_back(type);
        chains.push_back(chain);
    }
    c10::cuda::CUDAStreamGuard guard(*stream);
    evaluator->setResidues(frameAtoms, types, chains);
    recordResidueNames(force);
    numFrameAtoms = frameAtoms.size();
    frameAtomIndices = torch::tensor(frameAtoms, torch::kInt64).to(torch::kInt32).to(device);
    atoms = torch::zeros({(int64_t) types.size(), 3, 3}, torch::TensorOptions().dtype(dtype).device(device));
    parameters = torch::zeros({3}, torch::TensorOptions().dtype(dtype).device(device));
    graph.reset(); // shapes or residues changed: capture again
    warmupEvaluations = 0;
    stream->synchronize();
}

void CudaCalcFlashIPAForceKernel::evaluateModel() {
    ReleasedGIL released; // LibTorch's autograd engine refuses a thread that holds Python's GIL (ReleasedGIL.h)
    auto run = [&] {
        outputs = evaluator->evaluateOnDevice(atoms, parameters);
        if (skipDegenerate)
            skippedTotal.add_(outputs.skippedResidues); // in place on a persistent tensor: captured with the graph
    };
    if (!useGraphs) {
        run();
        return;
    }
    if (graph) {
        graph->replay();
        return;
    }
    if (warmupEvaluations < 2) {
        // Eager evaluations first: LibTorch initialises cuBLAS handles and caches outside any capture.
        run();
        warmupEvaluations++;
        return;
    }
    graph = std::make_unique<at::cuda::CUDAGraph>();
    graph->capture_begin();
    try {
        run();
        graph->capture_end();
    } catch (const std::exception& e) {
        // Never leave the stream capturing (every later CUDA call in the process would fail, OpenMM's
        // own frees included): end the capture, drop the graph and evaluate eagerly from now on.
        try {
            graph->capture_end();
        } catch (...) {
        }
        cudaGetLastError();
        graph.reset();
        useGraphs = false;
        std::cerr << "FlashIPAForce warning: capturing the model in a CUDA graph failed (" << e.what()
                  << "); evaluating without graphs from now on." << std::endl;
        run();
        return;
    }
    graph->replay();
}

void CudaCalcFlashIPAForceKernel::throwIfInvalid() {
    if (*(volatile int*) invalidFlagHost == 0)
        return;
    *invalidFlagHost = 0;
    if (skipDegenerate) {
        warnSkippedResidues(); // the residues were left out, the evaluation stands
        return;
    }
    // Find which residue, from the positions of the evaluation that raised the flag.
    PrimaryContextScope scope(primaryContext);
    torch::Tensor host = atoms.to(torch::kCPU);
    try {
        FrameBuilder::check(host);
    } catch (const DegenerateFrameError& e) {
        throw OpenMMException(degenerateFrameMessage(e.residue, e.problem));
    }
    throw OpenMMException("FlashIPAForce: a residue's frame atoms were coincident, collinear or non-finite (detected on the GPU)");
}

double CudaCalcFlashIPAForceKernel::execute(ContextImpl& context, bool includeForces, bool includeEnergy) {
    throwIfInvalid(); // from an earlier evaluation; reading the mapped flag does not wait for the GPU
    if (!derivativeIndicesKnown) {
        const std::vector<std::string>& names = cu.getEnergyParamDerivNames();
        const std::string ours[3] = {FlashIPAForce::Scale(), FlashIPAForce::Sigma(), FlashIPAForce::Temperature()};
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < (int) names.size(); j++)
                if (names[j] == ours[i])
                    derivativeIndex[i] = j;
        derivativeIndicesKnown = true;
    }
    const GlobalParameters globals = readGlobalParameters(context);
    const double scale = globals.scale, sigma = globals.sigma, temperature = globals.temperature;
    warnIfSigmaUntrained(sigma, evaluator->model()->config().sigmaMin, evaluator->model()->config().sigmaMax);

    CUstream openmmStream = cu.getCurrentStream();
    {
        ContextSelector selector(cu);
        checkDriver(cuEventRecord(openmmReady, openmmStream), "cuEventRecord");
    }
    {
        PrimaryContextScope scope(primaryContext);
        c10::cuda::CUDAStreamGuard guard(*stream);
        cudaStream_t torchStream = stream->stream();
        checkRuntime(cudaStreamWaitEvent(torchStream, (cudaEvent_t) openmmReady, 0), "cudaStreamWaitEvent");
        const PositionLayout layout = cu.getUseDoublePrecision() ? PositionLayout::Double
                                      : cu.getUseMixedPrecision() ? PositionLayout::Mixed
                                                                  : PositionLayout::Single;
        try {
            launchInvertAtomOrder((const int*) cu.getAtomIndexArray().getDevicePointer(), cu.getNumAtoms(),
                                  sortedIndex.data_ptr<int>(), torchStream);
            launchGatherFrameAtoms(layout, (const void*) cu.getPosq().getDevicePointer(),
                                   layout == PositionLayout::Mixed ? (const void*) cu.getPosqCorrection().getDevicePointer() : nullptr,
                                   sortedIndex.data_ptr<int>(), frameAtomIndices.data_ptr<int>(), numFrameAtoms,
                                   dtype == torch::kFloat64, atoms.data_ptr(), parameters.data_ptr(), scale, sigma, temperature,
                                   torchStream);
            evaluateModel();
            launchScatterForces(outputs.frameAtomForces.data_ptr(), outputs.energy.data_ptr(), outputs.parameterDerivatives.data_ptr(),
                                outputs.invalid.data_ptr<bool>(), dtype == torch::kFloat64, sortedIndex.data_ptr<int>(),
                                frameAtomIndices.data_ptr<int>(), numFrameAtoms, cu.getPaddedNumAtoms(),
                                (unsigned long long*) cu.getLongForceBuffer().getDevicePointer(), includeForces,
                                (void*) cu.getEnergyBuffer().getDevicePointer(), (void*) cu.getEnergyParamDerivBuffer().getDevicePointer(),
                                cu.getUseDoublePrecision() || cu.getUseMixedPrecision(), derivativeIndex[0], derivativeIndex[1],
                                derivativeIndex[2], invalidFlagDevice, torchStream);
        } catch (const OpenMMException&) {
            throw;
        } catch (const std::exception& e) {
            throw OpenMMException(std::string("FlashIPAForce (CUDA): ") + e.what());
        }
        checkDriver(cuEventRecord(modelDone, (CUstream) torchStream), "cuEventRecord");
        if (includeEnergy) {
            // OpenMM is about to wait for the energy anyway: wait here and report bad frames at once.
            checkDriver(cuEventSynchronize(modelDone), "cuEventSynchronize");
        }
    }
    {
        ContextSelector selector(cu);
        checkDriver(cuStreamWaitEvent(openmmStream, modelDone, 0), "cuStreamWaitEvent");
    }
    if (includeEnergy)
        throwIfInvalid();
    return 0.0; // the energy went into OpenMM's energy buffer on the GPU
}

long long CudaCalcFlashIPAForceKernel::getNumSkippedResidues() const {
    PrimaryContextScope scope(primaryContext);
    c10::cuda::CUDAStreamGuard guard(*stream);
    return skippedTotal.item<int64_t>(); // waits for the kernel's stream
}

void CudaCalcFlashIPAForceKernel::copyParametersToContext(ContextImpl& context, const FlashIPAForce& force) {
    if (force.getNumResidues() != evaluator->numResidues())
        throw OpenMMException("FlashIPAForce: updateParametersInContext cannot change the number of residues");
    PrimaryContextScope scope(primaryContext);
    setResidues(force);
}
