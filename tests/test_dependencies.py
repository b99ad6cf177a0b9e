"""What a new machine installs is what the code needs, at the versions CI tested.

A green CI once hid a missing install step: transformers needs ``accelerate`` to read GGUF files,
nothing declared it, and only the first use of a bundled model (skipped on a machine with a warm
cache) imported it. These tests read the code's imports and the declared and locked requirements,
so an undeclared or unlocked dependency fails here, on every machine.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"

SIDE_VENV_MODULES = {"kvpress"}
"""Imported only by code that runs in a venv of its own (``make install-kvpress``)."""

NEEDED_WITHOUT_IMPORT = {"gguf", "accelerate"}
"""Distributions the code needs although it never imports them: transformers reads GGUF files
only with both installed (the bundled models' first use)."""


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared() -> dict[str, Requirement]:
    """Every requirement of pyproject.toml, core and extras, by canonical name."""
    project = _pyproject()["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts.extend(extra)
    return {canonicalize_name(Requirement(t).name): Requirement(t) for t in texts}


def _core() -> set[str]:
    return {canonicalize_name(Requirement(t).name) for t in _pyproject()["project"]["dependencies"]}


def _locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{LOCK.name}: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _imported_modules() -> set[str]:
    """Top-level names of the third-party modules the package imports anywhere."""
    names: set[str] = set()
    for path in (ROOT / "collab_agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "collab_agent"}


def test_every_imported_module_is_declared_in_pyproject() -> None:
    declared = _declared()
    owners = importlib.metadata.packages_distributions()
    undeclared = []
    for module in sorted(_imported_modules() - SIDE_VENV_MODULES):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        if not dists:
            undeclared.append(f"{module} (not installed here either)")
        elif not dists & declared.keys():
            undeclared.append(f"{module} (from {', '.join(sorted(dists))})")
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_gguf_loading_dependencies_are_core_requirements() -> None:
    missing = NEEDED_WITHOUT_IMPORT - _core()
    assert not missing, f"transformers' GGUF path needs {missing}; declare them as dependencies"


def test_every_declared_requirement_is_locked_within_its_range() -> None:
    locked = _locked()
    problems = []
    for name, requirement in _declared().items():
        if name not in locked:
            problems.append(f"{name} is not in {LOCK.name}")
        elif not requirement.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{name}=={locked[name]} is outside {requirement.specifier}")
    assert not problems, problems


def test_lower_bounds_are_the_locked_versions() -> None:
    """pyproject's lower bounds are versions that were tested: the locked ones."""
    locked = _locked()
    stale = []
    for name, requirement in _declared().items():
        floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        if not floors or name not in locked:
            continue
        floor = max(floors)
        if locked[name].release[: len(floor.release)] != floor.release:
            stale.append(f"{name}: >={floor} but {locked[name]} is what CI tested")
    assert not stale, stale


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="runs inside the project's venv")
def test_installed_versions_are_the_locked_ones() -> None:
    """The venv CI tests in was built from the lock file, so what passed is what is pinned."""
    drift = []
    for name, version in _locked().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional part installed by another target (llama-cpp-python's server)
        if Version(installed.public) != version:
            drift.append(f"{name}: installed {installed}, locked {version}")
    assert not drift, f"rebuild the venv with `make install`: {drift}"
