"""``collab-agent calibrate``: choose a trigger and its threshold for a model pair on a dev set,
and write the result as a policy file (see `collab_agent.calibration`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from collab_agent import defaults
from collab_agent.cli.backends import load_pair, run_then_close
from collab_agent.cli.options import (
    AnswerMaxTokensOption,
    JsonOption,
    LargeOption,
    MaxStepsOption,
    ModelsOption,
    SmallOption,
    StepMaxTokensOption,
    TemperatureOption,
    ThinkOption,
    ThreadsOption,
    reasoning_config,
)


def register(app: typer.Typer) -> None:
    """Add the ``calibrate`` command to the ``collab-agent`` app."""
    app.command("calibrate")(calibrate_command)


def calibrate_command(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Dev set: a JSON Lines file (id, question, answer) or a bundled set name.",
        ),
    ] = "gsm8k_test",
    out: Annotated[Path, typer.Option("--out", help="The policy file to write (JSON).")] = Path(
        "calibrated-policy.json"
    ),
    target_share: Annotated[
        float,
        typer.Option("--target-share", help="Small model's share of reasoning tokens to reach."),
    ] = 0.6,
    limit: Annotated[
        int | None, typer.Option(help="The first N problems only (after --offset).")
    ] = 20,
    offset: Annotated[
        int,
        typer.Option(
            help="Skip this many problems first (calibrate on problems you do not evaluate on, e.g. --offset 100 for GSM8K when evaluating on the first 100)."
        ),
    ] = 0,
    models: ModelsOption = None,
    small: SmallOption = None,
    large: LargeOption = None,
    signals: Annotated[
        str,
        typer.Option(
            help="Comma-separated candidates: large_surprise, small_uncertainty, small_min_prob, "
            "escalation, repetition, cognitive_offload (large_surprise needs a large model "
            "that can score: local, vLLM or llama-cpp-python)."
        ),
    ] = "large_surprise,small_uncertainty,repetition,cognitive_offload",
    priming: Annotated[int, typer.Option(help="Strategic-priming steps by the large model.")] = 1,
    rounds: Annotated[int, typer.Option(help="Most runs of the pair per candidate.")] = 3,
    record_only: Annotated[
        bool,
        typer.Option(
            "--record-only",
            help="Only run the small model with every signal measured and report each signal's "
            "AUROC for a wrong answer; --out then receives that report, not a policy.",
        ),
    ] = False,
    large_only: Annotated[
        bool, typer.Option("--large-only/--no-large-only", help="Also run the large model alone.")
    ] = True,
    traces: Annotated[
        Path | None,
        typer.Option(
            "--traces",
            help="Measure the signals on the small-only traces of an eval run (its --out "
            "folder) instead of running the small model again; implies --record-only. Only "
            "large_surprise loads a model (the large one, to score the steps).",
        ),
    ] = None,
    temperature: TemperatureOption = 0.0,
    budget: Annotated[int, typer.Option(help="Most reasoning tokens per problem.")] = 1024,
    max_steps: MaxStepsOption = defaults.EVAL_MAX_STEPS,
    step_max_tokens: StepMaxTokensOption = defaults.EVAL_STEP_MAX_TOKENS,
    answer_max_tokens: AnswerMaxTokensOption = defaults.EVAL_ANSWER_MAX_TOKENS,
    concurrency: Annotated[int, typer.Option(help="Problems answered at a time.")] = 1,
    threads: ThreadsOption = None,
    think: ThinkOption = False,
    as_json: JsonOption = False,
) -> None:
    """Calibrate trigger thresholds for a model pair so the small model writes --target-share of
    the reasoning at the best accuracy, and write the chosen policy to --out."""
    from rich.console import Console
    from rich.table import Table

    from collab_agent.backends.specs import resolve_pair
    from collab_agent.calibration import (
        calibrate,
        candidates_by_name,
        record_signals,
        save_policy_file,
    )
    from collab_agent.core.reasoner import Reasoner
    from collab_agent.evaluation.datasets import load_dataset, resolve_dataset
    from collab_agent.policies.base import Policy

    stderr = Console(stderr=True)
    data_path = resolve_dataset(data)
    problems = load_dataset(data_path, limit=limit, offset=offset)
    candidates = candidates_by_name([s.strip() for s in signals.split(",") if s.strip()])
    small_spec, large_spec = resolve_pair(models, small, large)
    if traces is not None:
        _replay(traces, problems, candidates, large_spec, threads, concurrency, out, as_json)
        return
    small_backend, large_backend = load_pair(
        None, small_spec, large_spec, threads=threads, parallel=concurrency
    )
    config = reasoning_config(
        think=think,
        temperature=temperature,
        budget=budget,
        max_steps=max_steps,
        step_max_tokens=step_max_tokens,
        answer_max_tokens=answer_max_tokens,
    )

    def make_reasoner(policy: Policy) -> Reasoner:
        return Reasoner(small_backend, large_backend, policy, config=config)

    def progress(policy: str, run: Any) -> None:
        mark = "[green]right[/]" if run.correct else "[red]wrong[/]"
        share = run.small_tokens / max(1, run.small_tokens + run.large_tokens)
        stderr.print(f"  {policy:<32} {run.problem_id:<20} {mark} small share {share:.0%}")

    async def work() -> Any:
        for candidate in candidates:  # fail before any generation when a signal cannot work
            check = getattr(candidate.build(0.5), "check", None)
            if check is not None:
                check(small_backend, large_backend)
        if record_only:
            return await record_signals(
                make_reasoner,
                problems,
                candidates,
                concurrency=concurrency,
                on_problem=progress,
            )
        return await calibrate(
            make_reasoner,
            problems,
            target_share=target_share,
            candidates=candidates,
            priming_steps=priming,
            rounds=rounds,
            run_large_only=large_only,
            concurrency=concurrency,
            on_problem=progress,
        )

    setting = {
        "small_spec": small_spec,
        "large_spec": large_spec,
        "data": str(data_path),
        "offset": offset,
        "budget": budget,
        "max_steps": max_steps,
        "step_max_tokens": step_max_tokens,
        "temperature": temperature,
    }
    if record_only:
        _write_signal_report(
            run_then_close(work, small_backend, large_backend), setting, out, as_json
        )
        return
    result = run_then_close(work, small_backend, large_backend)
    report = {**result.to_dict(), **setting}
    save_policy_file(result.policy, out, report)
    if as_json:
        print(json.dumps(report))
        return
    console = Console()
    console.print(_signal_table(result.signals, len(problems)))
    runs = Table(title=f"Threshold search (target small share {target_share:.0%})")
    for column in ("policy", "threshold", "accuracy", "small share", "LRM out tokens"):
        runs.add_column(column)
    baselines = [result.small_only] + ([result.large_only] if result.large_only else [])
    for run in baselines + [r for c in result.candidates for r in c.runs]:
        s = run.summary()
        runs.add_row(
            run.policy,
            _fmt(run.threshold),
            f"{s['accuracy']:.1%}",
            f"{s['small_token_share']:.1%}",
            str(s["lrm_output_tokens"]),
        )
    console.print(runs)
    chosen = result.chosen
    if chosen is not None and chosen.chosen is not None:
        verdict = "reaches" if chosen.reached else "does NOT reach"
        console.print(
            f"chosen: {chosen.name} threshold {chosen.chosen.threshold:.4g}: accuracy "
            f"{chosen.chosen.accuracy:.1%}, small share {chosen.chosen.small_token_share:.1%} ({verdict} the target)"
        )
    stderr.print(f"policy written to {out}")


def _replay(
    folder: Path,
    problems: list[Any],
    candidates: list[Any],
    large_spec: str,
    threads: int | None,
    concurrency: int,
    out: Path,
    as_json: bool,
) -> None:
    """``calibrate --traces``: the signal report of an eval run's small-only traces."""
    from collab_agent.backends.specs import load_backend
    from collab_agent.calibration import replay_signals
    from collab_agent.errors import ConfigError
    from collab_agent.evaluation.records import read_records, read_traces

    outcomes = {(r.policy, r.problem_id, r.sample): r.correct for r in read_records(folder)}
    recorded = read_traces(folder)
    runs = [
        (problem, recorded[key], bool(outcomes[key]))
        for problem in problems
        if (key := ("small-only", problem.id, 0)) in recorded and key in outcomes
    ]
    if not runs:
        raise ConfigError(
            "--traces",
            f"{str(folder)!r} holds no small-only run of these {len(problems)} problems "
            "(run `collab-agent eval --policy small-only --out FOLDER` on the same --data)",
        )
    needs_large = any(c.name == "large_surprise" for c in candidates)

    large = load_backend(large_spec, threads=threads) if needs_large else None

    async def work() -> Any:
        return await replay_signals(runs, candidates, large=large, concurrency=concurrency)

    setting = {"traces": str(folder), "large_spec": large_spec if needs_large else None}
    _write_signal_report(run_then_close(work, large), setting, out, as_json)


def _write_signal_report(recording: Any, setting: dict[str, Any], out: Path, as_json: bool) -> None:
    """Write a recording's signal report (and its settings) to ``out``; print it as JSON or as
    the signal table."""
    from rich.console import Console

    report = {**recording.to_dict(), **setting}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if as_json:
        print(json.dumps(report))
    else:
        problems = len(recording.small_only.problems)
        Console().print(_signal_table(recording.signals, problems))
        Console().print(f"small-only accuracy {recording.small_only.accuracy:.1%}")
    Console(stderr=True).print(f"report written to {out}")


def _signal_table(signals: dict[str, dict[str, Any]], problems: int) -> Any:
    from rich.table import Table

    table = Table(title=f"Signals on {problems} problems (small-only; label: wrong answer)")
    for column in ("signal", "step AUROC", "problem AUROC", "mean wrong", "mean right", "steps"):
        table.add_column(column)
    keys = ("step_auroc", "problem_auroc", "mean_in_wrong", "mean_in_right", "measured_steps")
    for name, quality in signals.items():
        table.add_row(name, *(_fmt(quality[k]) for k in keys))
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
