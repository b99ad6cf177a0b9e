"""The threshold search and the choice among candidates: `calibrate`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from collab_agent import _checks
from collab_agent.calibration.candidates import CANDIDATES, Candidate
from collab_agent.calibration.recording import StepRecord, record_signals
from collab_agent.calibration.runs import Grader, PolicyRun, ProblemRun, default_grader, run_policy
from collab_agent.calibration.thresholds import threshold_options
from collab_agent.errors import ConfigError
from collab_agent.policies.base import Policy, Trigger
from collab_agent.policies.fixed import LargeOnly
from collab_agent.policies.trigreason import StrategicPriming

if TYPE_CHECKING:
    from collab_agent.evaluation.datasets import Problem
    from collab_agent.reasoner import Reasoner


@dataclass
class CandidateResult:
    """The threshold search of one candidate: every run, and the one kept."""

    name: str
    runs: list[PolicyRun]
    chosen: PolicyRun | None
    reached: bool

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reached_target": self.reached,
            "chosen": None if self.chosen is None else self.chosen.summary(),
            "runs": [{k: v for k, v in r.summary().items() if k != "correct"} for r in self.runs],
        }


@dataclass
class CalibrationResult:
    """What `calibrate` found; ``policy`` is the chosen policy, ``to_dict`` the report kept in
    the policy file."""

    policy: Policy
    target_share: float
    problems: list[str]
    small_only: PolicyRun
    large_only: PolicyRun | None
    signals: dict[str, dict[str, Any]]
    candidates: list[CandidateResult]
    chosen: CandidateResult | None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        baselines = {"small-only": self.small_only.summary()}
        if self.large_only is not None:
            baselines["large-only"] = self.large_only.summary()
        return {
            "target_share": self.target_share,
            "problems": self.problems,
            "baselines": baselines,
            "signals": self.signals,
            "candidates": [c.summary() for c in self.candidates],
            "chosen": None if self.chosen is None else self.chosen.name,
            "reached_target": bool(self.chosen and self.chosen.reached),
            **self.settings,
        }


def _best(runs: Sequence[PolicyRun], target: float) -> tuple[PolicyRun, bool]:
    reaching = [r for r in runs if r.small_token_share >= target - 1e-9]
    if reaching:
        return max(reaching, key=lambda r: (r.accuracy, r.small_token_share)), True
    return max(runs, key=lambda r: (r.small_token_share, r.accuracy)), False


def _first_fraction(
    records: dict[str, list[StepRecord]], target_share: float, priming_steps: int
) -> float:
    """The share of the small-only reasoning to reject first, once the priming steps have taken
    over theirs."""
    total = sum(r.tokens for steps in records.values() for r in steps)
    primed = sum(r.tokens for steps in records.values() for r in steps[:priming_steps])
    free = max(1, total - primed)
    return min(1.0, max(0.0, ((1 - target_share) * total - primed) / free))


async def _search(
    candidate: Candidate,
    records: dict[str, list[StepRecord]],
    run: Callable[[Policy, float], Awaitable[PolicyRun]],
    *,
    priming: tuple[Trigger, ...],
    name: str,
    target_share: float,
    first_fraction: float,
    rounds: int,
    tolerance: float,
) -> CandidateResult:
    """One candidate's threshold search: at most ``rounds`` runs of the pair, bracketing the
    rejected share on the measured small-model token share; the best run is kept."""
    runs: list[PolicyRun] = []
    options = threshold_options(records, candidate.name, candidate.bounds, candidate.sticky)
    low, high = -1.0, 2.0  # rejected shares known to reach / to miss the target
    guess = first_fraction
    for _ in range(rounds):
        open_options = [o for o in options if low < o[1] < high]
        if not open_options:
            break
        threshold, rejected = min(open_options, key=lambda o: (abs(o[1] - guess), o[1]))
        policy = Policy(
            triggers=(*priming, candidate.build(threshold)), name=f"{name}-{candidate.name}"
        )
        result = await run(policy, threshold)
        runs.append(result)
        share = result.small_token_share
        if target_share <= share <= target_share + tolerance:
            break
        if share >= target_share:
            low = rejected
        else:
            high = rejected
        # the large model's share grows about in proportion to the rejected share
        guess = rejected * (1 - target_share) / max(1e-6, 1 - share) if rejected else 2 * guess
    chosen, reached = _best(runs, target_share)
    return CandidateResult(candidate.name, runs, chosen, reached)


async def calibrate(
    make_reasoner: Callable[[Policy], Reasoner],
    problems: Sequence[Problem],
    *,
    target_share: float = 0.6,
    candidates: Sequence[Candidate] | None = None,
    priming_steps: int = 1,
    rounds: int = 3,
    tolerance: float = 0.03,
    run_large_only: bool = True,
    grader: Grader = default_grader,
    concurrency: int = 1,
    name: str = "calibrated",
    on_problem: Callable[[str, ProblemRun], None] | None = None,
) -> CalibrationResult:
    """Choose a trigger and its threshold for a model pair on a dev set (see
    `collab_agent.calibration`).

    Args:
        make_reasoner: builds the `Reasoner` of the pair for a policy (same settings each time).
        problems: the dev set.
        target_share: the small model's share of reasoning tokens to reach, in (0, 1).
        candidates: triggers to calibrate (default: every one of `CANDIDATES`).
        priming_steps: strategic-priming steps written by the large model first (TrigReason
            Sec. 3.2; 0 turns priming off), kept in the chosen policy.
        rounds: most full runs of the pair per candidate in the threshold search.
        tolerance: the search stops once a run's share is within this above the target.
        run_large_only: also run the large model alone (the reference accuracy).
        grader: ``grader(answer, problem) -> bool``.
        concurrency: problems answered at a time.
        name: the chosen policy's name.
        on_problem: called after each problem with (policy name, outcome), for progress.
    """
    _checks.in_range("target_share", target_share, 0.0, 1.0, low_open=True, high_open=True)
    _checks.non_negative_int("priming_steps", priming_steps)
    _checks.positive_int("rounds", rounds)
    _checks.positive_int("concurrency", concurrency)
    if not problems:
        raise ConfigError("problems", "the dev set is empty")
    candidates = list(candidates) if candidates is not None else [f() for f in CANDIDATES.values()]
    if not candidates:
        raise ConfigError("candidates", "give at least one candidate trigger")

    async def run(policy: Policy, threshold: float | None = None) -> PolicyRun:
        return await run_policy(
            make_reasoner,
            policy,
            problems,
            grader=grader,
            concurrency=concurrency,
            threshold=threshold,
            on_problem=on_problem,
        )

    # 1. record: small-only with every signal measured, large-only for the reference
    recording = await record_signals(
        make_reasoner,
        problems,
        candidates,
        grader=grader,
        concurrency=concurrency,
        on_problem=on_problem,
    )
    large_only = await run(LargeOnly()) if run_large_only else None

    # 2. search each candidate's threshold
    priming: tuple[Trigger, ...] = (StrategicPriming(steps=priming_steps),) if priming_steps else ()
    first_fraction = _first_fraction(recording.records, target_share, priming_steps)
    results = [
        await _search(
            candidate,
            recording.records,
            run,
            priming=priming,
            name=name,
            target_share=target_share,
            first_fraction=first_fraction,
            rounds=rounds,
            tolerance=tolerance,
        )
        for candidate in candidates
    ]

    # 3. choose
    reaching = [r for r in results if r.reached and r.chosen is not None]
    if reaching:
        best = max(reaching, key=lambda r: (r.chosen.accuracy, r.chosen.small_token_share))  # type: ignore[union-attr]
    else:
        best = max(results, key=lambda r: r.chosen.small_token_share if r.chosen else 0.0)
    by_name = {c.name: c for c in candidates}
    assert best.chosen is not None and best.chosen.threshold is not None
    policy = Policy(
        triggers=(*priming, by_name[best.name].build(best.chosen.threshold)),
        name=name,
        default_author="small",
    )
    return CalibrationResult(
        policy=policy,
        target_share=target_share,
        problems=[p.id for p in problems],
        small_only=recording.small_only,
        large_only=large_only,
        signals=recording.signals,
        candidates=results,
        chosen=best,
        settings={"priming_steps": priming_steps, "rounds": rounds},
    )


__all__ = ["CalibrationResult", "CandidateResult", "calibrate"]
