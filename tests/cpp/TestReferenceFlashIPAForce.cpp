// FlashIPAForce on the Reference platform (the shared body is platform/FlashIPAForceTests.h).
extern "C" void registerFlashIPAReferenceKernelFactories();
static const char* const TestPlatform = "Reference";
static void registerTestKernels() {
    registerFlashIPAReferenceKernelFactories();
}
#include "platform/FlashIPAForceTests.h"
