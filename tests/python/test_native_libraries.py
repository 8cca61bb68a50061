"""The plugin's native libraries bind the C++ runtime's functions to libstdc++ itself.

LibTorch's and OpenMM's wheel libraries export unversioned copies of libstdc++ functions that their
toolchain linked in statically (std::filesystem, std::exception_ptr internals, ...). The dynamic linker binds a
reference to the first definition in its search order; while our libraries listed libstdc++ after LibTorch,
calls from our code went to those copies (std::filesystem::remove_all jumped to address 0 on the CI machine).
CMakeLists.txt puts libstdc++ first; these tests fail if that is lost (docs/KNOWN-ISSUES.md)."""

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import openmmflashipa
from openmmflashipa import _plugins

# Functions that LibTorch's libraries export copies of (checked with nm on torch 2.11's wheel).
SHADOWED = [
    "_ZNSt10filesystem10remove_allERKNS_7__cxx114pathE",      # std::filesystem::remove_all (libtorch.so)
    "_ZNSt15__exception_ptr13exception_ptr10_M_releaseEv",    # exception_ptr::_M_release (libtorch_cpu.so)
]


def ourLibraries():
    folder = _plugins.pluginDirectory()
    paths = sorted(glob.glob(os.path.join(folder, "lib*.so")))
    # The extension modules sit in the installed package (an editable install serves only the .py files from
    # the source tree), so ask the import system where they are.
    for module in ("openmmflashipa._openmmflashipa", "openmmflashipa._training"):
        paths.append(importlib.util.find_spec(module).origin)
    return paths


def needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_libstdcxx_is_needed_before_torch_and_openmm():
    libraries = ourLibraries()
    assert len(libraries) >= 3, libraries
    for path in libraries:
        names = needed(path)
        assert "libstdc++.so.6" in names, (path, names)
        first = names.index("libstdc++.so.6")
        later = [n for n in names[:first] if n.startswith(("libtorch", "libc10", "libOpenMM", "libFlashIPA"))]
        assert not later, "%s loads %s before libstdc++: %s" % (os.path.basename(path), later, names)


# Functions only the C++ runtime defines: a library exporting them carries a static copy of the runtime
# (libstdc++.a), which crashed next to the shared one in a Python process (formatting a number).
RUNTIME_ONLY = ["_ZNSo9_M_insertIlEERSoT_", "_ZNKSt7codecvtIDsc11__mbstate_tE10do_unshiftERS0_PcS3_RS3_"]


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not installed")
def test_no_library_carries_a_static_copy_of_the_runtime():
    for path in ourLibraries():
        out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
        defined = {line.split()[-1] for line in out.splitlines() if line.strip()}
        copies = [symbol for symbol in RUNTIME_ONLY if symbol in defined]
        assert not copies, "%s defines C++ runtime functions %s (linked libstdc++.a?)" % (os.path.basename(path), copies)


class DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def test_shadowed_runtime_functions_resolve_to_libstdcxx_in_this_process():
    # The process has imported openmmflashipa, so the plugins are loaded as in any user script. dlsym on a
    # library's handle searches that library and its dependencies in load order: the scope its own calls
    # are bound in (after the process's global scope, which holds neither libstdc++ nor LibTorch here).
    assert _plugins.loaded
    libdl = ctypes.CDLL(ctypes.util.find_library("dl") or "libc.so.6")
    libdl.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    checked = 0
    for path in ourLibraries():
        try:
            library = ctypes.CDLL(path)
        except OSError:  # the CUDA plugin without a CUDA driver
            continue
        checked += 1
        for symbol in SHADOWED:
            address = ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value
            info = DlInfo()
            assert libdl.dladdr(address, ctypes.byref(info)) != 0, symbol
            owner = os.path.basename(info.dli_fname.decode())
            assert owner.startswith("libstdc++"), "%s: %s resolves to %s, not libstdc++" % (
                os.path.basename(path), symbol, owner)
    assert checked >= 3


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) not installed")
def test_plugin_links_the_model_library_and_not_the_training_library():
    # The layout (README "Layout"): the plugin runs models (libFlashIPAModels); data sets, the trainer and the
    # sampler live in libFlashIPATraining, which only the Python module and flashipa-train load.
    folder = _plugins.pluginDirectory()
    plugin = needed(os.path.join(folder, "libOpenMMFlashIPA.so"))
    assert "libFlashIPAModels.so" in plugin, plugin
    for name in ("libOpenMMFlashIPA.so", "libOpenMMFlashIPAReference.so", "libFlashIPAModels.so"):
        assert "libFlashIPATraining.so" not in needed(os.path.join(folder, name)), name
    assert "libFlashIPATraining.so" in needed(importlib.util.find_spec("openmmflashipa._training").origin)


def test_python_handling_sits_in_the_plugin_and_not_in_the_model_library():
    # The GIL is released where OpenMM calls into the model (openmmapi/include/internal/ReleasedGIL.h, used by each
    # platform's kernel); the model library stays free of Python. The names are looked up at run time (dlsym),
    # so they appear in the library as strings, not as imported symbols.
    folder = _plugins.pluginDirectory()

    def mentions(name, text):
        with open(os.path.join(folder, name), "rb") as f:
            return text in f.read()

    assert mentions("libOpenMMFlashIPA.so", b"PyEval_SaveThread")
    assert not mentions("libFlashIPAModels.so", b"PyEval_SaveThread")
    assert not mentions("libFlashIPAModels.so", b"PyGILState_Check")
