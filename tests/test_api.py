"""The public API: ``psalign`` exports its main objects lazily, and ``__version__``."""

import importlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import psalign

ROOT = Path(__file__).resolve().parents[1]
# The [project] table's version line, read without tomllib (Python 3.10 has none).
PYPROJECT_VERSION = re.search(
    r'(?ms)^\[project\]$.*?^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text()
).group(1)
HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "peft")


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_psalign_and_its_version_import_no_heavy_module():
    out = run_python(
        "import json, sys, psalign\n"
        "version = psalign.__version__\n"
        "names = dir(psalign)\n"
        f"print(json.dumps([version, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]))"
    )
    version, heavy = json.loads(out)
    assert heavy == []
    assert version == metadata.version("psalign") == PYPROJECT_VERSION


def test_the_main_objects_are_exported():
    for name in ("PSAAdapter", "load_adapter", "dpo_loss", "diffusion_dpo_loss", "TrainingConfig", "train"):
        assert name in psalign.__all__
    from psalign.adapter import PSAAdapter, load_adapter
    from psalign.loss import diffusion_dpo_loss, dpo_loss
    from psalign.training import TrainingConfig, train

    assert psalign.PSAAdapter is PSAAdapter
    assert psalign.load_adapter is load_adapter
    assert psalign.dpo_loss is dpo_loss
    assert psalign.diffusion_dpo_loss is diffusion_dpo_loss
    assert psalign.TrainingConfig is TrainingConfig
    assert psalign.train is train


def test_every_export_resolves_to_its_modules_object():
    assert "__version__" in psalign.__all__
    for name, module in psalign._EXPORTS.items():
        assert name in psalign.__all__
        assert getattr(psalign, name) is getattr(importlib.import_module(module), name), name
    assert set(psalign._EXPORTS) <= set(dir(psalign))


def test_from_import_works_for_every_export():
    namespace: dict = {}
    exec("from psalign import " + ", ".join(psalign._EXPORTS), namespace)
    assert namespace["dpo_loss"] is psalign.dpo_loss


def test_subpackages_are_reachable_without_importing_them_first():
    out = run_python("import psalign; print(psalign.toy.__name__, psalign.categories.CATEGORIES[0])")
    assert out.split() == ["psalign.toy", "Hate"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_psalign_name'"):
        psalign.not_a_psalign_name  # noqa: B018
    assert not hasattr(psalign, "not_a_psalign_name")


def test_version_falls_back_to_pyproject_without_package_metadata(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert psalign._read_version() == PYPROJECT_VERSION


def test_version_fallback_reads_pyproject_without_tomllib(monkeypatch):
    """Python 3.10 has no tomllib: the fallback reads the [project] table's version line."""

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now raises ImportError
    assert psalign._read_version() == PYPROJECT_VERSION
