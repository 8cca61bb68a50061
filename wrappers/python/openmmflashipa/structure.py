"""Backbones as objects that openmm.app and structure files understand.

A :class:`Backbone` holds frame atoms (protein N, CA, C; RNA C3', C4', O4') for one chain and places the rest
of the backbone from ideal geometry (backbone.placeBackboneAtoms). Residue naming for generated chains:

- protein: poly-glycine (``GLY``). Glycine has no side chain, so the backbone is a complete residue that
  amber14 can template once hydrogens are added; the model itself saw the residues as "unknown".
- RNA: poly-uridine (``U``) with backbone and sugar atoms only (P, OP1, OP2, O5', C5', C4', O4', C3', O3',
  C2', O2', C1'; no P on the 5' residue). No base is built, so generated RNA is refined at backbone level.
"""

import collections
import io
import os

import gemmi
import numpy as np
import openmm.app as app
import openmm.unit as unit

from . import backbone as _backbone
from . import ideal_geometry

PROTEIN_ORDER = ("N", "CA", "C", "O", "OXT")
RNA_ORDER = ("P", "OP1", "OP2", "O5'", "C5'", "C4'", "O4'", "C3'", "O3'", "C2'", "O2'", "C1'")
GENERATED_NAME = {"protein": "GLY", "rna": "U"}


def _element(name):
    return name.lstrip("0123456789")[0]


class Backbone:
    """One chain of frame atoms with the backbone atoms they determine.

    Parameters
    ----------
    frames : array [L, 3, 3], nm
    moltype : 'protein' or 'rna'
    residueNames : sequence of L residue names, optional (default: generated naming, see the module)
    chainId : str
    """

    def __init__(self, frames, moltype, residueNames=None, chainId="A"):
        frames = np.asarray(frames, dtype=np.float64)
        if frames.ndim != 3 or frames.shape[1:] != (3, 3) or len(frames) < 1:
            raise ValueError("frames must have shape [L, 3, 3] with L >= 1, got %s" % (frames.shape,))
        if not np.all(np.isfinite(frames)):
            raise ValueError("frames contain non-finite coordinates")
        if moltype not in GENERATED_NAME:
            raise ValueError("moltype must be 'protein' or 'rna', not %r" % (moltype,))
        self.frames = frames
        self.moltype = moltype
        self.residueNames = list(residueNames) if residueNames is not None else [GENERATED_NAME[moltype]] * len(frames)
        if len(self.residueNames) != len(frames):
            raise ValueError("%d residue names for %d residues" % (len(self.residueNames), len(frames)))
        self.chainId = chainId

    def __len__(self):
        return len(self.frames)

    def atoms(self):
        """Every atom, in residue order: list of (residue index, atom name, element, xyz nm)."""
        placed = _backbone.placeBackboneAtoms(self.frames, self.moltype)
        frame_names = ideal_geometry.FRAME_ATOMS[self.moltype]
        out = []
        for i in range(len(self.frames)):
            coords = {name: self.frames[i, k] for k, name in enumerate(frame_names)}
            coords.update({name: xyz[i] for name, xyz in placed.items() if np.all(np.isfinite(xyz[i]))})
            order = PROTEIN_ORDER if self.moltype == "protein" else RNA_ORDER
            for name in order:
                if name not in coords:
                    continue
                if self.moltype == "rna" and i == 0 and name in ("P", "OP1", "OP2"):
                    continue  # a 5' end without phosphate, as amber's 5' residue templates expect
                out.append((i, name, _element(name), coords[name]))
        return out

    def toOpenMM(self):
        """(openmm.app.Topology, positions as a Quantity in nm) with the atoms of :meth:`atoms`."""
        topology = app.Topology()
        chain = topology.addChain(self.chainId)
        residues = [topology.addResidue(name, chain, str(i + 1)) for i, name in enumerate(self.residueNames)]
        positions = []
        previous = {}
        for i, name, element, xyz in self.atoms():
            atom = topology.addAtom(name, app.Element.getBySymbol(element), residues[i])
            previous.setdefault(i, {})[name] = atom
            positions.append(xyz)
        topology.createStandardBonds()
        return topology, unit.Quantity(np.array(positions), unit.nanometer)

    def toGemmi(self):
        """A gemmi.Structure (one model, one chain) with entity information set up for mmCIF."""
        structure = gemmi.Structure()
        structure.name = "flashipa"
        model = gemmi.Model(1) if _gemmi_model_takes_int() else gemmi.Model("1")
        chain = gemmi.Chain(self.chainId)
        atoms = self.atoms()
        serial = 1
        for i, residueName in enumerate(self.residueNames):
            residue = gemmi.Residue()
            residue.name = residueName
            residue.seqid = gemmi.SeqId(i + 1, " ")
            residue.entity_type = gemmi.EntityType.Polymer
            for j, name, element, xyz in atoms:
                if j != i:
                    continue
                atom = gemmi.Atom()
                atom.name = name
                atom.element = gemmi.Element(element)
                atom.pos = gemmi.Position(*(10.0 * xyz))  # gemmi works in Angstrom
                atom.occ = 1.0
                atom.b_iso = 0.0
                atom.serial = serial
                serial += 1
                residue.add_atom(atom)
            chain.add_residue(residue)
        model.add_chain(chain)
        structure.add_model(model)
        structure.setup_entities()
        return structure

    def write(self, path):
        """Write a .pdb or .cif (mmCIF) file, chosen by the extension."""
        writeStructure(self.toGemmi(), path)


def _gemmi_model_takes_int():
    try:
        gemmi.Model(1)
        return True
    except TypeError:
        return False


def writeStructure(structure, path):
    """Write a gemmi.Structure to path (.pdb, .ent or .cif/.mmcif), creating the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    lower = path.lower()
    if lower.endswith((".cif", ".mmcif")):
        groups = gemmi.MmcifOutputGroups(True)
        if not structure.cell.is_crystal():
            # gemmi's placeholder cell (1 x 1 x 1 A) would be read by openmm.app as a periodic box
            groups.cell = False
            groups.symmetry = False
        structure.make_mmcif_document(groups).write_file(path)
    elif lower.endswith((".pdb", ".ent")):
        options = gemmi.PdbWriteOptions()
        options.cryst1_record = False  # generated chains have no crystal cell
        structure.write_pdb(path, options)
    else:
        raise ValueError("unknown structure format for %r: use .pdb or .cif" % path)


def writeOpenMM(topology, positions, path):
    """Write an openmm.app topology and positions as .pdb or .cif (openmm.app writers, keeps hydrogens)."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as handle:
        if path.lower().endswith((".cif", ".mmcif")):
            app.PDBxFile.writeFile(topology, positions, handle, keepIds=True)
        elif path.lower().endswith((".pdb", ".ent")):
            app.PDBFile.writeFile(topology, positions, handle, keepIds=True)
        else:
            raise ValueError("unknown structure format for %r: use .pdb or .cif" % path)


def _checkDuplicateAtoms(structure, path):
    """ValueError naming the residues of the first model with two atoms of one name and no alternate-location
    ids: gemmi's remove_alternative_conformations keeps the first of them without a word (a second CA was
    dropped), so which one is refined would be an accident of the file's order."""
    found = []
    for chain in structure[0]:
        for residue in chain:
            names = collections.Counter(atom.name for atom in residue if atom.altloc == "\0")
            twice = sorted(name for name, count in names.items() if count > 1)
            if twice:
                found.append("%s %s%s (chain %s): %s" % (residue.name, residue.seqid.num, residue.seqid.icode.strip(),
                                                         chain.name, ", ".join("%d atoms named %s" % (names[n], n)
                                                                               for n in twice)))
    if found:
        more = "" if len(found) <= 10 else "; ... and %d more residues" % (len(found) - 10)
        raise ValueError("%s: residue(s) with duplicate atom names and no alternate-location ids: %s%s; keep one of "
                         "each, or give them altloc ids" % (path, "; ".join(found[:10]), more))


def readStructure(path, keepWater=False):
    """Read a PDB or mmCIF file (plain or gzipped) with gemmi: (openmm.app.Topology, positions in nm).

    Keeps the first model, drops waters (unless keepWater), and resolves alternate locations to the first one. Raises
    ValueError with the cause when the file cannot be read, has no atoms, or has a residue with two atoms of
    one name and no alternate-location ids.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError("no such structure file: %s" % path)
    try:
        structure = gemmi.read_structure(path)
    except Exception as error:
        raise ValueError("cannot read %s: %s" % (path, error)) from error
    structure.setup_entities()
    _checkDuplicateAtoms(structure, path)
    structure.remove_alternative_conformations()
    if not keepWater:
        structure.remove_waters()
    if len(structure) == 0:
        raise ValueError("%s has no model" % path)
    for extra in range(len(structure) - 1, 0, -1):
        del structure[extra]
    if structure[0].count_atom_sites() == 0:
        raise ValueError("%s has no atoms other than water" % path)
    # Through mmCIF, not PDB text: PDB columns cut chain ids to one character ("AA" and "AB" would merge).
    groups = gemmi.MmcifOutputGroups(True)
    groups.cell = groups.symmetry = structure.cell.is_crystal()
    document = structure.make_mmcif_document(groups)
    # openmm.app takes label_asym_id for chain ids when it has more distinct values than auth_asym_id, which it
    # has whenever a chain carries ligands or waters (gemmi names those subchains "Axp", "Bx1", ...): the
    # file's own chain ids (auth_asym_id) are the ones users know, so they go in both columns.
    for row in document.sole_block().find("_atom_site.", ["label_asym_id", "auth_asym_id"]):
        row[0] = row[1]
    pdbx = app.PDBxFile(io.StringIO(document.as_string()))
    if pdbx.topology.getNumAtoms() == 0:
        raise ValueError("%s has no atoms" % path)
    box = pdbx.topology.getUnitCellDimensions()
    if box is not None and min(box.value_in_unit(unit.nanometer)) < 1.0:
        pdbx.topology.setUnitCellDimensions(None)  # a placeholder cell (CRYST1 1 1 1), not a periodic box
    return pdbx.topology, pdbx.positions
