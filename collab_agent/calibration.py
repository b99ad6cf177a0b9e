"""Calibration per model pair: the thresholds of a trigger-based policy chosen from a dev set.

The thresholds of trigger-based collaboration depend on the pair: TrigReason tunes ``rho`` per
small model (0.85 for R1-Distill-1.5B, 0.75 for Qwen3-0.6B, Sec. 4). `calibrate` chooses them from
a dev set instead of by hand:

1. *record*: the small model answers every problem alone while every candidate signal is
   measured on each of its steps (nothing fires); the large model answers alone too, for the
   reference accuracy. Per-signal AUROC for predicting a wrong small-only answer is reported.
2. *search*: for each candidate trigger, the threshold is searched (a few full runs of the pair,
   bracketing on the measured small-model token share) so that the small model writes at least
   ``target_share`` of the reasoning tokens; among the thresholds run, the most accurate one
   that reaches the target is kept.
3. *choose*: the most accurate candidate that reaches the target (ties: higher share) becomes the
   policy, written as a JSON policy file that ``collab-agent run/eval --policy FILE.json`` and
   ``CollabChatModel`` load with `load_policy_file` (`collab_agent.policies.files`, re-exported
   here).

The small-model token share is aggregated over the data set: small-model reasoning tokens over
all reasoning tokens of accepted steps, summed over problems.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from collab_agent import _checks
from collab_agent.errors import CapabilityError, ConfigError
from collab_agent.policies.base import BaseTrigger, Policy, Reject, StepContext, Trigger
from collab_agent.policies.files import (
    POLICY_FILE_FORMAT,
    POLICY_FILE_VERSION,
    load_policy_file,
    policy_from_dict,
    policy_to_dict,
    save_policy_file,
    trigger_from_dict,
    trigger_to_dict,
    trigger_types,
)
from collab_agent.policies.fixed import LargeOnly
from collab_agent.policies.signals import SmallUncertainty, StepSignal
from collab_agent.policies.triggers import TRIGGERS
from collab_agent.policies.trigreason import (
    CognitiveOffload,
    StrategicPriming,
    confident_share,
)

if TYPE_CHECKING:
    from collab_agent.backends.base import Backend
    from collab_agent.evaluation.datasets import Problem
    from collab_agent.prompting import ReasoningFormat
    from collab_agent.reasoner import Reasoner
    from collab_agent.trace import Step, Trace
    from collab_agent.types import Sampling

# =============================================================================== candidates
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


# =============================================================================== recording
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


# =============================================================================== runs
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
    """Answer every problem with ``policy`` (``concurrency`` at a time) and grade the answers."""
    reasoner = make_reasoner(policy)
    results: dict[int, ProblemRun] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int, problem: Problem) -> None:
        async with limiter:
            conversation_id = f"calibrate-{policy.name}-{problem.id}-{uuid.uuid4().hex[:8]}"
            trace = await reasoner.run(problem.messages(), conversation_id=conversation_id)
            large = trace.usage["large"]
            run = ProblemRun(
                problem_id=problem.id,
                correct=bool(grader(trace.answer, problem)),
                small_tokens=trace.tokens_by("small"),
                large_tokens=trace.tokens_by("large"),
                large_input_tokens=large.input_tokens,
                large_output_tokens=large.completion_tokens,
                conversation_id=conversation_id,
                answer=trace.answer,
            )
            results[i] = run
            if on_problem is not None:
                on_problem(policy.name, run)

    async with anyio.create_task_group() as group:
        for i, problem in enumerate(problems):
            group.start_soon(one, i, problem)
    return PolicyRun(policy.name, [results[i] for i in range(len(problems))], threshold)


# =============================================================================== statistics
def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for predicting ``labels`` (ties count half);
    ``None`` when one class is empty."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        return None
    ranked = sorted(scores)
    # average ranks (1-based) with ties
    rank: dict[float, float] = {}
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1] == ranked[i]:
            j += 1
        rank[ranked[i]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(rank[s] for s in positives)
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def signal_quality(
    records: Mapping[str, list[StepRecord]], wrong: Mapping[str, bool], name: str
) -> dict[str, Any]:
    """How well a signal predicts a wrong small-only answer: AUROC over steps (each step labelled
    by its problem's outcome) and over problems (the problem's largest step value)."""
    step_scores: list[float] = []
    step_labels: list[bool] = []
    problem_scores: list[float] = []
    problem_labels: list[bool] = []
    for conversation, steps in records.items():
        values = [r.values.get(name) for r in steps]
        measured = [v for v in values if v is not None]
        label = wrong[conversation]
        step_scores += measured
        step_labels += [label] * len(measured)
        if measured:
            problem_scores.append(max(measured))
            problem_labels.append(label)
    mean = {
        outcome: (sum(s for s, y in zip(step_scores, step_labels, strict=True) if y == flag) / n)
        if (n := sum(y == flag for y in step_labels))
        else None
        for outcome, flag in (("wrong", True), ("right", False))
    }
    return {
        "step_auroc": auroc(step_scores, step_labels),
        "problem_auroc": auroc(problem_scores, problem_labels),
        "measured_steps": len(step_scores),
        "mean_in_wrong": mean["wrong"],
        "mean_in_right": mean["right"],
    }


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
    wrong = {run.conversation_id: not run.correct for run in small_only.problems}
    signals = {c.name: signal_quality(records, wrong, c.name) for c in candidates}
    return Recording(small_only, records, signals)


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
        return ProblemRun(
            problem_id=problem.id,
            correct=correct,
            small_tokens=recorded.tokens_by("small"),
            large_tokens=recorded.tokens_by("large"),
            large_input_tokens=recorded.usage["large"].input_tokens,
            large_output_tokens=recorded.usage["large"].completion_tokens,
            conversation_id=trace.conversation_id,
            answer=recorded.answer,
        )

    small_only = PolicyRun("small-only", await map_limited(one, runs, max_concurrency=concurrency))
    ordered = {run.conversation_id: records[run.conversation_id] for run in small_only.problems}
    wrong = {run.conversation_id: not run.correct for run in small_only.problems}
    signals = {c.name: signal_quality(ordered, wrong, c.name) for c in candidates}
    return Recording(small_only, ordered, signals)


# =============================================================================== calibration
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
    """Choose a trigger and its threshold for a model pair on a dev set (see the module doc).

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
    common = {"grader": grader, "concurrency": concurrency, "on_problem": on_problem}

    # 1. record: small-only with every signal measured, large-only for the reference
    recording = await record_signals(make_reasoner, problems, candidates, **common)  # type: ignore[arg-type]
    small_only, records, signals = recording.small_only, recording.records, recording.signals
    large_only = (
        await run_policy(make_reasoner, LargeOnly(), problems, **common)  # type: ignore[arg-type]
        if run_large_only
        else None
    )

    # share of the small-only reasoning the priming steps take over
    total = sum(r.tokens for steps in records.values() for r in steps)
    primed = sum(r.tokens for steps in records.values() for r in steps[:priming_steps])
    free = max(1, total - primed)
    first_fraction = min(1.0, max(0.0, ((1 - target_share) * total - primed) / free))

    # 2. search each candidate's threshold
    priming: tuple[Trigger, ...] = (StrategicPriming(steps=priming_steps),) if priming_steps else ()
    results: list[CandidateResult] = []
    for candidate in candidates:
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
            run = await run_policy(
                make_reasoner,
                policy,
                problems,
                threshold=threshold,
                **common,  # type: ignore[arg-type]
            )
            runs.append(run)
            share = run.small_token_share
            if target_share <= share <= target_share + tolerance:
                break
            if share >= target_share:
                low = rejected
            else:
                high = rejected
            # the large model's share grows about in proportion to the rejected share
            guess = rejected * (1 - target_share) / max(1e-6, 1 - share) if rejected else 2 * guess
        chosen, reached = _best(runs, target_share)
        results.append(CandidateResult(candidate.name, runs, chosen, reached))

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
        small_only=small_only,
        large_only=large_only,
        signals=signals,
        candidates=results,
        chosen=best,
        settings={"priming_steps": priming_steps, "rounds": rounds},
    )


__all__ = [
    "CANDIDATES",
    "POLICY_FILE_FORMAT",
    "POLICY_FILE_VERSION",
    "CalibrationResult",
    "Candidate",
    "CandidateResult",
    "PolicyRun",
    "ProblemRun",
    "Recording",
    "SignalRecorder",
    "StepRecord",
    "auroc",
    "calibrate",
    "candidates_by_name",
    "cognitive_offload_candidate",
    "load_policy_file",
    "policy_from_dict",
    "policy_to_dict",
    "record_signals",
    "replay_signals",
    "run_policy",
    "save_policy_file",
    "signal_candidate",
    "signal_quality",
    "threshold_for_fraction",
    "threshold_options",
    "trigger_from_dict",
    "trigger_to_dict",
    "trigger_types",
]
