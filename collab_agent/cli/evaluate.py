"""The ``collab-agent eval`` command (registered on the main app by `register`).

Heavy imports (torch, transformers, matplotlib) happen inside the command so ``--help`` stays
fast. The summary goes to stdout (one JSON object with ``--json``); progress goes to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from collab_agent import defaults
from collab_agent.cli import backends
from collab_agent.cli.options import (
    AnswerMaxTokensOption,
    JsonOption,
    KvMethodOption,
    LargeOption,
    MaxStepsOption,
    ModelsOption,
    PrimingOption,
    SmallOption,
    SplitterOption,
    StepMaxTokensOption,
    TemperatureOption,
    ThinkOption,
    ThreadsOption,
    reasoning_config,
)
from collab_agent.errors import ConfigError

DEFAULT_POLICIES = "small-only,large-only,specreason,trigreason"


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to the ``collab-agent`` app."""
    app.command("eval")(eval_command)


def eval_command(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="A JSON Lines file (id, question, answer) or a bundled set: gsm8k_test, "
            "math500, aime24, aime25.",
        ),
    ] = "gsm8k_test",
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Comma-separated: small-only, large-only, specreason, trigreason, escalation, "
            "surprise, module:factory, or a policy file (.json) [default: small-only, large-only, "
            "specreason, trigreason; with --report-only, every policy in --out].",
        ),
    ] = None,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="Also run one policy at several settings, POLICY:PARAMETER=V1,V2,... "
            "(e.g. trigreason:rho=0.6,0.75,0.9 or surprise:threshold=0.5,1,2); repeatable. "
            "The plot joins each policy's settings and marks the Pareto frontier.",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="The first N problems only.")] = None,
    samples: Annotated[int, typer.Option(help="Runs per problem and policy.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Most runs at once.")] = 1,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (records.jsonl, summary.json, plot); resumable. Default: a new "
            "runs/eval-DATA-TIMESTAMP folder (runs/ is ignored by git)."
        ),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Discard earlier results in --out instead of resuming.")
    ] = False,
    models: ModelsOption = None,
    small: SmallOption = None,
    large: LargeOption = None,
    temperature: TemperatureOption = defaults.TEMPERATURE,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling when temperature > 0.")
    ] = defaults.TOP_P,
    seed: Annotated[int | None, typer.Option(help="Base seed; sample i uses seed + i.")] = None,
    budget: Annotated[
        int | None,
        typer.Option(
            help="Most reasoning tokens per problem (default: 1024, capped to the context)."
        ),
    ] = None,
    max_steps: MaxStepsOption = defaults.EVAL_MAX_STEPS,
    step_max_tokens: StepMaxTokensOption = defaults.EVAL_STEP_MAX_TOKENS,
    answer_max_tokens: AnswerMaxTokensOption = defaults.EVAL_ANSWER_MAX_TOKENS,
    priming: PrimingOption = defaults.PRIMING_STEPS,
    rho: Annotated[
        float | None, typer.Option(help="TrigReason's cognitive-offload rho (default 0.85).")
    ] = None,
    threshold: Annotated[float, typer.Option(help="SpecReason's score threshold (0-9).")] = 7.0,
    score: Annotated[
        str, typer.Option(help="SpecReason's score: greedy or expected (needs top logprobs).")
    ] = "greedy",
    think: ThinkOption = False,
    threads: ThreadsOption = None,
    kv_method: KvMethodOption = None,
    splitter: SplitterOption = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds one run may take before it is recorded failed.")
    ] = None,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Run nothing: summarise the records already in --out (an interrupted run "
            "counts the problems every policy finished; --policy/--sweep pick the policies).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run policies on a data set and compare accuracy, small-model share, LRM use and latency."""
    from rich.console import Console

    from collab_agent.evaluation.datasets import resolve_dataset
    from collab_agent.evaluation.report import markdown_table, summary_table
    from collab_agent.evaluation.runner import PLOT_FILE, evaluate

    stderr = Console(stderr=True)
    data_path = resolve_dataset(data)
    names = [p.strip() for p in (policy or DEFAULT_POLICIES).split(",") if p.strip()]
    trig: dict[str, Any] = {"priming_steps": priming}
    if rho is not None:
        trig["rho"] = rho
    options = {"trigreason": trig, "specreason": {"threshold": threshold, "score": score}}
    if out is None and report_only:
        raise ConfigError("--out", "--report-only summarises an earlier run: give its folder")
    out_dir = out if out is not None else default_out(data_path.stem)
    from collab_agent.evaluation.sweep import expand_sweeps, parse_sweep

    swept = expand_sweeps([parse_sweep(s) for s in sweep or ()], options)
    config = reasoning_config(
        think=think,
        splitter=splitter,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        budget=budget,
        max_steps=max_steps,
        step_max_tokens=step_max_tokens,
        answer_max_tokens=answer_max_tokens,
    )

    if report_only:
        from collab_agent.evaluation.report import summarise_folder
        from collab_agent.evaluation.runner import resolve_policies

        chosen = (
            [p.name for p in resolve_policies([*names, *swept.values()], options)]
            if policy is not None or sweep
            else None
        )
        summary = summarise_folder(out_dir, policies=chosen)
        if as_json:
            print(json.dumps(summary))
        else:
            Console().print(summary_table(summary, title=str(out_dir)))
            print(markdown_table(summary))
            _print_oracle(out_dir)
        return

    from collab_agent.backends.specs import resolve_pair
    from collab_agent.evaluation.runner import resolve_policies

    resolve_policies([*names, *swept.values()], options)  # a bad name fails before any load

    small_spec, large_spec = resolve_pair(models, small, large)
    small_backend, large_backend = backends.load_pair(
        None, small_spec, large_spec, threads=threads, parallel=concurrency, kv_method=kv_method
    )

    async def work() -> Any:
        return await evaluate(
            data_path,
            [*names, *swept.values()],
            small=small_backend,
            large=large_backend,
            samples=samples,
            concurrency=concurrency,
            limit=limit,
            out=out_dir,
            resume=not fresh,
            config=config,
            policy_options=options,
            problem_timeout_s=timeout,
            progress=True,
            describe={
                "small_spec": small_spec,
                "large_spec": large_spec,
                "data": str(data_path),
                "policy_options": options,
            },
        )

    report = backends.run_then_close(work, small_backend, large_backend)
    if as_json:
        print(json.dumps(report.summary))
        return
    console = Console()
    console.print(
        summary_table(report.summary, title=f"{data_path.stem}: {small_spec} + {large_spec}")
    )
    print(markdown_table(report.summary))
    _print_oracle(out_dir)
    stderr.print(f"records, summary and plot in {out_dir} ({PLOT_FILE}); {report.ran} run(s) now")


def default_out(data: str) -> Path:
    """A new folder under ``runs/`` for one evaluation: ``runs/eval-DATA-YYYYmmdd-HHMMSS``."""
    import time

    return Path("runs") / f"eval-{data}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _print_oracle(out_dir: Path) -> None:
    """The per-problem oracle router's bound and a few points of a cascade on the small model's
    least likely token (`report.cascade_router`), when both single models ran."""
    from rich.console import Console

    from collab_agent.evaluation.records import read_records, read_traces
    from collab_agent.evaluation.report import cascade_router, oracle_router

    records = read_records(out_dir)
    bound = oracle_router(records)
    if bound is not None:
        Console(stderr=True).print(
            f"oracle per-problem router (a bound, not a method) on {bound['problems']} problems: "
            f"accuracy {bound['accuracy']:.1%} at a small-token share of "
            f"{bound['small_token_share']:.1%}; right by both {bound['both_right']}, only the "
            f"small model {bound['only_small_right']}, only the large {bound['only_large_right']}"
        )
    for point in cascade_router(records, read_traces(out_dir)):
        Console(stderr=True).print(
            f"cascade on the small model's least likely token (thresholds chosen on these "
            f"problems): re-solving {point['escalated']:.0%} with the large model gives accuracy "
            f"{point['accuracy']:.1%}, small-token share {point['small_token_share']:.1%} (thrown-"
            f"away solutions included), large-model tokens {point['large_token_ratio']:.2f}x "
            "large-only's"
        )
