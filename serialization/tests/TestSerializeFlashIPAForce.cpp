// The XML proxy of FlashIPAForce without any platform or Context (as OpenMM's plugins test serialisation): every
// field survives a round trip, older files read with the defaults of their time, newer or tampered ones are
// refused with an OpenMMException. That a restored force computes the same energy is a platform test
// (tests/cpp/platform/FlashIPAForceTests.h, SerializationRoundTrip).
#include "FlashIPAForce.h"
#include "openmm/Force.h"
#include "openmm/OpenMMException.h"
#include "openmm/serialization/XmlSerializer.h"
#include <gtest/gtest.h>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using namespace FlashIPAPlugin;
using namespace OpenMM;

namespace {

/** A force with every field away from its default: residues of two chains, a label, properties. */
std::unique_ptr<FlashIPAForce> fullForce() {
    auto force = std::make_unique<FlashIPAForce>(); // the shipped model
    for (int i = 0; i < 5; i++)
        force->addResidue(3 * i, 3 * i + 1, 3 * i + 2, i % 4, i < 3 ? 0 : 1);
    force->setForceGroup(3);
    force->setDefaultSigma(0.3);
    force->setDefaultScale(0.7);
    force->setDefaultTemperature(310.0);
    force->setAttentionBackend("math");
    force->setDegenerateFramePolicy("skip");
    force->setProperty("useCUDAGraphs", "false");
    force->setName("learned");
    force->setResidueLabel(4, "ALA 7 of chain A");
    return force;
}

std::string serialize(const FlashIPAForce& force) {
    std::stringstream buffer;
    XmlSerializer::serialize<Force>(&force, "Force", buffer);
    return buffer.str();
}

std::unique_ptr<Force> deserialize(const std::string& xml) {
    std::stringstream buffer(xml);
    return std::unique_ptr<Force>(XmlSerializer::deserialize<Force>(buffer));
}

/** xml with the first occurrence of `from` replaced by `to` (the test fails if it is absent). */
std::string replaced(std::string xml, const std::string& from, const std::string& to) {
    size_t at = xml.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos)
        xml.replace(at, from.size(), to);
    return xml;
}

void expectRefused(const std::string& xml, const std::string& text) {
    try {
        deserialize(xml);
        ADD_FAILURE() << "accepted; expected an error mentioning '" << text << "'";
    } catch (const OpenMMException& e) {
        EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
}

} // namespace

TEST(SerializeFlashIPAForce, EveryFieldSurvivesARoundTrip) {
    auto force = fullForce();
    std::unique_ptr<Force> copy = deserialize(serialize(*force));
    auto* restored = dynamic_cast<FlashIPAForce*>(copy.get());
    ASSERT_NE(restored, nullptr);
    EXPECT_EQ(restored->getModelPath(), force->getModelPath());
    EXPECT_EQ(restored->getModelChecksum(), force->getModelChecksum());
    EXPECT_EQ(restored->getAttentionBackend(), "math");
    EXPECT_EQ(restored->getDegenerateFramePolicy(), "skip");
    EXPECT_EQ(restored->getForceGroup(), 3);
    EXPECT_EQ(restored->getName(), "learned");
    EXPECT_EQ(restored->getDefaultSigma(), 0.3);
    EXPECT_EQ(restored->getDefaultScale(), 0.7);
    EXPECT_EQ(restored->getDefaultTemperature(), 310.0);
    EXPECT_EQ(restored->getProperties(), force->getProperties());
    EXPECT_EQ(restored->getResidueLabel(4), "ALA 7 of chain A");
    EXPECT_EQ(restored->getResidueLabel(3), "");
    ASSERT_EQ(restored->getNumResidues(), force->getNumResidues());
    for (int i = 0; i < restored->getNumResidues(); i++) {
        int a1, b1, c1, t1, ch1, a2, b2, c2, t2, ch2;
        force->getResidueParameters(i, a1, b1, c1, t1, ch1);
        restored->getResidueParameters(i, a2, b2, c2, t2, ch2);
        EXPECT_EQ(std::vector<int>({a1, b1, c1, t1, ch1}), std::vector<int>({a2, b2, c2, t2, ch2})) << "residue " << i;
    }
    // The text is stable: serialising the restored force gives the same XML.
    EXPECT_EQ(serialize(*restored), serialize(*force));
}

TEST(SerializeFlashIPAForce, VersionOneFilesReadWithTheirDefaults) {
    // Version 1 predates the degenerate-frame policy and residue labels: such a file reads as policy "error".
    std::string xml = serialize(*fullForce());
    xml = replaced(xml, "version=\"2\"", "version=\"1\"");
    xml = replaced(xml, "degenerateFramePolicy=\"skip\"", "");
    xml = replaced(xml, " label=\"ALA 7 of chain A\"", "");
    std::unique_ptr<Force> copy = deserialize(xml);
    auto* restored = dynamic_cast<FlashIPAForce*>(copy.get());
    ASSERT_NE(restored, nullptr);
    EXPECT_EQ(restored->getDegenerateFramePolicy(), "error");
    EXPECT_EQ(restored->getResidueLabel(4), "");
    EXPECT_EQ(restored->getNumResidues(), 5);
}

TEST(SerializeFlashIPAForce, NewerVersionsAndChangedModelsAreRefused) {
    const std::string xml = serialize(*fullForce());
    expectRefused(replaced(xml, "version=\"2\"", "version=\"3\""), "unsupported version 3");
    const std::string checksum = fullForce()->getModelChecksum();
    ASSERT_EQ(checksum.size(), 64u);
    std::string other = checksum;
    other[0] = other[0] == '0' ? '1' : '0';
    expectRefused(replaced(xml, checksum, other), "the checkpoint changed since serialisation");
    expectRefused(replaced(xml, "attentionBackend=\"math\"", "attentionBackend=\"fastest\""), "fastest");
}
