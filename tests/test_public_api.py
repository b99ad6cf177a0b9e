"""The public API a new user meets: one import name, typed, light to import."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import collab_agent

ROOT = Path(__file__).resolve().parents[1]


def test_every_exported_name_resolves_from_the_top_level() -> None:
    for name in collab_agent.__all__:
        assert getattr(collab_agent, name) is not None, name


def test_policies_triggers_and_the_scripted_backend_come_from_the_top_level() -> None:
    from collab_agent import BaseTrigger, LargeOnly, Policy, ScriptedBackend, SmallOnly, TrigReason
    from collab_agent.policies import base, fixed
    from collab_agent.testing import ScriptedBackend as Scripted

    assert (BaseTrigger, Policy, SmallOnly, LargeOnly) == (
        base.BaseTrigger,
        base.Policy,
        fixed.SmallOnly,
        fixed.LargeOnly,
    )
    assert ScriptedBackend is Scripted
    assert SmallOnly().name == "small-only" and TrigReason().name


def test_import_loads_neither_langchain_nor_torch() -> None:
    code = (
        "import sys, collab_agent; "
        "print(sorted(m for m in ('torch', 'transformers', 'langchain_core') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]"


def test_each_lazy_export_has_a_type_checking_import_so_mypy_sees_its_type() -> None:
    tree = ast.parse((ROOT / "collab_agent" / "__init__.py").read_text())
    typed: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                typed.update({alias.name: str(imp.module) for alias in imp.names})
    assert typed == collab_agent._LAZY


def test_the_wheel_ships_py_typed(tmp_path: Path) -> None:
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            *("-w", str(tmp_path), str(ROOT)),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("collab_agent-*.whl")
    assert "collab_agent/py.typed" in zipfile.ZipFile(wheel).namelist()
