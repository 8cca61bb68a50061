#include "internal/ReleasedGIL.h"
#include <dlfcn.h>

namespace FlashIPAPlugin {

namespace {

/** Python's C API entry points, found once in the running process (all null without Python). */
struct PythonApi {
    int (*isInitialized)() = nullptr;
    int (*gilStateCheck)() = nullptr;
    void* (*saveThread)() = nullptr;
    void (*restoreThread)(void*) = nullptr;

    PythonApi() {
        isInitialized = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "Py_IsInitialized"));
        gilStateCheck = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "PyGILState_Check"));
        saveThread = reinterpret_cast<void* (*)()>(dlsym(RTLD_DEFAULT, "PyEval_SaveThread"));
        restoreThread = reinterpret_cast<void (*)(void*)>(dlsym(RTLD_DEFAULT, "PyEval_RestoreThread"));
    }
    bool usable() const { return isInitialized && gilStateCheck && saveThread && restoreThread; }
};

const PythonApi& python() {
    static const PythonApi api;
    return api;
}

} // namespace

ReleasedGIL::ReleasedGIL() : threadState(nullptr) {
    const PythonApi& api = python();
    if (api.usable() && api.isInitialized() && api.gilStateCheck())
        threadState = api.saveThread();
}

ReleasedGIL::~ReleasedGIL() {
    if (threadState)
        python().restoreThread(threadState);
}

} // namespace FlashIPAPlugin
