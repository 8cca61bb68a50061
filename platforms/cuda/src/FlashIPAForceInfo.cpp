#include "FlashIPAForceInfo.h"

using namespace FlashIPAPlugin;

FlashIPAForceInfo::FlashIPAForceInfo(const FlashIPAForce& force) {
    for (int i = 0; i < force.getNumResidues(); i++) {
        int a, b, c, type, chain;
        force.getResidueParameters(i, a, b, c, type, chain);
        groups.push_back({a, b, c});
        frameAtoms.insert({a, b, c});
        if (i > 0)
            groups[i - 1].push_back(b); // link to the previous residue: one molecule for the whole force
    }
}

bool FlashIPAForceInfo::areParticlesIdentical(int particle1, int particle2) {
    return particle1 == particle2 || (!frameAtoms.count(particle1) && !frameAtoms.count(particle2));
}

int FlashIPAForceInfo::getNumParticleGroups() {
    return groups.size();
}

void FlashIPAForceInfo::getParticlesInGroup(int index, std::vector<int>& particles) {
    particles = groups[index];
}

bool FlashIPAForceInfo::areGroupsIdentical(int group1, int group2) {
    return group1 == group2;
}
