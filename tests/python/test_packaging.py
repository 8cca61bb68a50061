"""The package as scripts/bootstrap.sh installs it (pip install -e ., pyproject.toml): the pure-Python modules
are the source files themselves (no copies that could go stale), and the built parts (plugin libraries, default
model) come from the installed package's lib folder. (test_force_wrapper.py checks the version.)"""

import importlib.metadata
import os

import pytest

import openmmflashipa
import openmmflashipa.cli
from openmmflashipa import _plugins

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE_PACKAGE = os.path.join(ROOT, "wrappers", "python", "openmmflashipa")


def _installed():
    try:
        importlib.metadata.distribution("openmmflashipa")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# The GPU machine serves the package from its build tree on PYTHONPATH (scripts/device-build.sh): nothing to check.
pytestmark = pytest.mark.skipif(not _installed(), reason="openmmflashipa is not installed (served from PYTHONPATH, as on "
                                                         "the GPU machine), so there is no installed layout to check")


def test_pure_python_modules_are_served_from_the_source_tree():
    for module in (openmmflashipa, openmmflashipa.cli, openmmflashipa.topology):
        assert os.path.dirname(os.path.realpath(module.__file__)) == os.path.realpath(SOURCE_PACKAGE), module.__file__


def test_plugins_and_default_model_come_from_the_installed_package():
    folder = _plugins.pluginDirectory()
    assert os.path.basename(folder) == "lib" and os.path.basename(os.path.dirname(folder)) == "openmmflashipa"
    assert not os.path.realpath(folder).startswith(os.path.realpath(ROOT) + os.sep) or ".venv" in folder, folder
    assert os.path.exists(os.path.join(folder, "flashipa-default.safetensors"))
    assert any(path.startswith(folder) for path in openmmflashipa.pluginLibraries)
