"""Policies by name, as the command line and config files give them."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from collab_agent.errors import ConfigError
from collab_agent.policies.base import Policy
from collab_agent.policies.files import load_policy_file
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


ENTRY_POINT_GROUP = "collab_agent.policies"
"""Entry-point group under which installed packages register policy factories by name."""


def resolve_policy(name: str, *, allow_code: bool = False, **options: Any) -> Policy:
    """A policy by name: a built-in (``small-only``, ``large-only``, ``trigreason``,
    ``specreason``, ``surprise``, ``escalation``), a factory an installed package registers under
    the ``collab_agent.policies`` entry-point group, a policy file written by ``collab-agent
    calibrate`` (a ``.json`` path; its thresholds are the calibrated ones, so ``options`` are
    ignored), or, only with ``allow_code=True``, any ``module:function`` (``options`` go to it).

    ``allow_code`` is for names the application itself chose (the command line's
    ``--policy``); a name that arrives with a request must never import and run code.

    Raises:
        ConfigError: the name is none of the above, or names code while ``allow_code`` is off.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("policy", f"must be a non-empty policy name, got {name!r}")
    if name.endswith(".json") or (name not in BUILTIN and ":" not in name and Path(name).is_file()):
        return load_policy_file(name)
    registered = _registered()
    if name in BUILTIN:
        factory = BUILTIN[name]
    elif name in registered:
        factory = registered[name].load()
    elif ":" in name:
        if not allow_code:
            raise ConfigError(
                "policy",
                f"{name!r} names code to import and run; that needs allow_code_policies=True "
                f"(or register the factory under the {ENTRY_POINT_GROUP!r} entry-point group); "
                f"built-in names are {sorted(BUILTIN)}",
            )
        factory = _import_factory(name)
    else:
        raise ConfigError(
            "policy",
            f"{name!r} is not one of {sorted(BUILTIN) + sorted(registered)} nor a module:factory "
            "reference",
        )
    policy = factory(**options)
    if not isinstance(policy, Policy):
        raise ConfigError("policy", f"{name!r} returned {type(policy).__name__}, not a Policy")
    if ":" in name and policy.name == "policy":
        policy.name = name
    return policy


def _registered() -> dict[str, EntryPoint]:
    """Policy factories installed packages register (``[project.entry-points]``)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import_factory(name: str) -> Callable[..., Any]:
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
    return found  # type: ignore[no-any-return]
