"""`collab-agent bench prefix-reuse`: does prefix KV reuse make collaboration cost what it reads?

Runs TrigReason (Zhao, Peng, Nguyen et al., 2026, Sec. 3) through `Reasoner` on GSM8K problems
with two local transformers backends, greedy, and reports for each role (``small``, ``large``):

- ``processed_tokens``: tokens the model ran forward on, counted by a forward pre-hook on it;
- ``needed_tokens``: every token that model had to read or write, each once: the distinct token
  prefixes over all its calls' prompts followed by the tokens it sampled (what a perfect prefix
  cache would run, given the tokenizer's tokenisation of each prompt);
- ``ratio``: processed / needed (target <= 1.05; the last sampled token of a call is written but
  never run forward, so it can dip below 1);
- ``tokens_per_s_vs_generate``: the step loop's generation speed (tokens sampled per second of
  backend call, prefill included) divided by plain ``model.generate`` speed on the same prompts
  and lengths, each timed right after the call it mirrors (target >= 0.9; ``generate``
  re-prefills each whole prompt, as a server without a prefix cache would).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent.cli.options import JsonOption
from collab_agent.errors import ConfigError
from collab_agent.evaluation.datasets import DATA_ENV, data_dir

if TYPE_CHECKING:
    from collab_agent.backends.base import GenerateRequest
    from collab_agent.backends.local import TransformersBackend

ROLES = ("small", "large")


def load_problems(count: int, data: Path | None = None) -> list[dict[str, Any]]:
    """The first ``count`` problems of ``gsm8k_test.jsonl``."""
    path = (data or data_dir()) / "gsm8k_test.jsonl"
    if not path.is_file():
        raise ConfigError(DATA_ENV, f"{path} not found; point {DATA_ENV} at the data folder")
    problems: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                problems.append(json.loads(line))
            if len(problems) >= count:
                break
    return problems


def distinct_prefixes(sequences: list[list[int]]) -> int:
    """Nodes of the token trie of ``sequences``: each distinct prefix counted once."""
    root: dict[int, Any] = {}
    nodes = 0
    for seq in sequences:
        node = root
        for token in seq:
            child = node.get(token)
            if child is None:
                child = node[token] = {}
                nodes += 1
            node = child
    return nodes


def _generate_seconds(backend: TransformersBackend, prompt: list[int], new: int) -> float:
    """Wall time of a fresh greedy ``model.generate`` of exactly ``new`` tokens."""
    import torch

    inputs = torch.tensor([prompt], device=backend.device)
    started = time.perf_counter()
    with torch.inference_mode():
        backend.model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=backend.tokenizer.pad_token_id or backend.tokenizer.eos_token_id,
        )
    return time.perf_counter() - started


class _Recorder:
    """Counts a model's forward tokens (a pre-hook) and records each call of its backend.

    Right after each call (in the worker, under the backend's lock) it times a plain
    ``model.generate`` of the same prompt and length, so both speeds are measured under the
    same machine load; those forwards are not counted.
    """

    def __init__(self, backend: TransformersBackend) -> None:
        self.backend = backend
        self.processed = 0
        self.generate_seconds = 0.0
        self.calls: list[tuple[list[int], list[int]]] = []
        self._counting = True
        self._handle = backend.model.register_forward_pre_hook(self._count, with_kwargs=True)
        backend.on_generation = self._record

    def _count(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and self._counting:
            self.processed += int(ids.numel())

    def _record(self, _request: GenerateRequest, prompt: list[int], sampled: list[int]) -> None:
        self.calls.append((list(prompt), list(sampled)))
        if sampled:
            self._counting = False
            try:
                self.generate_seconds += _generate_seconds(self.backend, prompt, len(sampled))
            finally:
                self._counting = True

    def close(self) -> None:
        self._handle.remove()
        self.backend.on_generation = None


async def measure(
    small: TransformersBackend,
    large: TransformersBackend,
    problems: list[dict[str, Any]],
    *,
    priming: int = 1,
    budget: int = 384,
    step_max_tokens: int = 128,
    log: Any = None,
) -> dict[str, Any]:
    """Run TrigReason on ``problems`` and return the figures (see the module docstring)."""
    from collab_agent.backends.base import GREEDY
    from collab_agent.core.reasoner import Reasoner
    from collab_agent.policies import TrigReason

    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    backends = {"small": small, "large": large}
    recorders = {role: _Recorder(b) for role, b in backends.items()}
    reasoner = Reasoner(
        small,
        large,
        TrigReason(priming_steps=priming),
        sampling=GREEDY,
        budget=budget,
        step_max_tokens=step_max_tokens,
        answer_max_tokens=32,
    )
    needed = {role: 0 for role in ROLES}
    seconds = {role: 0.0 for role in ROLES}
    sampled = {role: 0 for role in ROLES}
    cached = {role: 0 for role in ROLES}
    steps = {role: 0 for role in ROLES}
    try:
        for i, problem in enumerate(problems):
            start = {role: len(recorders[role].calls) for role in ROLES}
            trace = None
            async for event in reasoner.stream(
                [{"role": "user", "content": problem["question"]}],
                conversation_id=f"prefix-reuse-{i}",
            ):
                trace = event.trace
                if event.kind == "step":
                    step = event.step
                    say(
                        f"  step {step.index}: {step.author} {step.tokens} tokens "
                        f"{step.seconds:.1f} s" + (f" ({step.trigger})" if step.trigger else "")
                    )
            assert trace is not None
            for role in ROLES:
                calls = recorders[role].calls[start[role] :]
                needed[role] += distinct_prefixes([p + s for p, s in calls])
                seconds[role] += trace.usage[role].seconds
                sampled[role] += sum(len(s) for _, s in calls)
                cached[role] += trace.usage[role].cached_tokens
                steps[role] += sum(step.author == role for step in trace.steps)
            say(
                f"problem {i + 1}/{len(problems)}: {len(trace.steps)} steps "
                f"({trace.small_step_share:.0%} small), answer {trace.answer[:40]!r}"
            )
    finally:
        for recorder in recorders.values():
            recorder.close()
    figures: dict[str, Any] = {}
    for role in ROLES:
        generate_seconds = recorders[role].generate_seconds
        loop_speed = sampled[role] / seconds[role] if seconds[role] else 0.0
        generate_speed = sampled[role] / generate_seconds if generate_seconds else 0.0
        processed = recorders[role].processed
        figures[role] = {
            "processed_tokens": processed,
            "needed_tokens": needed[role],
            "ratio": processed / needed[role] if needed[role] else 0.0,
            "tokens_per_s_vs_generate": loop_speed / generate_speed if generate_speed else 0.0,
            "calls": len(recorders[role].calls),
            "steps": steps[role],
            "sampled_tokens": sampled[role],
            "cached_tokens": cached[role],
            "step_loop_tokens_per_s": loop_speed,
            "generate_tokens_per_s": generate_speed,
            "model": backends[role].name,
        }
    figures["problems"] = len(problems)
    return figures


def register(bench: typer.Typer) -> None:
    """Add ``prefix-reuse`` to the ``bench`` sub-app."""

    @bench.command("prefix-reuse")
    def prefix_reuse(
        models: Annotated[
            str | None, typer.Option("--models", help="Preset pair: bundled (default) or tiny.")
        ] = None,
        small: Annotated[
            str | None, typer.Option("--small", help="Small model spec (bundled:, hf:, tiny).")
        ] = None,
        large: Annotated[
            str | None, typer.Option("--large", help="Large model spec (bundled:, hf:, tiny).")
        ] = None,
        problems: Annotated[int, typer.Option(help="GSM8K problems to run.")] = 3,
        priming: Annotated[int, typer.Option(help="TrigReason's priming steps.")] = 1,
        budget: Annotated[int, typer.Option(help="Most reasoning tokens per problem.")] = 384,
        threads: Annotated[
            int | None, typer.Option(help="torch CPU threads (default: torch's choice).")
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Tokens each model ran forward on vs the tokens it needed, and speed vs generate."""
        import anyio
        import torch

        if threads is not None:
            torch.set_num_threads(threads)

        from collab_agent.backends.local import TransformersBackend
        from collab_agent.backends.specs import load_backend, resolve_pair

        if problems <= 0:
            raise ConfigError("--problems", f"must be a positive integer, got {problems}")
        small_spec, large_spec = resolve_pair(models, small, large)
        loaded = []
        for option, spec in (("--small", small_spec), ("--large", large_spec)):
            print(f"loading {spec} ...", file=sys.stderr, flush=True)
            backend = load_backend(spec)
            if not isinstance(backend, TransformersBackend):
                raise ConfigError(option, f"{spec!r} is not a local transformers model")
            loaded.append(backend)
        figures = anyio.run(
            lambda: measure(
                loaded[0], loaded[1], load_problems(problems), priming=priming, budget=budget
            )
        )
        figures["models"] = {"small": small_spec, "large": large_spec}
        if as_json:
            print(json.dumps(figures))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"prefix reuse, {problems} GSM8K problems, TrigReason, greedy")
        for column in ("role", "processed", "needed", "ratio", "speed vs generate", "tok/s"):
            table.add_column(column)
        for role in ROLES:
            row = figures[role]
            table.add_row(
                role,
                str(row["processed_tokens"]),
                str(row["needed_tokens"]),
                f"{row['ratio']:.3f}",
                f"{row['tokens_per_s_vs_generate']:.2f}",
                f"{row['step_loop_tokens_per_s']:.1f}",
            )
        Console().print(table)
