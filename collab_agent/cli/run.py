"""``collab-agent run`` (one question, streamed step by step) and ``collab-agent models``."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from collab_agent import defaults
from collab_agent.cli.backends import load_pair, run_then_close
from collab_agent.cli.options import (
    AnswerMaxTokensOption,
    ApiKeyEnvOption,
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
    TopPOption,
    reasoning_config,
)

stdout = Console()

AUTHOR_STYLE = {"small": "cyan", "large": "magenta"}


def register(app: typer.Typer) -> None:
    """Add the ``run`` and ``models`` commands to the ``collab-agent`` app."""
    app.command("run")(run)
    app.command("models")(models)


def run(
    question: Annotated[str, typer.Argument(help="The question to reason about.")],
    models: ModelsOption = None,
    small: SmallOption = None,
    large: LargeOption = None,
    policy: Annotated[
        str, typer.Option(help="trigreason, specreason, small-only, large-only or module:factory.")
    ] = "trigreason",
    priming: PrimingOption = defaults.PRIMING_STEPS,
    temperature: TemperatureOption = defaults.TEMPERATURE,
    top_p: TopPOption = defaults.TOP_P,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    budget: Annotated[
        int | None,
        typer.Option(help="Most reasoning tokens (default: 1024, capped to the context)."),
    ] = None,
    max_steps: MaxStepsOption = defaults.MAX_STEPS,
    step_max_tokens: StepMaxTokensOption = defaults.STEP_MAX_TOKENS,
    answer_max_tokens: AnswerMaxTokensOption = defaults.ANSWER_MAX_TOKENS,
    think: ThinkOption = False,
    api_key_env: ApiKeyEnvOption = "OPENAI_API_KEY",
    threads: ThreadsOption = None,
    kv_method: KvMethodOption = None,
    splitter: SplitterOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the trace as JSON, nothing else.")
    ] = False,
) -> None:
    """Answer one question, streaming each step with who wrote it and why."""
    started = time.perf_counter()
    from collab_agent.core.reasoner import Reasoner
    from collab_agent.policies.registry import resolve_policy

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
    options: dict[str, Any] = {"priming_steps": priming} if policy == "trigreason" else {}
    chosen = resolve_policy(policy, allow_code=True, **options)  # the user's own choice
    small_backend, large_backend = load_pair(
        models, small, large, api_key_env=api_key_env, threads=threads, kv_method=kv_method
    )
    load_seconds = time.perf_counter() - started
    reasoner = Reasoner(small_backend, large_backend, chosen, config=config)

    async def stream() -> Any:
        trace = None
        async for event in reasoner.stream([{"role": "user", "content": question}]):
            trace = event.trace
            if as_json:
                continue
            if event.kind == "step":
                _print_step(event.step)
            else:
                stdout.print(Text(f"\nAnswer ({event.author}): ", style="bold") + Text(event.text))
        return trace

    trace = run_then_close(stream, small_backend, large_backend)
    if as_json:
        print(json.dumps(trace.to_dict()))
    else:
        _print_summary(trace)
        stdout.print(
            f"total wall time {time.perf_counter() - started:.1f} s: models loaded in "
            f"{load_seconds:.1f} s, reasoning and answer {trace.seconds:.1f} s"
        )


def _print_step(step: Any) -> None:
    style = AUTHOR_STYLE[step.author]
    why = f" {step.trigger}" if step.trigger else ""
    header = Text(
        f"[{step.index:>2} {step.author}{why} · {step.tokens} tok]", style=f"bold {style}"
    )
    if step.rejected_text is not None:
        stdout.print(Text(f"   rejected small step: {step.rejected_text}", style="dim strike"))
    stdout.print(header, Text(step.text, style=style))


def _print_summary(trace: Any) -> None:
    table = Table(title="Collaboration", show_header=True)
    table.add_column("")
    table.add_column("small", justify="right")
    table.add_column("large", justify="right")
    by = trace.summary()
    table.add_row("reasoning steps", *(str(by["steps_by_author"][r]) for r in ("small", "large")))
    table.add_row("reasoning tokens", *(str(by["tokens_by_author"][r]) for r in ("small", "large")))
    table.add_row("calls", *(str(trace.usage[r].calls) for r in ("small", "large")))
    table.add_row(
        "generated tokens", *(str(trace.usage[r].completion_tokens) for r in ("small", "large"))
    )
    table.add_row("seconds", *(f"{trace.usage[r].seconds:.1f}" for r in ("small", "large")))
    stdout.print(table)
    triggers = ", ".join(f"{k} x{v}" for k, v in trace.trigger_counts.items()) or "none"
    stdout.print(f"triggers fired: {triggers}")
    stdout.print(
        f"small-model share: {trace.small_token_share:.0%} of reasoning tokens, "
        f"{trace.small_step_share:.0%} of steps; wall time {trace.seconds:.1f} s"
    )
    large = trace.usage["large"]
    if large.completion_tokens and large.seconds > 0:
        speed = large.completion_tokens / large.seconds
        total = trace.usage["small"].completion_tokens + large.completion_tokens
        stdout.print(
            f"large model alone at its measured {speed:.1f} tok/s would need about "
            f"{total / speed:.1f} s for the same {total} tokens"
        )


def models(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the bundled models: installed, cached, and the pip command that installs each."""
    from collab_agent.backends.bundled import bundled_status

    rows = bundled_status()
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title="Bundled models")
    for column in ("name", "installed", "cached", "size", "install"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row.get("name")),
            "yes" if row.get("installed") else "no",
            "yes" if row.get("cached") else "no",
            str(row.get("size", "")),
            str(row.get("pip_command", "")) if not row.get("installed") else "",
        )
    stdout.print(table)
