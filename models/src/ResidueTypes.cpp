#include "flashipa/ResidueTypes.h"
#include <algorithm>
#include <map>

namespace FlashIPAPlugin {
namespace ResidueType {

namespace {
const char* const names[Count] = {"ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET",
                                  "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL", "UNK", "A", "C", "G", "U", "N"};

// Protonation/force-field variants and common modified residues mapped to their parent, so that a
// topology prepared for amber keeps its residue types.
const std::map<std::string, std::string>& aliases() {
    static const std::map<std::string, std::string> table = {
        {"HIE", "HIS"}, {"HID", "HIS"}, {"HIP", "HIS"}, {"HSD", "HIS"}, {"HSE", "HIS"}, {"HSP", "HIS"},
        {"CYX", "CYS"}, {"CYM", "CYS"}, {"ASH", "ASP"}, {"GLH", "GLU"}, {"LYN", "LYS"}, {"MSE", "MET"},
        {"RA", "A"},    {"RC", "C"},    {"RG", "G"},    {"RU", "U"},    {"RA5", "A"},   {"RC5", "C"},
        {"RG5", "G"},   {"RU5", "U"},   {"RA3", "A"},   {"RC3", "C"},   {"RG3", "G"},   {"RU3", "U"},
        {"ADE", "A"},   {"CYT", "C"},   {"GUA", "G"},   {"URA", "U"},   {"URI", "U"},
    };
    return table;
}
} // namespace

std::string name(int type) {
    if (type < 0 || type >= Count)
        return "?";
    return names[type];
}

int fromName(const std::string& residueName) {
    std::string upper = residueName;
    std::transform(upper.begin(), upper.end(), upper.begin(), ::toupper);
    auto alias = aliases().find(upper);
    if (alias != aliases().end())
        upper = alias->second;
    for (int i = 0; i < Count; i++)
        if (upper == names[i])
            return i;
    return -1;
}

} // namespace ResidueType
} // namespace FlashIPAPlugin
