"""Regenerate protein.pdb and rna.pdb from the project's shared structure set (see README.md here).

Usage: python make_data.py <structure-data-dir>    (the folder holding manifest.tsv, protein/ and rna/)

Each input is one chain of a deposited PDB entry as gzipped mmCIF (heavy atoms, first model). The
output keeps the first alternate location of every atom, drops hydrogens, waters and anything that is
not a polymer residue, removes the 5'-terminal phosphate of nucleic-acid chains (Amber's RNA
templates have none), and writes a plain PDB file without a CRYST1 record (the examples are
non-periodic).
"""
import os
import sys

import gemmi

# output file: (file in the shared set, PDB id)
SOURCES = {
    "protein.pdb": ("protein/kortemme_ddg_1SHG_A.cif.gz", "1SHG"),
    "rna.pdb": ("rna/rsRNASP_1L2X_A.cif.gz", "1L2X"),
}


def convert(source, target, pdb_id):
    st = gemmi.read_structure(source)
    st.setup_entities()
    st.remove_alternative_conformations()
    st.remove_hydrogens()
    st.remove_ligands_and_waters()
    st.remove_empty_chains()
    while len(st) > 1:
        del st[1]
    for chain in st[0]:
        first = chain[0]
        if gemmi.find_tabulated_residue(first.name).is_nucleic_acid():
            # Amber's RNA force fields have no template for a 5'-terminal phosphate: drop it so that
            # ForceField('amber14-all.xml') can parametrise the chain as deposited otherwise.
            for name in ("OP3", "OP2", "OP1", "P"):
                idx = [i for i, atom in enumerate(first) if atom.name == name]
                for i in reversed(idx):
                    del first[i]
    st.name = pdb_id
    st.info["_entry.id"] = pdb_id
    options = gemmi.PdbWriteOptions()
    options.cryst1_record = False
    st.write_pdb(target, options)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    for target, (source, pdb_id) in SOURCES.items():
        path = os.path.join(sys.argv[1], source)
        if not os.path.exists(path):
            print("kept %s as committed: %s is not in %s" % (target, source, sys.argv[1]))
            continue
        convert(path, os.path.join(here, target), pdb_id)
        print("wrote", target)


if __name__ == "__main__":
    main()
