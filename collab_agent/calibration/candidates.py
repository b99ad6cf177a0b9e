"""What calibration scores: the candidate triggers, each a signal measured on a small-model step
and the trigger it becomes at a threshold.

The candidates are read from the trigger registry (`collab_agent.policies.triggers.TRIGGERS`):
every registered `StepSignal` at its default settings and `CognitiveOffload`, plus two named
variants of `SmallUncertainty` (``small_min_prob``, ``escalation``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collab_agent.errors import ConfigError
from collab_agent.policies.base import StepContext, Trigger
from collab_agent.policies.signals import SmallUncertainty, StepSignal
from collab_agent.policies.triggers import TRIGGERS
from collab_agent.policies.trigreason import CognitiveOffload, confident_share

if TYPE_CHECKING:
    from collab_agent.trace import Step, Trace

Measure = Callable[["Trace", "Step", "StepContext | None"], Awaitable["float | None"]]
"""A candidate's signal on a step: the trace before it, the step, and the running
collaboration's `StepContext` for signals that call a model."""


@dataclass(frozen=True)
class Candidate:
    """A trigger whose threshold calibration chooses.

    Attributes:
        name: the trigger's name (a key of the results).
        measure: the step's signal value (``None``: not measurable, never fires).
        build: the trigger at a given threshold (it fires when the signal is above it).
        bounds: the thresholds the trigger accepts (others are clamped into them).
        sticky: a firing hands the rest of the reasoning to the large model (an escalating
            `StepSignal`), so a threshold takes over every step from the first one above it.
    """

    name: str
    measure: Measure
    build: Callable[[float], Trigger]
    bounds: tuple[float, float] = (-math.inf, math.inf)
    sticky: bool = False


def signal_candidate(prototype: StepSignal, name: str | None = None) -> Candidate:
    """A candidate from a `StepSignal` prototype; its ``threshold`` is what is calibrated.
    ``name`` tells apart two candidates built on one trigger class (default: the trigger's)."""

    async def measure(trace: Trace, step: Step, context: StepContext | None) -> float | None:
        if step.tokens < prototype.min_tokens:
            return None
        return await prototype.signal(trace, step, context)

    return Candidate(
        name or prototype.name,
        measure,
        lambda t: dataclasses.replace(prototype, threshold=float(t)),
        sticky=prototype.escalate,
    )


def cognitive_offload_candidate(tau: float = 1.05) -> Candidate:
    """TrigReason's cognitive offload (Sec. 3.3) with ``rho`` calibrated instead of the paper's."""

    async def measure(trace: Trace, step: Step, context: StepContext | None) -> float | None:
        return confident_share(step.logprobs, tau) if step.logprobs else None

    return Candidate(
        CognitiveOffload.name,
        measure,
        lambda t: CognitiveOffload(tau=tau, rho=min(1.0, max(1e-6, float(t)))),
        bounds=(1e-6, 1.0),
    )


def _registered_signal(cls: type[StepSignal]) -> Callable[[], Candidate]:
    return lambda: signal_candidate(cls())


_CANDIDATE_FACTORIES: tuple[Callable[[], Candidate], ...] = (
    *(
        _registered_signal(cls)
        for cls in TRIGGERS.values()
        if isinstance(cls, type) and issubclass(cls, StepSignal)
    ),
    lambda: signal_candidate(SmallUncertainty(statistic="max_nll"), name="small_min_prob"),
    lambda: signal_candidate(
        SmallUncertainty(statistic="max_nll", escalate=True), name="escalation"
    ),
    cognitive_offload_candidate,
)

CANDIDATES: dict[str, Callable[[], Candidate]] = {
    factory().name: factory for factory in _CANDIDATE_FACTORIES
}
"""The candidates ``collab-agent calibrate --signals`` chooses from, by name: every `StepSignal`
registered in `collab_agent.policies.triggers.TRIGGERS` (at its default settings), the named
variants of one (``small_min_prob``, ``escalation``) and TrigReason's cognitive offload."""


def candidates_by_name(names: Sequence[str]) -> list[Candidate]:
    """The built-in candidates named (see `CANDIDATES`)."""
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise ConfigError("signals", f"must name some of {sorted(CANDIDATES)}, got {list(names)!r}")
    return [CANDIDATES[n]() for n in names]


__all__ = [
    "CANDIDATES",
    "Candidate",
    "Measure",
    "candidates_by_name",
    "cognitive_offload_candidate",
    "signal_candidate",
]
