"""Policy files: a policy and its triggers as JSON, written by ``collab-agent calibrate`` and
read by ``--policy FILE.json``, `CollabChatModel` and `resolve_policy`.

A trigger is stored as ``{"type": NAME, **fields}``: ``NAME`` is its key in
`collab_agent.policies.triggers.TRIGGERS`, or ``"module:Class"`` for any other dataclass trigger.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from collab_agent.errors import ConfigError
from collab_agent.policies.base import Policy, Trigger
from collab_agent.policies.triggers import TRIGGERS

POLICY_FILE_FORMAT = "collab-agent-policy"
POLICY_FILE_VERSION = 1


def trigger_types() -> dict[str, type]:
    """Trigger classes a policy file names by their ``name`` (``"large_surprise"``...): a copy of
    `TRIGGERS`; any other dataclass trigger is named ``"module:Class"``."""
    return dict(TRIGGERS)


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    return False


def trigger_to_dict(trigger: Trigger) -> dict[str, Any]:
    """A trigger as a JSON object: ``{"type": NAME, **fields}``. The trigger must be a
    dataclass; its init fields that are shown in its repr and hold JSON values are kept."""
    if not dataclasses.is_dataclass(trigger) or isinstance(trigger, type):
        raise ConfigError(
            "policy", f"trigger {trigger.name!r} is not a dataclass and cannot be saved to a file"
        )
    cls = type(trigger)
    known = trigger_types()
    kind = (
        trigger.name if known.get(trigger.name) is cls else f"{cls.__module__}:{cls.__qualname__}"
    )
    out: dict[str, Any] = {"type": kind}
    for f in dataclasses.fields(trigger):
        if not f.init or not f.repr or f.name.startswith("_"):
            continue
        value = getattr(trigger, f.name)
        if f.name == "name" and value == cls.name:
            continue
        if _jsonable(value):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def trigger_from_dict(data: Mapping[str, Any], where: str = "triggers[0]") -> Trigger:
    """The trigger a policy file's entry describes (see `trigger_to_dict`)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("type"), str):
        raise ConfigError(where, f"must be an object with a 'type' string, got {data!r}")
    kind = data["type"]
    options = {k: v for k, v in data.items() if k != "type"}
    known = trigger_types()
    if kind in known:
        cls: Any = known[kind]
    elif ":" in kind:
        module_name, _, attribute = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(where, f"cannot find trigger class {kind!r}: {error}") from error
    else:
        raise ConfigError(
            where, f"unknown trigger type {kind!r}; known: {sorted(known)} or module:Class"
        )
    try:
        trigger = cls(**options)
    except TypeError as error:
        raise ConfigError(where, f"bad fields for {kind!r}: {error}") from error
    if not isinstance(trigger, Trigger):
        raise ConfigError(where, f"{kind!r} is not a trigger")
    return trigger


def policy_to_dict(policy: Policy, calibration: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A policy as the JSON object of a policy file (``calibration`` kept as written)."""
    out: dict[str, Any] = {
        "format": POLICY_FILE_FORMAT,
        "version": POLICY_FILE_VERSION,
        "name": policy.name,
        "default_author": policy.default_author,
        "answer_by": policy.answer_by,
        "triggers": [trigger_to_dict(t) for t in policy.triggers],
    }
    if calibration is not None:
        out["calibration"] = dict(calibration)
    return out


def policy_from_dict(data: Mapping[str, Any], source: str = "policy") -> Policy:
    """The policy a policy file's JSON object describes."""
    if not isinstance(data, Mapping) or data.get("format") != POLICY_FILE_FORMAT:
        raise ConfigError(
            source, f'is not a collab-agent policy file (needs "format": "{POLICY_FILE_FORMAT}")'
        )
    version = data.get("version")
    if version != POLICY_FILE_VERSION:
        raise ConfigError(
            source,
            f"has version {version!r}; this collab-agent reads version {POLICY_FILE_VERSION}",
        )
    triggers = data.get("triggers", [])
    if not isinstance(triggers, list):
        raise ConfigError(f"{source}: triggers", "must be a list of trigger objects")
    return Policy(
        triggers=tuple(
            trigger_from_dict(t, f"{source}: triggers[{i}]") for i, t in enumerate(triggers)
        ),
        name=str(data.get("name") or "calibrated"),
        default_author=data.get("default_author", "small"),
        answer_by=data.get("answer_by"),
    )


def save_policy_file(
    policy: Policy, path: str | os.PathLike[str], calibration: Mapping[str, Any] | None = None
) -> Path:
    """Write ``policy`` (and the calibration that produced it) as a JSON policy file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(policy_to_dict(policy, calibration), indent=2) + "\n", encoding="utf-8"
    )
    return target


def load_policy_file(path: str | os.PathLike[str]) -> Policy:
    """The policy stored in a JSON policy file (written by ``collab-agent calibrate``).

    Raises:
        ConfigError: the file is missing, is not JSON, or does not describe a policy; the
            message names the file.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("policy", f"cannot read policy file {source!r}: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            "policy", f"{source!r} is not valid JSON ({error.msg} at line {error.lineno})"
        ) from error
    return policy_from_dict(data, source)


__all__ = [
    "POLICY_FILE_FORMAT",
    "POLICY_FILE_VERSION",
    "load_policy_file",
    "policy_from_dict",
    "policy_to_dict",
    "save_policy_file",
    "trigger_from_dict",
    "trigger_to_dict",
    "trigger_types",
]
