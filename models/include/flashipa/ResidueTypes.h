#ifndef FLASHIPA_RESIDUE_TYPES_H_
#define FLASHIPA_RESIDUE_TYPES_H_

#include <string>

namespace FlashIPAPlugin {

/**
 * Residue type vocabulary shared by the model, the force and the Python helpers.
 * 0-19: the 20 amino acids in alphabetical three-letter order (ALA ARG ASN ASP CYS GLN GLU GLY HIS ILE
 * LEU LYS MET PHE PRO SER THR TRP TYR VAL); 20: unknown amino acid; 21-24: A C G U; 25: unknown
 * nucleotide. Generated backbones use the two "unknown" types.
 */
namespace ResidueType {
    constexpr int NumAminoAcids = 20;
    constexpr int UnknownAminoAcid = 20;
    constexpr int FirstNucleotide = 21;
    constexpr int UnknownNucleotide = 25;
    constexpr int Count = 26;
    /** True for types 21-25, whose frames use C3', C4', O4'. */
    inline bool isNucleotide(int type) { return type >= FirstNucleotide && type < Count; }
    /** The three-letter (protein) or one-letter (RNA) name of a type; "UNK"/"N" for the unknowns. */
    std::string name(int type);
    /** Inverse of name(); also accepts common variants (HIE, HID, HIP, CYX, ...). Returns -1 if unknown. */
    int fromName(const std::string& residueName);
}

} // namespace FlashIPAPlugin

#endif
