#ifndef FLASHIPA_FUSED_ATTENTION_LAUNCH_CUH_
#define FLASHIPA_FUSED_ATTENTION_LAUNCH_CUH_

// Host helpers shared by the forward and backward launchers.
#include "FusedAttentionTiles.cuh"
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

namespace FlashIPAPlugin {
namespace kernels {

inline void checkLaunch(cudaError_t status, const char* what) {
    if (status != cudaSuccess)
        throw std::runtime_error(std::string("fused FlashIPA attention (") + what + "): " + cudaGetErrorString(status));
}

/**
 * Raises a kernel's dynamic shared-memory limit to at least `bytes`, calling the runtime only when
 * the limit must grow: after the first call of a size nothing is configured at launch time, so the
 * launches can be captured in CUDA graphs.
 */
template <typename Kernel>
void allowSharedMemory(Kernel kernel, size_t bytes, const char* what) {
    static std::mutex mutex;
    static std::map<const void*, size_t> configured;
    std::lock_guard<std::mutex> lock(mutex);
    size_t& current = configured[reinterpret_cast<const void*>(kernel)];
    if (bytes <= current)
        return;
    checkLaunch(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) bytes), what);
    current = bytes;
}

/** What the launchers need to know of the current device: compute capability and the opt-in shared-memory limit per block. */
struct DeviceFacts {
    int major = 0, minor = 0, sharedMemoryOptin = 0;
};

/**
 * The current device's facts, queried once per device and cached: the "does this kernel apply"
 * checks run on every call (in the operator and again in the launchers), three runtime queries each.
 */
inline DeviceFacts currentDeviceFacts() {
    static std::mutex mutex;
    static std::map<int, DeviceFacts> known;
    int device = 0;
    checkLaunch(cudaGetDevice(&device), "device");
    std::lock_guard<std::mutex> lock(mutex);
    auto found = known.find(device);
    if (found != known.end())
        return found->second;
    DeviceFacts facts;
    checkLaunch(cudaDeviceGetAttribute(&facts.major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
    checkLaunch(cudaDeviceGetAttribute(&facts.minor, cudaDevAttrComputeCapabilityMinor, device), "compute capability");
    checkLaunch(cudaDeviceGetAttribute(&facts.sharedMemoryOptin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "shared memory limit");
    known[device] = facts;
    return facts;
}

/** Refuses problems the kernels cannot index or whose tensors are missing. */
inline void validateProblem(const FusedAttentionProblem& p) {
    if (p.rows < 0 || p.heads <= 0 || p.headDim <= 0 || p.queryPoints < 0 || p.valuePoints < 0 || p.biasRank < 0 ||
        p.pairRank < 0 || (p.pairRank > 0 && p.pairValueDim <= 0))
        throw std::invalid_argument("fused FlashIPA attention: sizes out of range");
    if (p.heads > 65535)
        throw std::invalid_argument("fused FlashIPA attention: at most 65535 heads");
    if (3 * p.queryPoints > 96)
        throw std::invalid_argument("fused FlashIPA attention: at most 32 query points per head");
    if (p.rows > 0 && (!p.q || !p.k || !p.v || !p.queryPointsGlobal || !p.keyPointsGlobal || !p.pointWeight || !p.segment ||
                       !p.keyBegin || !p.keyEnd || (p.valuePoints > 0 && !p.valuePointsGlobal) ||
                       (p.biasRank > 0 && (!p.biasLeft || !p.biasRight)) || (p.pairRank > 0 && !p.pairValues)))
        throw std::invalid_argument("fused FlashIPA attention: a required tensor is missing");
}

} // namespace kernels
} // namespace FlashIPAPlugin

#endif
