#include "CudaFlashIPAKernelFactory.h"
#include "CudaCalcFlashIPAForceKernel.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/internal/windowsExport.h"

using namespace FlashIPAPlugin;
using namespace OpenMM;

extern "C" OPENMM_EXPORT void registerPlatforms() {}

extern "C" OPENMM_EXPORT void registerKernelFactories() {
    try {
        Platform& platform = Platform::getPlatformByName("CUDA");
        platform.registerKernelFactory(CalcFlashIPAForceKernel::Name(), new CudaFlashIPAKernelFactory());
    } catch (const std::exception&) {
        // The CUDA platform is not available (no driver or GPU): nothing to register.
    }
}

/** For programs loading the plugin explicitly: same as registerKernelFactories(). */
extern "C" OPENMM_EXPORT void registerFlashIPACudaKernelFactories() {
    registerKernelFactories();
}

KernelImpl* CudaFlashIPAKernelFactory::createKernelImpl(std::string name, const Platform& platform, ContextImpl& context) const {
    CudaContext& cu = *static_cast<CudaPlatform::PlatformData*>(context.getPlatformData())->contexts[0];
    if (name == CalcFlashIPAForceKernel::Name())
        return new CudaCalcFlashIPAForceKernel(name, platform, cu);
    throw OpenMMException("CudaFlashIPAKernelFactory: unknown kernel '" + name + "'");
}
