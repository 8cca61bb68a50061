#include "ReferenceFlashIPAKernelFactory.h"
#include "ReferenceFlashIPAKernels.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/windowsExport.h"

using namespace FlashIPAPlugin;
using namespace OpenMM;

// OpenMM calls these when it loads the plugin library from a plugin folder or loadPluginLibrary().
extern "C" OPENMM_EXPORT void registerPlatforms() {}

extern "C" OPENMM_EXPORT void registerKernelFactories() {
    for (int i = 0; i < Platform::getNumPlatforms(); i++) {
        Platform& platform = Platform::getPlatform(i);
        // The CPU platform keeps Reference's platform data, so the same kernel serves it (OpenMM's
        // minimiser may fall back to a CPU context in double precision).
        if (platform.getName() == "Reference" || platform.getName() == "CPU")
            platform.registerKernelFactory(CalcFlashIPAForceKernel::Name(), new ReferenceFlashIPAKernelFactory());
    }
}

/** For programs linking the plugin directly (the C++ tests): same as registerKernelFactories(). */
extern "C" OPENMM_EXPORT void registerFlashIPAReferenceKernelFactories() {
    registerKernelFactories();
}

KernelImpl* ReferenceFlashIPAKernelFactory::createKernelImpl(std::string name, const Platform& platform, ContextImpl& context) const {
    if (name == CalcFlashIPAForceKernel::Name())
        return new ReferenceCalcFlashIPAForceKernel(name, platform);
    throw OpenMMException("ReferenceFlashIPAKernelFactory: unknown kernel '" + name + "'");
}
