"""Runs of one policy over the dev set, on the evaluation runner's loop, and their figures."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collab_agent.evaluation.datasets import Problem
    from collab_agent.evaluation.runner import Job
    from collab_agent.policies.base import Policy
    from collab_agent.reasoner import Reasoner
    from collab_agent.trace import Trace


@dataclass
class ProblemRun:
    """One problem answered by one policy."""

    problem_id: str
    correct: bool
    small_tokens: int
    large_tokens: int
    large_input_tokens: int
    large_output_tokens: int
    conversation_id: str
    answer: str = ""

    @classmethod
    def from_trace(
        cls, problem: Problem, trace: Trace, correct: bool, conversation_id: str
    ) -> ProblemRun:
        """The outcome of ``problem`` as ``trace`` records it, graded ``correct``."""
        large = trace.usage["large"]
        return cls(
            problem_id=problem.id,
            correct=correct,
            small_tokens=trace.tokens_by("small"),
            large_tokens=trace.tokens_by("large"),
            large_input_tokens=large.input_tokens,
            large_output_tokens=large.completion_tokens,
            conversation_id=conversation_id,
            answer=trace.answer,
        )


@dataclass
class PolicyRun:
    """A policy over the dev set: per-problem outcomes and the aggregate figures."""

    policy: str
    problems: list[ProblemRun]
    threshold: float | None = None

    @property
    def accuracy(self) -> float:
        return sum(p.correct for p in self.problems) / len(self.problems) if self.problems else 0.0

    @property
    def small_token_share(self) -> float:
        small = sum(p.small_tokens for p in self.problems)
        total = small + sum(p.large_tokens for p in self.problems)
        return small / total if total else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "threshold": self.threshold,
            "accuracy": self.accuracy,
            "small_token_share": self.small_token_share,
            "lrm_input_tokens": sum(p.large_input_tokens for p in self.problems),
            "lrm_output_tokens": sum(p.large_output_tokens for p in self.problems),
            "correct": sorted(p.problem_id for p in self.problems if p.correct),
        }


Grader = Callable[[str, "Problem"], bool]


def default_grader(answer: str, problem: Problem) -> bool:
    """`collab_agent.evaluation.grading.is_correct` of the answer against the reference."""
    from collab_agent.evaluation.grading import is_correct

    return is_correct(answer, problem.answer)


async def run_policy(
    make_reasoner: Callable[[Policy], Reasoner],
    policy: Policy,
    problems: Sequence[Problem],
    *,
    grader: Grader = default_grader,
    concurrency: int = 1,
    threshold: float | None = None,
    on_problem: Callable[[str, ProblemRun], None] | None = None,
) -> PolicyRun:
    """Answer every problem with ``policy`` (``concurrency`` at a time, on the evaluation
    runner's `run_jobs`) and grade the answers; any error stops the run."""
    from collab_agent.evaluation.runner import Job, run_jobs

    reasoner = make_reasoner(policy)
    jobs = [
        Job(policy, p, conversation_id=f"calibrate-{policy.name}-{p.id}-{uuid.uuid4().hex[:8]}")
        for p in problems
    ]
    runs: dict[str, ProblemRun] = {}

    def done(job: Job, trace: Trace | Exception, seconds: float) -> None:
        if isinstance(trace, Exception):  # not reached: errors are not kept
            raise trace
        correct = bool(grader(trace.answer, job.problem))
        run = ProblemRun.from_trace(job.problem, trace, correct, job.conversation_id)
        runs[job.conversation_id] = run
        if on_problem is not None:
            on_problem(policy.name, run)

    await run_jobs(
        jobs, lambda _policy, _sample: reasoner, done, concurrency=concurrency, keep_errors=False
    )
    return PolicyRun(policy.name, [runs[job.conversation_id] for job in jobs], threshold)


__all__ = ["Grader", "PolicyRun", "ProblemRun", "default_grader", "run_policy"]
