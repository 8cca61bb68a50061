"""Helpers shared by the Python tests of the SWIG wrapper and createForce (no fixtures of the plugin's own
making: the oracles here read the structures with gemmi and use the documented residue vocabulary)."""

import os

import openmm
import openmm.app as app
import openmm.unit as unit

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "data")
PROTEIN_PDB = os.path.join(DATA, "protein.pdb")
RNA_PDB = os.path.join(DATA, "rna.pdb")
KJ = unit.kilojoules_per_mole

# The vocabulary as documented in ResidueTypes.h / FlashIPAForce.h: 0-19 amino acids in alphabetical
# three-letter order, 20 unknown amino acid, 21-24 A C G U, 25 unknown nucleotide.
AMINO_ACIDS = sorted(["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
                      "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL"])
DOCUMENTED_TYPES = {name: i for i, name in enumerate(AMINO_ACIDS)}
DOCUMENTED_TYPES.update({"UNK": 20, "A": 21, "C": 22, "G": 23, "U": 24, "N": 25})
PROTEIN_FRAME = ("N", "CA", "C")
RNA_FRAME = ("C3'", "C4'", "O4'")


def gemmiFrameResidues(path, frameNames):
    """(residue name, sequence number) of every residue of the file that has all three frame atoms, read
    with gemmi (independently of OpenMM's PDB reader)."""
    import gemmi  # here, not at the top: the GPU machine's CUDA suites run these helpers without it
    structure = gemmi.read_structure(path)
    result = []
    for chain in structure[0]:
        for residue in chain:
            names = {atom.name for atom in residue}
            if all(name in names for name in frameNames):
                result.append((residue.name, residue.seqid.num))
    return result


def amberSystem(path, solvent="vacuum", addHydrogens=True):
    """(topology, positions, system) for a shipped structure with Amber14 (NoCutoff, HBonds)."""
    files = ["amber14-all.xml"] + (["implicit/obc2.xml"] if solvent == "obc2" else [])
    forcefield = app.ForceField(*files)
    pdb = app.PDBFile(path)
    modeller = app.Modeller(pdb.topology, pdb.positions)
    if addHydrogens:
        modeller.addHydrogens(forcefield)
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    return modeller.topology, modeller.positions, system


def massOnlySystem(topology):
    """A System with one particle per atom of the topology and no forces."""
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass if atom.element is not None else 12.0)
    return system


def referenceContext(system, positions):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    return context


def groupEnergy(context, group):
    return context.getState(getEnergy=True, groups={group}).getPotentialEnergy().value_in_unit(KJ)
