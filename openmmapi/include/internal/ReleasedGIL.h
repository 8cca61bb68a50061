#ifndef OPENMM_FLASHIPA_RELEASED_GIL_H_
#define OPENMM_FLASHIPA_RELEASED_GIL_H_

#include "internal/windowsExportFlashIPA.h"

namespace FlashIPAPlugin {

/**
 * Releases Python's global interpreter lock for its lifetime if, and only if, the calling thread holds it.
 *
 * Why: once the torch Python module is loaded, LibTorch's autograd engine refuses to run on a thread that
 * holds the GIL ("The autograd engine was called while holding the GIL"). OpenMM's Python wrappers keep the
 * GIL during some calls, e.g. LocalEnergyMinimizer.minimize() with a Python MinimizationReporter, so a
 * force evaluated inside them must give the lock back around its backward pass. Python's C API is looked up
 * at run time (dlsym): the plugin does not link Python and this is a no-op in a process without it.
 *
 * It lives in the plugin, at the boundary where OpenMM calls into the model (each platform's kernel wraps its
 * evaluation in one), so that the model library knows nothing of Python.
 */
class OPENMM_EXPORT_FLASHIPA ReleasedGIL {
public:
    ReleasedGIL();
    ~ReleasedGIL();
    ReleasedGIL(const ReleasedGIL&) = delete;
    ReleasedGIL& operator=(const ReleasedGIL&) = delete;

private:
    void* threadState;
};

} // namespace FlashIPAPlugin

#endif
