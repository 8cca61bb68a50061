// FlashIPAForce on the Reference platform (the shared body is platform/FlashIPAForceTests.h).
#include <map>
#include <string>
extern "C" void registerFlashIPAReferenceKernelFactories();
static const char* const TestPlatform = "Reference";
static bool platformAvailable() {
    static bool registered = (registerFlashIPAReferenceKernelFactories(), true);
    return registered;
}
static std::map<std::string, std::string> properties() {
    return {};
}
#include "platform/FlashIPAForceTests.h"
