#ifndef FLASHIPA_FORCE_INFO_H_
#define FLASHIPA_FORCE_INFO_H_

#include "FlashIPAForce.h"
#include "openmm/common/ComputeForceInfo.h"
#include <set>
#include <vector>

namespace FlashIPAPlugin {

/**
 * Tells the GPU platforms which particles the force couples. Each residue is a group holding its frame
 * atoms and the next residue's origin, so all residues of the force form one molecule: OpenMM's periodic
 * re-wrapping (done per molecule when it reorders atoms) then moves the whole complex by one box vector
 * and never splits it, which the translation-invariant model does not notice. Frame atoms are never
 * identical to other particles, so reordering never swaps them.
 */
class FlashIPAForceInfo : public OpenMM::ComputeForceInfo {
public:
    explicit FlashIPAForceInfo(const FlashIPAForce& force);
    bool areParticlesIdentical(int particle1, int particle2) override;
    int getNumParticleGroups() override;
    void getParticlesInGroup(int index, std::vector<int>& particles) override;
    bool areGroupsIdentical(int group1, int group2) override;

private:
    std::vector<std::vector<int>> groups;
    std::set<int> frameAtoms;
};

} // namespace FlashIPAPlugin

#endif
