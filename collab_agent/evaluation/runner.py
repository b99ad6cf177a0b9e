"""The evaluation runner: every policy on the same problems, concurrently, resumably.

`evaluate` runs each policy on each problem ``samples`` times (up to ``concurrency`` at once, in
one anyio task group bounded by a `CapacityLimiter`), grades each answer, and appends one
`ProblemRecord` per run to ``OUT/records.jsonl`` (its full trace to ``OUT/traces.jsonl``) as soon
as it finishes. A rerun with the same ``out`` skips what is already done, so an interrupted
evaluation picks up where it stopped. The summary per policy (`report.summarise`) is written to
``OUT/summary.json`` with a plot of accuracy against small-model share.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from collab_agent import _checks, defaults
from collab_agent.backends.base import Backend
from collab_agent.core.config import ReasoningConfig
from collab_agent.core.formats import ReasoningFormat, StepSplitter, choose_splitter
from collab_agent.core.reasoner import Reasoner
from collab_agent.core.trace import Trace
from collab_agent.errors import ConfigError
from collab_agent.evaluation.datasets import Problem, load_dataset
from collab_agent.evaluation.records import (
    CONFIG_FILE,
    OVERCONFIDENT_RHO,
    OVERCONFIDENT_TAU,
    PLOT_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    TRACES_FILE,
    ProblemRecord,
    append_json_line,
    check_settings,
    read_records,
    read_traces,
)
from collab_agent.policies.base import Policy
from collab_agent.types import Sampling


@dataclass
class EvalReport:
    """What `evaluate` returns.

    Attributes:
        summary: per policy name, the figures of `report.summarise` (``accuracy``,
            ``relative_accuracy``, ``small_token_share``, ``small_step_share``, ``lrm_calls``,
            ``lrm_input_tokens``, ``lrm_output_tokens``, ``latency_s``, ``cost``, ...).
        records: every record of this evaluation (resumed ones included), one per policy,
            problem and sample.
        out: the folder the records, summary and plot were written to (``None`` if none).
        ran: how many runs this call performed (the rest were resumed from ``out``).
    """

    summary: dict[str, dict[str, Any]]
    records: list[ProblemRecord]
    out: Path | None = None
    ran: int = 0

    def to_json(self) -> str:
        return json.dumps(self.summary, indent=2, sort_keys=False)


def _check_config(out: Path, config: dict[str, Any], resume: bool) -> None:
    """Refuse to mix results of different models or settings in one ``out`` folder."""
    if resume:
        check_settings(
            out,
            config,
            "out",
            "choose a new output folder or start afresh (resume=False / --fresh)",
        )
    else:
        for name in (RECORDS_FILE, TRACES_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


# ---------------------------------------------------------------------------- evaluate
def resolve_policies(
    policies: Sequence[str | Policy] | Mapping[str, Policy] | str,
    options: Mapping[str, Mapping[str, Any]],
) -> list[Policy]:
    """The policies an evaluation runs: names (built-in, ``module:factory``, policy files) get
    their ``options``; a mapping renames each policy to its key. Names must be unique."""
    from collab_agent.policies.registry import resolve_policy

    if isinstance(policies, str):
        policies = [p.strip() for p in policies.split(",") if p.strip()]
    if isinstance(policies, Mapping):
        resolved = []
        for name, policy in policies.items():
            policy.name = name
            resolved.append(policy)
    else:
        resolved = [
            p if isinstance(p, Policy) else resolve_policy(p, allow_code=True, **options.get(p, {}))
            for p in policies
        ]
    if not resolved:
        raise ConfigError("policies", "name at least one policy")
    names = [p.name for p in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError("policies", f"two policies share the name(s) {duplicates}")
    return resolved


EVAL_CONFIG = ReasoningConfig(
    temperature=0.0,
    max_steps=defaults.EVAL_MAX_STEPS,
    step_max_tokens=defaults.EVAL_STEP_MAX_TOKENS,
    answer_max_tokens=defaults.EVAL_ANSWER_MAX_TOKENS,
)
"""The reasoning settings of an evaluation unless given (``collab-agent eval`` and
``calibrate`` default to the same): greedy, so runs repeat, and limits sized for short math
answers."""


@dataclass(eq=False)
class Job:
    """One run of `run_jobs`: ``policy`` on ``problem``, sample ``sample``, as conversation
    ``conversation_id`` (default ``eval:POLICY:PROBLEM:SAMPLE``)."""

    policy: Policy
    problem: Problem
    sample: int = 0
    conversation_id: str = ""

    def __post_init__(self) -> None:
        if not self.conversation_id:
            self.conversation_id = f"eval:{self.policy.name}:{self.problem.id}:{self.sample}"


async def run_jobs(
    jobs: Iterable[Job],
    reasoner_for: Callable[[Policy, int], Reasoner],
    done: Callable[[Job, Trace | Exception, float], None],
    *,
    concurrency: int = 1,
    problem_timeout_s: float | None = None,
    keep_errors: bool = True,
) -> None:
    """The loop of `evaluate` (and of calibration): answer every job with the reasoner
    ``reasoner_for(policy, sample)``, up to ``concurrency`` at once in one task group, and call
    ``done(job, trace, seconds)`` as each one finishes.

    With ``keep_errors``, a run that fails (a timeout after ``problem_timeout_s`` included, or an
    error ``done`` raises for its trace) is handed to ``done`` as the exception in place of the
    trace, and the other runs go on; a `ConfigError` (a misconfigured policy or backend fails
    every problem) always stops the loop. Without ``keep_errors`` every error stops it.
    """
    limiter = anyio.CapacityLimiter(concurrency)

    async def run_one(job: Job) -> None:
        async with limiter:
            started = time.perf_counter()
            try:
                with anyio.fail_after(problem_timeout_s) if problem_timeout_s else nullcontext():
                    trace = await reasoner_for(job.policy, job.sample).run(
                        job.problem.messages(), conversation_id=job.conversation_id
                    )
                done(job, trace, time.perf_counter() - started)
            except ConfigError:
                raise  # a misconfigured policy or backend fails every problem: stop now
            except Exception as error:  # recorded, retried by the next run
                if not keep_errors:
                    raise
                done(job, error, time.perf_counter() - started)

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(run_one, job)


async def evaluate(
    data: Sequence[Problem] | str | os.PathLike[str],
    policies: Sequence[str | Policy] | Mapping[str, Policy] | str,
    *,
    small: Backend,
    large: Backend,
    samples: int = 1,
    concurrency: int = 1,
    limit: int | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = True,
    config: ReasoningConfig = EVAL_CONFIG,
    sampling: Sampling | None = None,
    seed: int | None = None,
    format: ReasoningFormat | None = None,
    splitter: StepSplitter | str | None = None,
    budget: int | None = None,
    max_steps: int | None = None,
    step_max_tokens: int | None = None,
    answer_max_tokens: int | None = None,
    policy_options: Mapping[str, Mapping[str, Any]] | None = None,
    problem_timeout_s: float | None = None,
    progress: bool = False,
    describe: Mapping[str, Any] | None = None,
) -> EvalReport:
    """Run every policy on the same problems and summarise accuracy, offload, latency and cost.

    Args:
        data: problems, a JSON Lines file, or a bundled data set's name (``"gsm8k_test"``).
        policies: policy names (``"small-only"``, ``"large-only"``, ``"specreason"``,
            ``"trigreason"``, ``"module:factory"``; a comma-separated string works too),
            `Policy` objects, or a mapping of display name to policy.
        small: the small model's backend.
        large: the large model's backend.
        samples: runs per problem and policy; accuracy is the mean over them.
        concurrency: most runs at once.
        limit: the first ``limit`` problems only.
        out: folder for ``records.jsonl``, ``traces.jsonl``, ``summary.json`` and the plot;
            ``None`` keeps everything in memory.
        resume: skip runs already recorded in ``out`` (from an interrupted or smaller run).
        config: the reasoning settings of every run (default `EVAL_CONFIG`: greedy, at most
            48 steps of 256 tokens and a 48-token answer); with a ``seed``, sample ``i`` uses
            seed ``seed + i``.
        sampling, seed, format, splitter, budget, max_steps, step_max_tokens,
            answer_max_tokens: each overrides that setting of ``config`` when given, as in
            `Reasoner` (``splitter=None``: the pair's default).
        policy_options: keyword arguments per policy name given to its factory
            (``{"trigreason": {"priming_steps": 1}}``).
        problem_timeout_s: a run taking longer is stopped and recorded as an error.
        progress: show a progress bar on stderr.
        describe: extra settings to note in ``config.json`` (the model specs, ...); a rerun
            into the same ``out`` with different values is refused.

    Returns:
        An `EvalReport` with the summary per policy and every record.
    """
    from collab_agent.evaluation.report import plot_summary, summarise

    _checks.positive_int("samples", samples)
    _checks.positive_int("concurrency", concurrency)
    if problem_timeout_s is not None:
        _checks.in_range("problem_timeout_s", problem_timeout_s, 0.0, math.inf, low_open=True)
    problems = (
        load_dataset(data, limit=limit)
        if isinstance(data, (str, os.PathLike))
        else list(data)[: limit if limit is not None else None]
    )
    if not problems:
        raise ConfigError("data", "holds no problems")
    resolved = resolve_policies(policies, policy_options or {})
    settings = config.override(
        sampling=sampling,
        seed=seed,
        format=format,
        splitter=splitter,
        budget=budget,
        max_steps=max_steps,
        step_max_tokens=step_max_tokens,
        answer_max_tokens=answer_max_tokens,
    )
    fmt = settings.format
    settings = replace(
        settings,
        splitter=choose_splitter(
            settings.splitter, small.name, large.name, fmt.splitter, think=bool(fmt.close)
        ),
    )
    from collab_agent.cache.named import describe_method

    out_dir = Path(out) if out is not None else None
    recorded = {
        "small": small.name,
        "large": large.name,
        "format": fmt.name,
        "splitter": settings.splitter.name if isinstance(settings.splitter, StepSplitter) else "",
        "sampling": asdict(settings.sampling),
        "seed": settings.seed,
        "budget": settings.budget,
        "max_steps": settings.max_steps,
        "step_max_tokens": settings.step_max_tokens,
        "answer_max_tokens": settings.answer_max_tokens,
        "large_kv_method": describe_method(getattr(large, "kv_method", None)),
        **(dict(describe) if describe else {}),
    }
    done: dict[tuple[str, str, int], ProblemRecord] = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_config(out_dir, recorded, resume)
        done = {r.key: r for r in read_records(out_dir) if r.error is None}
    wanted = {(p.name, q.id, s) for p in resolved for q in problems for s in range(samples)}
    jobs = [
        (policy, problem, s)
        for problem in problems
        for s in range(samples)
        for policy in resolved
        if (policy.name, problem.id, s) not in done
    ]
    results: list[ProblemRecord] = [r for k, r in done.items() if k in wanted]

    def reasoner_for(policy: Policy, sample: int) -> Reasoner:
        base = settings.seed
        sample_seed = None if base is None else base + sample
        return Reasoner(small, large, policy, config=replace(settings, seed=sample_seed))

    def finished(job: Job, outcome: Trace | Exception, seconds: float, advance: Any) -> None:
        policy, problem, sample = job.policy, job.problem, job.sample
        trace = outcome if isinstance(outcome, Trace) else None
        if trace is not None:
            record = ProblemRecord.from_trace(policy.name, problem, sample, trace)
            record.judge_scores = _pop_judge_scores(policy, job.conversation_id)
        else:
            error = (
                f"timeout after {problem_timeout_s} s"
                if isinstance(outcome, TimeoutError)
                else f"{type(outcome).__name__}: {outcome}"
            )
            record = ProblemRecord(
                policy.name, problem.id, sample, problem.answer, error=error, latency_s=seconds
            )
        results.append(record)
        if out_dir is not None:
            append_json_line(out_dir / RECORDS_FILE, record.to_dict())
            if trace is not None:
                append_json_line(
                    out_dir / TRACES_FILE,
                    {"policy": policy.name, "problem_id": problem.id, "sample": sample}
                    | {"trace": trace.to_dict()},
                )
        advance(record)

    with _progress_bar(progress, total=len(wanted), done=len(wanted) - len(jobs)) as advance:
        await run_jobs(
            [Job(policy, problem, sample) for policy, problem, sample in jobs],
            reasoner_for,
            lambda job, outcome, seconds: finished(job, outcome, seconds, advance),
            concurrency=concurrency,
            problem_timeout_s=problem_timeout_s,
        )

    order = {p.name: i for i, p in enumerate(resolved)}
    results.sort(key=lambda r: (order.get(r.policy, 0), r.problem_id, r.sample))
    thresholds = {p.name: _policy_extras(p).get("judge_threshold") for p in resolved}
    summary = summarise(
        results,
        policies=[p.name for p in resolved],
        judge_thresholds={k: v for k, v in thresholds.items() if v is not None},
    )
    if out_dir is not None:
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        plot_summary(summary, out_dir / PLOT_FILE)
    return EvalReport(summary=summary, records=results, out=out_dir, ran=len(jobs))


def _pop_judge_scores(policy: Policy, conversation_id: str) -> list[float | None]:
    """The scores a judge trigger (one with ``pop_scores``, like SpecReason's) gave in one run."""
    scores: list[float | None] = []
    for trigger in policy.triggers:
        pop = getattr(trigger, "pop_scores", None)
        if callable(pop):
            scores.extend(pop(conversation_id))
    return scores


def _policy_extras(policy: Policy) -> dict[str, Any]:
    """The threshold of a judge trigger, to report its accept rate."""
    for trigger in policy.triggers:
        if callable(getattr(trigger, "pop_scores", None)):
            threshold = getattr(trigger, "threshold", None)
            if threshold is not None:
                return {"judge_threshold": threshold}
    return {}


class _progress_bar:
    """A rich progress bar on stderr (or nothing); yields ``advance(record)``."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self.correct = 0
        self.finished = 0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]eval"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "eval", total=self.total, completed=self.done, status="resumed" if self.done else ""
            )
        return self.advance

    def advance(self, record: ProblemRecord) -> None:
        self.finished += 1
        self.correct += record.correct
        if self._progress is not None:
            status = f"{record.policy} {record.problem_id}: " + (
                "error" if record.error else ("right" if record.correct else "wrong")
            )
            self._progress.update(self._task, advance=1, status=status)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


__all__ = [  # the record names are re-exported from records.py, where they moved
    "CONFIG_FILE",
    "OVERCONFIDENT_RHO",
    "OVERCONFIDENT_TAU",
    "PLOT_FILE",
    "RECORDS_FILE",
    "SUMMARY_FILE",
    "TRACES_FILE",
    "EvalReport",
    "Job",
    "ProblemRecord",
    "evaluate",
    "read_records",
    "read_traces",
    "resolve_policies",
    "run_jobs",
]
