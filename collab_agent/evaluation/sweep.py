"""Threshold sweeps: one policy at several settings, and the accuracy-offload Pareto frontier.

A sweep such as ``trigreason:rho=0.6,0.75,0.9`` expands into one policy per value, named
``trigreason[rho=0.6]`` and so on, which `evaluate` runs like any other policy. The frontier is
the set of policies no other policy beats on both accuracy and small-model token share (the
trade-off TrigReason's Fig. 1 and SpecReason's Fig. 4 draw), and `report.plot_summary` draws every
policy family as a curve on one plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from collab_agent.errors import ConfigError
from collab_agent.policies.base import Policy


@dataclass(frozen=True)
class Sweep:
    """One policy run at several values of one of its factory's arguments.

    Attributes:
        policy: the policy's name as `resolve_policy` takes it (``trigreason``, ``surprise``,
            ``module:factory``).
        parameter: the factory argument to vary (``rho``, ``threshold``, ...).
        values: the values, in the order given.
    """

    policy: str
    parameter: str
    values: tuple[float | int | str, ...]

    def names(self) -> list[str]:
        """The display name of each expanded policy: ``policy[parameter=value]``."""
        return [setting_name(self.policy, self.parameter, v) for v in self.values]


def setting_name(policy: str, parameter: str, value: object) -> str:
    return (
        f"{policy}[{parameter}={value:g}]"
        if isinstance(value, float)
        else (f"{policy}[{parameter}={value}]")
    )


def family_of(name: str) -> str:
    """The policy a display name belongs to: ``trigreason[rho=0.6]`` -> ``trigreason``."""
    return name.split("[", 1)[0] if name.endswith("]") and "[" in name else name


def _value(text: str) -> float | int | str:
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_sweep(text: str) -> Sweep:
    """Parse ``POLICY:PARAMETER=V1,V2,...`` (``module:factory`` policies keep their colon:
    the parameter is what follows the last ``:`` before ``=``)."""
    head, eq, values = text.partition("=")
    policy, colon, parameter = head.rpartition(":")
    if not eq or not colon or not policy or not parameter.isidentifier():
        raise ConfigError(
            "--sweep",
            f"expected POLICY:PARAMETER=V1,V2,... (e.g. trigreason:rho=0.7,0.85), got {text!r}",
        )
    parsed = tuple(_value(v) for v in values.split(",") if v.strip())
    if len(parsed) < 2:
        raise ConfigError("--sweep", f"{text!r} names fewer than two values to sweep")
    if len(set(parsed)) != len(parsed):
        raise ConfigError("--sweep", f"{text!r} repeats a value")
    return Sweep(policy.strip(), parameter, parsed)


def expand_sweeps(
    sweeps: Sequence[Sweep], options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Policy]:
    """One policy per swept value, by display name; ``options`` are the other arguments given to
    each policy's factory (by policy name), as ``evaluate``'s ``policy_options``."""
    from collab_agent.policies.registry import resolve_policy

    policies: dict[str, Policy] = {}
    for sweep in sweeps:
        base = dict((options or {}).get(sweep.policy, {}))
        for name, value in zip(sweep.names(), sweep.values, strict=True):
            try:
                policy = resolve_policy(
                    sweep.policy, allow_code=True, **(base | {sweep.parameter: value})
                )
            except TypeError as error:
                raise ConfigError(
                    "--sweep",
                    f"{sweep.policy!r} does not take {sweep.parameter}={value!r}: {error}",
                ) from error
            policy.name = name
            if name in policies:
                raise ConfigError("--sweep", f"{name} is swept twice")
            policies[name] = policy
    return policies


def pareto_frontier(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The policies no other policy beats on both accuracy and small-model token share (at least
    as good on both, better on one), in order of rising small-model share."""
    points = {
        name: (float(f["small_token_share"]), float(f["accuracy"])) for name, f in summary.items()
    }

    def dominated(name: str) -> bool:
        share, accuracy = points[name]
        return any(
            s >= share and a >= accuracy and (s > share or a > accuracy)
            for other, (s, a) in points.items()
            if other != name
        )

    return sorted((n for n in points if not dominated(n)), key=lambda n: points[n])
