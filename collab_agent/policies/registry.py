"""Policies by name, as the command line and config files give them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from collab_agent.errors import ConfigError
from collab_agent.policies.base import Policy
from collab_agent.policies.fixed import LargeOnly, SmallOnly
from collab_agent.policies.signals import Escalation, SurpriseReason
from collab_agent.policies.trigreason import TrigReason


def _specreason(**options: Any) -> Policy:
    from collab_agent.policies.specreason import SpecReason

    return SpecReason(**options)


BUILTIN: dict[str, Callable[..., Policy]] = {
    "small-only": SmallOnly,
    "large-only": LargeOnly,
    "trigreason": TrigReason,
    "specreason": _specreason,
    "surprise": SurpriseReason,
    "escalation": Escalation,
}


def resolve_policy(name: str, **options: Any) -> Policy:
    """A built-in policy by name (``small-only``, ``large-only``, ``trigreason``,
    ``specreason``, ``surprise``, ``escalation``), a user's factory as ``module:function`` (``options`` go to
    the factory), or a policy file written by ``collab-agent calibrate`` (a ``.json`` path;
    its thresholds are the calibrated ones, so ``options`` are ignored)."""
    if name.endswith(".json") or (name not in BUILTIN and ":" not in name and Path(name).is_file()):
        from collab_agent.calibration import load_policy_file

        return load_policy_file(name)
    if name in BUILTIN:
        factory = BUILTIN[name]
    elif ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(
                "policy", f"cannot import module {module_name!r} of {name!r}: {error}"
            ) from error
        found = getattr(module, attribute, None)
        if not callable(found):
            raise ConfigError("policy", f"{module_name!r} has no callable {attribute!r}")
        factory = found
    else:
        raise ConfigError(
            "policy", f"{name!r} is not one of {sorted(BUILTIN)} nor a module:factory reference"
        )
    policy = factory(**options)
    if not isinstance(policy, Policy):
        raise ConfigError("policy", f"{name!r} returned {type(policy).__name__}, not a Policy")
    if ":" in name and policy.name == "policy":
        policy.name = name
    return policy
