"""Replay: the candidate signals measured on the small-model steps of recorded traces (an eval
run's ``traces.jsonl``) instead of running the small model again."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from collab_agent import _checks
from collab_agent.calibration.recording import Recording, StepRecord
from collab_agent.calibration.runs import PolicyRun, ProblemRun
from collab_agent.errors import CapabilityError

if TYPE_CHECKING:
    from collab_agent.backends.base import Backend
    from collab_agent.calibration.candidates import Candidate
    from collab_agent.evaluation.datasets import Problem
    from collab_agent.prompting import ReasoningFormat
    from collab_agent.trace import Trace
    from collab_agent.types import Sampling


class _NoModel:
    """The session's stand-in where a replay was given no model: a signal that calls it learns
    so from a `CapabilityError` naming what is missing."""

    def __init__(self, role: str) -> None:
        self.name = f"no {role} model given"

    async def generate(self, request: Any) -> Any:
        raise CapabilityError(f"replaying recorded traces: {self.name}, and a signal called it")


async def replay_signals(
    runs: Sequence[tuple[Problem, Trace, bool]],
    candidates: Sequence[Candidate],
    *,
    large: Backend | None = None,
    small: Backend | None = None,
    format: ReasoningFormat | None = None,
    sampling: Sampling | None = None,
    concurrency: int = 1,
) -> Recording:
    """Measure every candidate on the small-model steps of recorded traces, as `record_signals`
    does live, without running the small model again: ``runs`` are ``(problem, trace, correct)``
    of a small-only run (``collab-agent eval``'s ``traces.jsonl``). Each step is measured on the
    trace up to it; a signal that calls the large model (`LargeSurprise`) calls ``large`` through
    a session like the reasoner's (so a local large model reuses its cache from step to step;
    without ``large`` such a signal raises `CapabilityError`). ``small`` is only a stand-in for
    the session (no built-in candidate calls it)."""
    from collab_agent.backends.base import release_shielded
    from collab_agent.limits import map_limited
    from collab_agent.prompting import STEPWISE
    from collab_agent.session import Session
    from collab_agent.trace import Trace
    from collab_agent.types import GREEDY

    _checks.positive_int("concurrency", concurrency)
    records: dict[str, list[StepRecord]] = {}
    fmt = format or STEPWISE

    async def one(run: tuple[Problem, Trace, bool]) -> ProblemRun:
        problem, recorded, correct = run
        trace = Trace(conversation_id=f"replay-{problem.id}-{uuid.uuid4().hex[:8]}")
        session = Session.open(
            small or _NoModel("small"),
            large or _NoModel("large"),
            trace,
            problem.messages(),
            fmt,
            sampling or GREEDY,
        )
        steps: list[StepRecord] = []
        try:
            for step in recorded.steps:
                if step.author == "small":
                    values = {c.name: await c.measure(trace, step, session) for c in candidates}
                    steps.append(StepRecord(step.index, step.tokens, values))
                trace.steps.append(step)
        finally:
            if large is not None:
                await release_shielded(large, conversation_id=trace.conversation_id)
        records[trace.conversation_id] = steps
        return ProblemRun.from_trace(problem, recorded, correct, trace.conversation_id)

    small_only = PolicyRun("small-only", await map_limited(one, runs, max_concurrency=concurrency))
    return Recording.score(small_only, records, candidates)


__all__ = ["replay_signals"]
