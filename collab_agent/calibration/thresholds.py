"""The thresholds a signal offers on the recorded small-model steps, each with the share of
small-model tokens it would hand to the large model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collab_agent.calibration.recording import StepRecord


def _running_max(values: Sequence[float | None]) -> list[float | None]:
    """Each step's largest value so far: an escalating trigger has taken over a step once any
    step up to it was above the threshold."""
    out: list[float | None] = []
    top: float | None = None
    for v in values:
        if v is not None:
            top = v if top is None else max(top, v)
        out.append(top)
    return out


def threshold_options(
    records: Mapping[str, list[StepRecord]],
    name: str,
    bounds: tuple[float, float] = (-math.inf, math.inf),
    sticky: bool = False,
) -> list[tuple[float, float]]:
    """Every distinct threshold of a signal on the recorded small-model steps, with the share of
    recorded small-model tokens it would reject (steps whose value is above it; with ``sticky``,
    steps at or after the first one above it): above the top value (rejects none), between
    neighbouring values, below the lowest (rejects all measured). Sorted by rejected share."""
    total = sum(r.tokens for steps in records.values() for r in steps)
    weighted: dict[float, int] = {}
    for steps in records.values():
        measured = [r.values.get(name) for r in steps]
        for r, v in zip(steps, _running_max(measured) if sticky else measured, strict=True):
            if v is not None:
                weighted[v] = weighted.get(v, 0) + r.tokens
    if not weighted or total == 0:
        return [(min(max(0.0, bounds[0]), bounds[1]), 0.0)]
    values = sorted(weighted)
    options = [(values[-1], 0.0)]
    above = weighted[values[-1]]
    for i in range(len(values) - 2, -1, -1):
        options.append(((values[i] + values[i + 1]) / 2, above / total))
        above += weighted[values[i]]
    span = values[-1] - values[0]
    options.append((values[0] - max(1e-6, 0.5 * span if span else 1.0), above / total))
    clamped: dict[float, float] = {}
    for t, q in options:  # clamping may merge options: keep the first (smallest share)
        clamped.setdefault(min(max(t, bounds[0]), bounds[1]), q)
    return sorted(((t, q) for t, q in clamped.items()), key=lambda o: o[1])


def threshold_for_fraction(
    records: Mapping[str, list[StepRecord]],
    name: str,
    fraction: float,
    bounds: tuple[float, float] = (-math.inf, math.inf),
    sticky: bool = False,
) -> tuple[float, float]:
    """The threshold whose rejected share of recorded small-model tokens (see
    `threshold_options`) is closest to ``fraction``; returns ``(threshold, rejected share)``."""
    options = threshold_options(records, name, bounds, sticky)
    return min(options, key=lambda o: (abs(o[1] - fraction), o[1]))


__all__ = ["threshold_for_fraction", "threshold_options"]
