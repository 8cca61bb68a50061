#ifndef OPENMM_FLASHIPA_FORCE_PROXY_H_
#define OPENMM_FLASHIPA_FORCE_PROXY_H_

#include "internal/windowsExportFlashIPA.h"
#include "openmm/serialization/SerializationProxy.h"

namespace FlashIPAPlugin {

/**
 * XML serialisation of FlashIPAForce. The model is referenced, not embedded: the XML records the
 * checkpoint path as given ("" = the shipped model) and its SHA-256; deserialising loads the file from
 * that path and refuses it if its SHA-256 differs (docs/DESIGN-DECISIONS.md says why).
 */
class OPENMM_EXPORT_FLASHIPA FlashIPAForceProxy : public OpenMM::SerializationProxy {
public:
    FlashIPAForceProxy();
    void serialize(const void* object, OpenMM::SerializationNode& node) const override;
    void* deserialize(const OpenMM::SerializationNode& node) const override;
};

} // namespace FlashIPAPlugin

#endif
