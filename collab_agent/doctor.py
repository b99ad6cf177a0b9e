"""The checks of ``collab-agent doctor``: can this machine run the project, and how to fix it.

Each check is one `Finding`: what was checked, whether it is fine, what was seen, and the exact
command that fixes a problem. Nothing here changes the machine; the checks read the interpreter,
the installed distributions, the bundled model packages (and their sha256), the caches and the
free disk.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collab_agent.backends import bundled

MIN_PYTHON = (3, 11)
DISTRIBUTION = "collab-agent"
LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
"""The lock file of a source checkout (absent when the package was installed from a wheel)."""

CONVERTED_BYTES_PER_GGUF_BYTE = 3
"""A bf16 safetensors folder is about this many times its Q4 GGUF (0.5B: 0.49 GB -> 1.0 GB in
bf16 plus the embedding copy; 1.5B: 1.1 GB -> 3.1 GB)."""


@dataclass(frozen=True)
class Finding:
    """One check.

    Attributes:
        check: what was checked, in a few words.
        ok: whether it is fine.
        detail: what was seen.
        fix: the command (or step) that fixes it; ``None`` when ``ok``.
    """

    check: str
    ok: bool
    detail: str
    fix: str | None = None


def _fix_install() -> str:
    return "make install" if LOCK_FILE.is_file() else f"pip install --upgrade {DISTRIBUTION}"


def check_python() -> Finding:
    """The interpreter is recent enough."""
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info[:2] >= MIN_PYTHON
    need = ".".join(map(str, MIN_PYTHON))
    return Finding(
        "Python version",
        ok,
        f"Python {version} at {sys.executable}" + ("" if ok else f"; {need} or newer is needed"),
        None if ok else f"install Python {need} (e.g. `pyenv install {need}`), then make install",
    )


def check_virtualenv() -> Finding:
    """The project runs from a virtual environment (``make install`` builds ``.venv``)."""
    ok = sys.prefix != sys.base_prefix
    return Finding(
        "virtual environment",
        ok,
        f"running from {sys.prefix}" if ok else "running from the system Python, not a venv",
        None if ok else "make install  (then use .venv/bin/collab-agent)",
    )


def _locked_versions(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, version = line.partition("==")
        if sep:
            pins[canonicalize_name(name)] = version.strip()
    return pins


def check_dependencies() -> Iterator[Finding]:
    """Every requirement of the package is installed at a version its range allows, and (in a
    source checkout) at the version the lock file pins."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        yield Finding(
            "collab-agent installed",
            False,
            "the collab-agent distribution is not installed in this environment",
            _fix_install(),
        )
        return
    locked = _locked_versions(LOCK_FILE) if LOCK_FILE.is_file() else {}
    problems: list[str] = []
    checked = 0
    for text in requires:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra
        checked += 1
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} missing")
            continue
        public = Version(installed).public
        if not requirement.specifier.contains(public, prereleases=True):
            problems.append(f"{requirement.name} {installed} outside {requirement.specifier}")
        pinned = locked.get(canonicalize_name(requirement.name))
        if pinned is not None and Version(public) != Version(pinned):
            problems.append(f"{requirement.name} {installed}, the lock pins {pinned}")
    where = f" and {LOCK_FILE.name}" if locked else ""
    yield Finding(
        "dependencies",
        not problems,
        "; ".join(problems) or f"all {checked} requirements match pyproject{where}",
        _fix_install() if problems else None,
    )


def check_engines() -> Iterator[Finding]:
    """The modules the first-use path needs without importing them itself: transformers reads
    GGUF only with ``gguf`` and ``accelerate``; llama.cpp's server comes from ``xllamacpp``."""
    needs = {
        "gguf": "transformers reads the bundled GGUF files",
        "accelerate": "transformers loads GGUF weights",
        "xllamacpp": "llama.cpp's server (llamacpp: specs, the demo)",
    }
    for module, why in needs.items():
        ok = importlib.util.find_spec(module) is not None
        yield Finding(
            f"{module} importable",
            ok,
            f"needed because {why}" + ("" if ok else f"; `import {module}` fails"),
            None if ok else _fix_install(),
        )


def check_bundled(*, verify: bool) -> Iterator[Finding]:
    """Each bundled model's packages are installed and (``verify``) hash to the known sha256."""
    from collab_agent.errors import ModelNotInstalledError

    for model in bundled.BUNDLED.values():
        try:
            parts = bundled.part_paths(model.name)
        except ModelNotInstalledError:
            yield Finding(
                f"bundled {model.name}",
                False,
                "its packages are not installed",
                model.pip_command,
            )
            continue
        joined = bundled.joined_gguf_path(model.name)
        source = [joined] if joined.is_file() else parts
        state = "converted" if bundled.is_cached(model.name) else "not yet converted (first use)"
        if not verify:
            yield Finding(f"bundled {model.name}", True, f"installed, {state}")
            continue
        ok = bundled.sha256_of(source) == model.sha256
        reinstall = model.pip_command.replace("--no-deps", "--no-deps --force-reinstall")
        fix = (
            f"rm {joined} && {reinstall}" if joined.is_file() else reinstall
        )  # a damaged join is rebuilt from the parts on the next use
        yield Finding(
            f"bundled {model.name}",
            ok,
            f"sha256 {'matches' if ok else 'does not match'} ({'joined file' if source == [joined] else 'parts'}), {state}",
            None if ok else fix,
        )


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk() -> Finding:
    """Room in the cache folder for what first use still has to write."""
    root = bundled.cache_root()
    needed = 0
    for model in bundled.BUNDLED.values():
        if len(model.parts) > 1 and not bundled.joined_gguf_path(model.name).is_file():
            needed += model.size  # the joined GGUF
        if not bundled.is_cached(model.name):
            needed += CONVERTED_BYTES_PER_GGUF_BYTE * model.size
    free = shutil.disk_usage(_existing_parent(root)).free
    gib = 1 << 30
    ok = free >= needed
    return Finding(
        "free disk for the model cache",
        ok,
        f"{free / gib:.1f} GiB free under {root}, first use still writes up to {needed / gib:.1f} GiB",
        None
        if ok
        else f"free {(needed - free) / gib:.1f} GiB there, or point XDG_CACHE_HOME at a disk with room",
    )


def run_checks(*, verify: bool = True) -> list[Finding]:
    """Every check, in the order a fix should be tried."""
    return [
        check_python(),
        check_virtualenv(),
        *check_dependencies(),
        *check_engines(),
        *check_bundled(verify=verify),
        check_disk(),
    ]


def __getattr__(name: str) -> Any:
    # the command moved to `collab_agent.cli.doctor`; looked up on use, as that module imports
    # this one
    if name in ("doctor_command", "register"):
        return getattr(importlib.import_module("collab_agent.cli.doctor"), name)
    raise AttributeError(f"module 'collab_agent.doctor' has no attribute {name!r}")
