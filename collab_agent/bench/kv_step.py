"""`collab-agent bench kv-step`: CPU seconds per decode step of a compressed cache vs the full one.

On a tiny random-weight Qwen2 pair (`collab_agent.backends.tiny`: the large shape as the model,
the small shape as SmallKV's assistant), one random prompt of ``--context-tokens`` tokens is
prefilled per arm, then ``--tokens`` one-token decode steps are teacher-forced along the same
tokens (the same work for every arm). Arms: ``full``, ``h2o`` and ``smallkv`` at ``--budget``.
With ``--refresh-every N`` (N > 1) the arms ``h2o_every_N`` and ``smallkv_every_N`` choose
the kept tokens every N decode steps only (`KVMethod.refresh_every`). The arms run interleaved, in a rotating order, ``--repeat`` times; reported per arm: decode
seconds per token (median/min/max over the repeats) and the ratio of its median to full's.
SmallKV's figure includes its small model's own decode step (the method runs it every step).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from collab_agent.cli.options import JsonOption
from collab_agent.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from collab_agent.cache.method import KVMethod

ARMS = ("full", "h2o", "smallkv")
"""The methods timed, full first (the reference of the ratios)."""


def arm_names(refresh_every: int) -> tuple[str, ...]:
    """The arms timed: `ARMS`, and the block-refresh ones when ``refresh_every > 1``."""
    if refresh_every == 1:
        return ARMS
    return (*ARMS, f"h2o_every_{refresh_every}", f"smallkv_every_{refresh_every}")


def make_method(name: str, budget: float, assistant: Any) -> KVMethod:
    """The KV method of arm ``name`` at ``budget`` (SmallKV guided by ``assistant``)."""
    from collab_agent.cache import H2O, Full, SmallKV

    base, _, every = name.partition("_every_")
    refresh = int(every) if every else 1
    if base == "full":
        return Full()
    if base == "h2o":
        return H2O(budget=budget, refresh_every=refresh)
    return SmallKV(assistant=assistant, budget=budget, refresh_every=refresh)


def step_seconds(model: Any, method: KVMethod, prompt: torch.Tensor, forced: torch.Tensor) -> float:
    """Decode seconds per token of ``method``: prefill ``prompt``, then teacher-force ``forced``."""
    from collab_agent.cache.generate import decode, prefill

    cache, last, _ = prefill(model, prompt, method)
    out = decode(model, cache, last, forced.shape[1], forced=forced, track_bytes=False)
    detach = getattr(method, "detach", None)
    if detach is not None:  # SmallKV's forward hook on the shared model
        detach()
    return out.decode_seconds / (forced.shape[1] - 1)


def summary(values: list[float]) -> dict[str, Any]:
    """Median/min/max of per-token seconds (milliseconds, rounded)."""
    ms = [v * 1000 for v in values]
    return {
        "ms_per_token": [round(v, 3) for v in ms],
        "median": round(statistics.median(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


def measure(
    context_tokens: int,
    tokens: int,
    budget: float,
    repeat: int,
    threads: int,
    refresh_every: int = 1,
) -> dict[str, Any]:
    """Time every arm of `ARMS` interleaved (see the module docstring) and return the figures."""
    import torch

    from collab_agent.backends.tiny import tiny_pair

    torch.set_num_threads(threads)
    small, large, _ = tiny_pair()
    gen = torch.Generator().manual_seed(0)
    vocab = large.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context_tokens), generator=gen)
    forced = torch.randint(0, vocab, (1, tokens), generator=gen)
    arms = arm_names(refresh_every)
    for name in arms:  # warm-up: allocator, kernels, lazy imports
        step_seconds(large, make_method(name, budget, small), prompt[:, :64], forced[:, :4])
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(repeat):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        for name in order:
            times[name].append(
                step_seconds(large, make_method(name, budget, small), prompt, forced)
            )
    full = statistics.median(times["full"])
    return {
        "model": "tiny large (3 layers, 8 heads, 2 KV heads), smallkv assistant tiny small",
        "context_tokens": context_tokens,
        "decode_tokens": tokens,
        "budget": budget,
        "repeat": repeat,
        "threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "arms": {name: summary(times[name]) for name in arms},
        "ratio_vs_full": {name: round(statistics.median(times[name]) / full, 3) for name in arms},
    }


def kv_step(
    context_tokens: Annotated[int, typer.Option(help="Prompt tokens prefilled per arm.")] = 384,
    tokens: Annotated[int, typer.Option(help="One-token decode steps timed per arm.")] = 48,
    budget: Annotated[float, typer.Option(help="KV budget of h2o and smallkv.")] = 0.2,
    repeat: Annotated[int, typer.Option(help="Interleaved rounds over the arms.")] = 5,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    refresh_every: Annotated[
        int, typer.Option(help="Also time h2o and smallkv choosing every N steps (N > 1).")
    ] = 1,
    as_json: JsonOption = False,
) -> None:
    """Decode seconds per token on CPU: full cache vs H2O vs SmallKV on a tiny Qwen2 pair."""
    if context_tokens < 64:
        raise ConfigError("context_tokens", f"must be >= 64, got {context_tokens}")
    if tokens < 2:
        raise ConfigError("tokens", f"must be >= 2, got {tokens}")
    if not 0 < budget <= 1:
        raise ConfigError("budget", f"must lie in (0, 1], got {budget}")
    if repeat < 1:
        raise ConfigError("repeat", f"must be >= 1, got {repeat}")
    if threads < 1:
        raise ConfigError("threads", f"must be >= 1, got {threads}")
    if refresh_every < 1:
        raise ConfigError("refresh_every", f"must be >= 1, got {refresh_every}")
    figures = measure(context_tokens, tokens, budget, repeat, threads, refresh_every)
    if as_json:
        print(json.dumps(figures))
        return
    print(f"load average {figures['load_average']}", file=sys.stderr)
    for name in figures["arms"]:
        arm = figures["arms"][name]
        print(
            f"{name:16s} {arm['median']:8.3f} ms/token (min {arm['min']:.3f}, max {arm['max']:.3f})"
            f"  x{figures['ratio_vs_full'][name]:.3f} vs full"
        )


def register(bench: typer.Typer) -> None:
    """Add ``kv-step`` to the ``bench`` sub-app."""
    bench.command("kv-step")(kv_step)


if __name__ == "__main__":
    from collab_agent.cli.entry import run_alone

    run_alone(kv_step)
