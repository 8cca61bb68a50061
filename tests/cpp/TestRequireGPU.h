#ifndef FLASHIPA_TEST_REQUIRE_GPU_H_
#define FLASHIPA_TEST_REQUIRE_GPU_H_
// Skipping a test that needs the fused CUDA kernels where the machine or the build has none (CI has no GPU).

#include "flashipa/FusedAttention.h"
#include <gtest/gtest.h>
#include <torch/torch.h>

namespace FlashIPATest {

/** Whether this build has the fused kernels and this machine a CUDA device to run them. */
inline bool haveFusedKernelsAndGPU() {
    return FlashIPAPlugin::fusedAttentionAvailable() && torch::cuda::is_available();
}

} // namespace FlashIPATest

#define REQUIRE_GPU()                                                        \
    if (!FlashIPATest::haveFusedKernelsAndGPU())                             \
    GTEST_SKIP() << "no CUDA device or no fused kernels in this build"

#endif
