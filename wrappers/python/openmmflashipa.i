/*
 * SWIG interface of the openmm-flashipa Python module (openmmflashipa/openmmflashipa.py + the extension _openmmflashipa).
 *
 * FlashIPAForce derives from openmm.Force: OpenMM's own SWIG declarations are imported (not wrapped again)
 * so that System.addForce, force groups, XmlSerializer, ... accept it. The pure-Python package
 * (openmmflashipa/__init__.py) re-exports everything defined here.
 */
%module(package="openmmflashipa") openmmflashipa

%include <typemaps.i>
%include <std_string.i>

/* OpenMM's declarations and typemaps (double arguments accept openmm.unit quantities). Importing them
 * reports warnings about OpenMM's own declarations (nested classes, the 'None' enum value, OUTPUT typemaps
 * that its module defines elsewhere) that do not concern this module: silence those three. */
#pragma SWIG nowarn=314,325,453
%import(module="openmm") "swig/OpenMMSwigHeaders.i"
%include "swig/typemaps.i"

%{
/* Every class OpenMM's SWIG declarations know, for the Force up-casts SWIG generates. */
#include "OpenMM.h"
#include "OpenMMAmoeba.h"
#include "OpenMMDrude.h"
#include "openmm/RPMDIntegrator.h"
#include "openmm/RPMDMonteCarloBarostat.h"
#include "FlashIPAForce.h"
#include "flashipa/ResidueTypes.h"
#include "flashipa/BackboneSampler.h"
#include "flashipa/ChainSpread.h"
#include <exception>
#include <string>

/* The Python class openmm.OpenMMException (falls back to RuntimeError if openmm cannot be imported). */
static PyObject* flashipa_OpenMMExceptionType() {
    static PyObject* type = NULL;
    if (type == NULL) {
        PyObject* module = PyImport_ImportModule("openmm");
        if (module != NULL) {
            type = PyObject_GetAttrString(module, "OpenMMException");
            Py_DECREF(module);
        }
        if (type == NULL) {
            PyErr_Clear();
            Py_INCREF(PyExc_RuntimeError);
            type = PyExc_RuntimeError;
        }
    }
    return type;
}
%}

/*
 * XML serialisation: libOpenMMFlashIPA registers FlashIPAForce's SerializationProxy from a load-time
 * constructor (registerFlashIPASerializationProxies), and this module links that library, so
 * openmm.XmlSerializer handles FlashIPAForce as soon as openmmflashipa is imported.
 */

/*
 * C++ exceptions become Python exceptions carrying the message:
 *   OpenMM::OpenMMException -> openmm.OpenMMException (as OpenMM's own wrappers do)
 *   std::invalid_argument   -> ValueError
 *   std::out_of_range       -> IndexError
 *   any other std::exception (e.g. LibTorch's c10::Error) -> RuntimeError
 */
%exception {
    try {
        $action
    } catch (const OpenMM::OpenMMException& e) {
        PyErr_SetString(flashipa_OpenMMExceptionType(), e.what());
        SWIG_fail;
    } catch (const std::invalid_argument& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
        SWIG_fail;
    } catch (const std::out_of_range& e) {
        PyErr_SetString(PyExc_IndexError, e.what());
        SWIG_fail;
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        SWIG_fail;
    } catch (...) {
        PyErr_SetString(PyExc_RuntimeError, "unknown C++ exception in openmmflashipa");
        SWIG_fail;
    }
}

%rename(residueTypeName) FlashIPAPlugin::ResidueType::name;
%rename(residueTypeFromName) FlashIPAPlugin::ResidueType::fromName;

namespace FlashIPAPlugin {

%feature("autodoc", "1");

%feature("docstring") FlashIPAForce "
A learned energy from a FlashIPA frame model:

    U(x) = flashipaScale * kT * E_theta(x, flashipaSigma),   kT = 0.0083144626 * flashipaTemperature kJ/mol

Each residue contributes one rigid frame built from three atoms: (N, CA, C) for amino acids and
(C3', C4', O4') for nucleotides. The model is non-periodic. The global parameters flashipaScale,
flashipaSigma (nm) and flashipaTemperature (K) can be changed with Context.setParameter().

FlashIPAForce(modelPath='') reads a safetensors checkpoint; an empty path selects the model shipped
with the package. Use openmmflashipa.createForce(topology) to build one from an openmm.app.Topology.
";

%apply int& OUTPUT { int& atomA, int& atomB, int& atomC, int& residueType, int& chain };
%pythonappend FlashIPAForce::getResidueParameters %{
    val = tuple(val)
%}

class FlashIPAForce : public OpenMM::Force {
public:
    FlashIPAForce(const std::string& modelPath = "");
    const std::string& getModelPath() const;
    std::string getResolvedModelPath() const;
    const std::string& getModelChecksum() const;

    %feature("docstring") addResidue "addResidue(self, atomA, atomB, atomC, residueType, chain) -> int

Add a residue: frame atoms (protein N, CA, C; RNA C3', C4', O4'; the origin is atomB), its type
(0-19 amino acids, 20 unknown amino acid, 21-24 A C G U, 25 unknown nucleotide) and chain id.
Residues of one chain must be added in sequence order. Returns the index of the residue.";
    int addResidue(int atomA, int atomB, int atomC, int residueType, int chain);
    int getNumResidues() const;

    %feature("docstring") getResidueParameters "getResidueParameters(self, index) -> (atomA, atomB, atomC, residueType, chain)";
    void getResidueParameters(int index, int& atomA, int& atomB, int& atomC, int& residueType, int& chain) const;
    void setResidueParameters(int index, int atomA, int atomB, int atomC, int residueType, int chain);
    %feature("docstring") setResidueLabel "setResidueLabel(self, index, label)

Name a residue for error messages, e.g. 'LYS 25 of chain A' (createForce names every residue after its
Topology); errors then say 'residue 3 (LYS 25 of chain A)'.";
    void setResidueLabel(int index, const std::string& label);
    const std::string& getResidueLabel(int index) const;
    std::string describeResidue(int index) const;
    void setAttentionBackend(const std::string& backend);
    const std::string& getAttentionBackend() const;

    %feature("docstring") setDegenerateFramePolicy "setDegenerateFramePolicy(self, policy)

What happens when a residue's frame atoms are degenerate (coincident, collinear or non-finite) during an
evaluation: 'error' (default) raises openmm.OpenMMException naming the residue; 'skip' leaves such residues
out of the model for that evaluation (no energy, no force on their atoms), counts them
(getNumSkippedResidues) and prints one warning per Context. 'skip' is meant for simulations of the learned
force alone and for generation from noise.";
    void setDegenerateFramePolicy(const std::string& policy);
    const std::string& getDegenerateFramePolicy() const;
    %feature("docstring") getNumSkippedResidues "getNumSkippedResidues(self, context) -> int

Residue evaluations skipped under the 'skip' policy in this Context since it was created (a residue
skipped in ten evaluations counts ten).";
    long long getNumSkippedResidues(const OpenMM::Context& context) const;
    void setProperty(const std::string& name, const std::string& value);
    static const std::string& Scale();
    static const std::string& Sigma();
    static const std::string& Temperature();
    double getDefaultScale() const;
    void setDefaultScale(double scale);
    double getDefaultSigma() const;
    void setDefaultSigma(double sigma);
    double getDefaultTemperature() const;
    void setDefaultTemperature(double temperature);
    void updateParametersInContext(OpenMM::Context& context);
    bool usesPeriodicBoundaryConditions() const;
    void setModelChecksum(const std::string& checksum);

    %extend {
        %feature("docstring") getProperties "getProperties(self) -> dict: the platform-specific properties that were set.";
        PyObject* getProperties() const {
            PyObject* result = PyDict_New();
            for (const auto& entry : self->getProperties()) {
                PyObject* value = PyUnicode_FromString(entry.second.c_str());
                PyDict_SetItemString(result, entry.first.c_str(), value);
                Py_DECREF(value);
            }
            return result;
        }

        static FlashIPAPlugin::FlashIPAForce& _cast(OpenMM::Force& force) {
            FlashIPAPlugin::FlashIPAForce* result = dynamic_cast<FlashIPAPlugin::FlashIPAForce*>(&force);
            if (result == NULL)
                throw OpenMM::OpenMMException("FlashIPAForce.cast: the Force is not a FlashIPAForce");
            return *result;
        }

        static bool _isinstance(OpenMM::Force& force) {
            return dynamic_cast<FlashIPAPlugin::FlashIPAForce*>(&force) != NULL;
        }
    }

    %pythoncode %{
    @staticmethod
    def cast(force):
        """Return `force` (an openmm.Force, e.g. from System.getForce or XmlSerializer.deserialize) as a
        FlashIPAForce. Raises openmm.OpenMMException if it is not one.

        The returned object never owns the C++ object: it keeps `force` alive instead, so whichever of
        the two is dropped first, the other stays valid (moving ownership left `force` dangling)."""
        result = FlashIPAForce._cast(force)
        result.thisown = False
        result._flashipa_owner = force
        return result

    @staticmethod
    def isinstance(force):
        """True if `force` (an openmm.Force) is a FlashIPAForce."""
        return FlashIPAForce._isinstance(force)

    def __copy__(self):
        import openmm
        return FlashIPAForce.cast(openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(self)))

    def __deepcopy__(self, memo):
        return self.__copy__()
    %}
};

namespace ResidueType {
    %feature("docstring") name "residueTypeName(type) -> str: the three-letter (protein) or one-letter (RNA) name of a residue type; 'UNK'/'N' for the unknowns.";
    std::string name(int type);
    %feature("docstring") fromName "residueTypeFromName(residueName) -> int: the residue type of a name (also common variants such as HIE, CYX); -1 if unknown.";
    int fromName(const std::string& residueName);
}

} // namespace FlashIPAPlugin

%constant int RESIDUE_TYPE_COUNT = FlashIPAPlugin::ResidueType::Count;
%constant int NUM_AMINO_ACIDS = FlashIPAPlugin::ResidueType::NumAminoAcids;
%constant int UNKNOWN_AMINO_ACID = FlashIPAPlugin::ResidueType::UnknownAminoAcid;
%constant int FIRST_NUCLEOTIDE = FlashIPAPlugin::ResidueType::FirstNucleotide;
%constant int UNKNOWN_NUCLEOTIDE = FlashIPAPlugin::ResidueType::UnknownNucleotide;

/* The spread of real chains (training/include/flashipa/ChainSpread.h): where generation starts, for both routes. */
%feature("docstring") chainSpread "chainSpread(length, rna) -> float: root-mean-square displacement per coordinate (nm) of the frame atoms of a real chain of `length` residues about their centroid (the training split's power law)";
%feature("docstring") noisedChainSpread "noisedChainSpread(length, rna, sigma) -> float: the same for such a chain noised by sigma (nm): sqrt(sigma^2 + chainSpread^2)";
%inline %{
double chainSpread(int length, bool rna) { return FlashIPAPlugin::ChainSpread::ofChain(length, rna); }
double noisedChainSpread(int length, bool rna, double sigma) { return FlashIPAPlugin::ChainSpread::noised(length, rna, sigma); }
%}
%feature("docstring") chainModes "chainModes(length, rna) -> (variances, rest): the variance per coordinate (nm^2) of the first cosine modes of the frame atoms of a real chain of `length` residues (the training split's table, ChainSpread.h) and the rest of its variance per atom and coordinate";
%inline %{
PyObject* chainModes(int length, bool rna) {
    try {
        const FlashIPAPlugin::ChainSpread::Modes modes = FlashIPAPlugin::ChainSpread::modesOfChain(length, rna);
        PyObject* variances = PyTuple_New((Py_ssize_t) modes.variances.size());
        for (size_t k = 0; k < modes.variances.size(); k++)
            PyTuple_SET_ITEM(variances, (Py_ssize_t) k, PyFloat_FromDouble(modes.variances[k]));
        return Py_BuildValue("(Nd)", variances, modes.rest);
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
        return NULL;
    }
}
%}

/* The batched C++ sampler (training/include/flashipa/BackboneSampler.h). Runs without the GIL: LibTorch's
   autograd engine refuses to run while a thread holds it, and sampling can take a while. Returns the frame
   atoms as raw float64 bytes, [numSamples, L, 3, 3] in nm (openmmflashipa.generate reshapes them). */
%feature("docstring") _sampleFrameAtoms "_sampleFrameAtoms(modelPath, types, chains, numSamples, numSteps, sigmaMax, sigmaMin, seed, device, churn=0, scoreScale=1) -> bytes";
%inline %{
static bool flashipa_intList(PyObject* sequence, const char* what, std::vector<int>& out) {
    PyObject* fast = PySequence_Fast(sequence, what);
    if (fast == NULL)
        return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    out.resize(n);
    for (Py_ssize_t i = 0; i < n; i++) {
        long value = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (value == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return false;
        }
        out[i] = (int) value;
    }
    Py_DECREF(fast);
    return true;
}

PyObject* _sampleFrameAtoms(const std::string& modelPath, PyObject* types, PyObject* chains, int numSamples,
                            int numSteps, double sigmaMax, double sigmaMin, int seed, const std::string& device,
                            double churn = 0, double scoreScale = 1) {
    std::vector<int> t, c;
    if (!flashipa_intList(types, "types must be a sequence of ints", t) ||
        !flashipa_intList(chains, "chains must be a sequence of ints", c))
        return NULL;
    std::vector<double> result;
    std::string error;
    int kind = 0;
    Py_BEGIN_ALLOW_THREADS
    try {
        result = FlashIPAPlugin::sampleFrameAtoms(modelPath, t, c, numSamples, numSteps, sigmaMax, sigmaMin, seed, device, churn,
                                                  scoreScale);
    } catch (const std::invalid_argument& e) {
        error = e.what();
        kind = 1;
    } catch (const std::exception& e) {
        error = e.what();
        kind = 2;
    }
    Py_END_ALLOW_THREADS
    if (kind != 0) {
        PyErr_SetString(kind == 1 ? PyExc_ValueError : PyExc_RuntimeError, error.c_str());
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char*) result.data(), (Py_ssize_t) (result.size() * sizeof(double)));
}
%}

/* Where generation starts (ChainSpread::start), for the OpenMM route (AnnealingIntegrator) and for tests: float64
   bytes [numSamples, L, 3, 3] in nm, drawn with torch's CPU generator seeded with `seed`. */
%feature("docstring") _chainStart "_chainStart(types, chains, sigma, numSamples, seed) -> bytes";
%inline %{
PyObject* _chainStart(PyObject* types, PyObject* chains, double sigma, int numSamples, int seed) {
    std::vector<int> t, c;
    if (!flashipa_intList(types, "types must be a sequence of ints", t) ||
        !flashipa_intList(chains, "chains must be a sequence of ints", c))
        return NULL;
    try {
        torch::Generator generator = at::detail::createCPUGenerator(seed);
        torch::Tensor x = FlashIPAPlugin::ChainSpread::start(torch::tensor(std::vector<int64_t>(t.begin(), t.end())),
                                                             torch::tensor(std::vector<int64_t>(c.begin(), c.end())),
                                                             sigma, numSamples, generator).contiguous();
        return PyBytes_FromStringAndSize((const char*) x.data_ptr<double>(), (Py_ssize_t) (x.numel() * sizeof(double)));
    } catch (const std::invalid_argument& e) {
        PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const std::exception& e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
    }
    return NULL;
}
%}

