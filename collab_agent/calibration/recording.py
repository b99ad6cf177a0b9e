"""The recording run: the small model alone, every candidate signal measured on each of its steps
(nothing fires), and how well each signal predicts a wrong answer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collab_agent.calibration.auroc import signal_quality
from collab_agent.calibration.runs import Grader, PolicyRun, ProblemRun, default_grader, run_policy
from collab_agent.policies.base import BaseTrigger, Policy, Reject, StepContext

if TYPE_CHECKING:
    from collab_agent.calibration.candidates import Candidate
    from collab_agent.evaluation.datasets import Problem
    from collab_agent.reasoner import Reasoner
    from collab_agent.trace import Step, Trace


@dataclass
class StepRecord:
    """One small-model step of the recording run and every candidate's signal on it."""

    index: int
    tokens: int
    values: dict[str, float | None]


@dataclass
class SignalRecorder(BaseTrigger):
    """A trigger that never fires: it measures every candidate on each small-model step and keeps
    the values per conversation in ``records`` (for calibration only)."""

    candidates: Sequence[Candidate] = ()
    records: dict[str, list[StepRecord]] = field(default_factory=dict)
    name: str = "signal_recorder"

    async def after_step(
        self, trace: Trace, step: Step, context: StepContext | None = None
    ) -> Reject | None:
        if step.author == "small":
            values = {c.name: await c.measure(trace, step, context) for c in self.candidates}
            self.records.setdefault(trace.conversation_id, []).append(
                StepRecord(step.index, step.tokens, values)
            )
        return None


@dataclass
class Recording:
    """The recording run: the small model alone, every candidate signal measured on each of its
    steps (nothing fires), and how well each signal predicts a wrong answer.

    Attributes:
        small_only: the small-only outcomes.
        records: the measured steps per conversation id (in problem order).
        signals: per signal, `signal_quality` (AUROC over steps and over problems).
    """

    small_only: PolicyRun
    records: dict[str, list[StepRecord]]
    signals: dict[str, dict[str, Any]]

    @classmethod
    def score(
        cls,
        small_only: PolicyRun,
        records: dict[str, list[StepRecord]],
        candidates: Sequence[Candidate],
    ) -> Recording:
        """The recording of ``small_only`` whose steps were measured into ``records``: the
        records in problem order, and each candidate's `signal_quality`."""
        ordered = {run.conversation_id: records[run.conversation_id] for run in small_only.problems}
        wrong = {run.conversation_id: not run.correct for run in small_only.problems}
        signals = {c.name: signal_quality(ordered, wrong, c.name) for c in candidates}
        return cls(small_only, ordered, signals)

    def to_dict(self) -> dict[str, Any]:
        """The figures, and every step's values per problem id (for analysis)."""
        steps = {
            run.problem_id: {
                "correct": run.correct,
                "answer": run.answer,
                "steps": [
                    {"index": r.index, "tokens": r.tokens, **r.values}
                    for r in self.records.get(run.conversation_id, [])
                ],
            }
            for run in self.small_only.problems
        }
        return {"small-only": self.small_only.summary(), "signals": self.signals, "problems": steps}


async def record_signals(
    make_reasoner: Callable[[Policy], Reasoner],
    problems: Sequence[Problem],
    candidates: Sequence[Candidate],
    *,
    grader: Grader = default_grader,
    concurrency: int = 1,
    on_problem: Callable[[str, ProblemRun], None] | None = None,
) -> Recording:
    """Run the small model alone on ``problems`` while measuring every candidate signal on each
    of its steps; grade the answers and score each signal (AUROC for a wrong answer)."""
    recorder = SignalRecorder(candidates=candidates)
    policy = Policy(
        triggers=(recorder,), name="small-only", default_author="small", answer_by="small"
    )
    small_only = await run_policy(
        make_reasoner,
        policy,
        problems,
        grader=grader,
        concurrency=concurrency,
        on_problem=on_problem,
    )
    records = {
        run.conversation_id: recorder.records.get(run.conversation_id, [])
        for run in small_only.problems
    }
    return Recording.score(small_only, records, candidates)


__all__ = ["Recording", "SignalRecorder", "StepRecord", "record_signals"]
