// Registers the XML proxy when libOpenMMFlashIPA is loaded, so XmlSerializer knows FlashIPAForce in
// C++ and in Python without any call by the user.
#include "FlashIPAForce.h"
#include "FlashIPAForceProxy.h"
#include "openmm/serialization/SerializationProxy.h"

extern "C" __attribute__((constructor)) void registerFlashIPASerializationProxies() {
    OpenMM::SerializationProxy::registerProxy(typeid(FlashIPAPlugin::FlashIPAForce), new FlashIPAPlugin::FlashIPAForceProxy());
}
