"""Decode throughput of full-cache SDPA, H2O and SmallKV at a 20% KV budget, on one GPU.

Self-contained: random-weight models at the Qwen2-7B shape (LRM) and the Qwen2-0.5B shape (SRM,
the assistant of SmallKV), built from transformers' config classes (no hub, no tokenizer), batch
16, 2048 prompt + 256 decode tokens, bf16, CUDA. The budget is a share of the whole context (the
accounting of a reasoning collaboration and of the SmallKV paper). Before the timed runs, a CUDA
correctness check, teacher-forced along the full cache's greedy tokens: SmallKV at budget 1.0
must give the full cache's logits, up to the attention kernels' rounding (``correctness.ok``),
and SmallKV's and H2O's deviations at budget 0.9 are reported side by side (random-weight
models amplify any eviction, so those two are information, not a verdict). Needs only torch,
transformers (5.24 or newer: older releases do not call the cache hooks, and nothing is
compressed) and this package. Prints one JSON line on stdout; progress goes to stderr. Exits 1
when a method or the correctness check failed, 2 without a GPU (or on a bad argument).

    collab-agent bench gpu-smallkv-throughput          # the GPU run, no arguments needed
    collab-agent bench gpu-smallkv-throughput --tiny   # the same logic at a tiny CPU shape
    python -m collab_agent.bench.gpu_smallkv_throughput   # the same, from a checkout

Both models use a 151,936-token vocabulary (the 0.5B's; the real 7B has 152,064), since
SmallKV needs one tokenizer for both.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Annotated, Any

import typer

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=151936,
    ),
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "tiny-large": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
    "tiny-small": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}


def log(message: str) -> None:
    print(f"[gpu-smallkv {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build(shape: str, dtype: Any, device: Any, seed: int) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no float32 copy of 7B weights
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_full_sdpa(model: Any, ids: Any, steps: int) -> dict[str, Any]:
    """Plain transformers: DynamicCache, SDPA attention, greedy decode."""
    import torch
    from transformers import DynamicCache

    device = ids.device
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        cache = DynamicCache()
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        sync(device)
        t1 = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps - 1):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        t2 = time.perf_counter()
    return _figures(ids.shape[0], steps, t1 - t0, t2 - t1, 1.0)


def run_method(model: Any, ids: Any, steps: int, method: Any) -> dict[str, Any]:
    """A collab-agent KV method (its cache and the "collab_kv" attention), greedy decode, the
    budget a share of the whole context."""
    import torch

    from collab_agent.cache import decode, prefill

    with torch.inference_mode():
        cache, last, prefill_s = prefill(model, ids, method, method.new_cache(budget_of="context"))
        out = decode(model, cache, last, steps, track_bytes=False, keep_logits=False)
    return _figures(ids.shape[0], steps, prefill_s, out.decode_seconds, out.cache.kv_bytes_ratio())


def check_correctness(large: Any, small: Any, ids: Any, steps: int = 16) -> dict[str, Any]:
    """The cache machinery on this device, against the full cache, teacher-forced along the full
    cache's greedy tokens.

    At budget 1.0 nothing is evicted, so SmallKV's path (hooks, host copies and their CUDA
    events, the SRM pass) must give the full cache's logits, up to the attention kernels'
    rounding: that is the pass/fail check.
    At budget 0.9, SmallKV's and H2O's deviations are reported side by side for information only:
    random-weight models at real widths amplify any eviction (on CPU too, for H2O as much as for
    SmallKV), so their agreement says nothing about the method's quality.
    """
    import torch

    from collab_agent.cache import H2O, Full, SmallKV, decode, prefill

    def run(method: Any, reference: Any = None) -> Any:
        with torch.inference_mode():
            cache, last, _ = prefill(large, ids, method, method.new_cache())
            forced = None if reference is None else reference.tokens
            out = decode(large, cache, last, steps, forced=forced)
        detach = getattr(method, "detach", None)
        if detach is not None:
            detach()
        return out

    def versus(reference: Any, got: Any) -> dict[str, Any]:
        a, b = reference.logits.float(), got.logits.float()
        return {
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
            "max_abs_logit_delta": round(float((a - b).abs().max()), 4),
            "finite": bool(torch.isfinite(b).all()),
            "kv_bytes_ratio": round(float(got.cache.kv_bytes_ratio()), 4),
        }

    reference = run(Full())
    exact = versus(
        reference, run(SmallKV(assistant=small, budget=1.0, budget_of="context"), reference)
    )
    result: dict[str, Any] = {
        "steps": steps,
        "logit_scale": round(float(reference.logits.float().abs().max()), 4),
        "smallkv_budget_1.0": exact,
    }
    for name, method in (
        ("smallkv_budget_0.9", SmallKV(assistant=small, budget=0.9, budget_of="context")),
        ("h2o_budget_0.9", H2O(budget=0.9, budget_of="context")),
    ):
        result[name] = versus(reference, run(method, reference))
    compressed = result["smallkv_budget_0.9"]["kv_bytes_ratio"] < 1.0
    result["ok"] = bool(
        exact["finite"]
        and exact["max_abs_logit_delta"] <= 0.01 * result["logit_scale"]  # kernels' rounding
        and compressed
        and result["smallkv_budget_0.9"]["finite"]
    )
    return result


def _figures(
    batch: int, steps: int, prefill_s: float, decode_s: float, ratio: float
) -> dict[str, Any]:
    return {
        "decode_tokens_per_s": round(batch * (steps - 1) / decode_s, 2),
        "end_to_end_tokens_per_s": round(batch * steps / (prefill_s + decode_s), 2),
        "prefill_s": round(prefill_s, 3),
        "decode_s": round(decode_s, 3),
        "kv_bytes_ratio": round(ratio, 4),
    }


def gpu_smallkv_throughput(
    tiny: Annotated[bool, typer.Option("--tiny", help="tiny shapes on CPU (logic check)")] = False,
    batch: Annotated[int | None, typer.Option()] = None,
    prompt: Annotated[int | None, typer.Option()] = None,
    decode: Annotated[int | None, typer.Option()] = None,
    budget: Annotated[float, typer.Option()] = 0.2,
    methods: Annotated[
        str, typer.Option(help="comma-separated: full_sdpa,h2o,smallkv")
    ] = "full_sdpa,h2o,smallkv",
) -> None:
    """Decode throughput of full-cache SDPA, H2O and SmallKV at a 20% KV budget, on one GPU."""
    code = measure(tiny, batch, prompt, decode, budget, methods)
    if code:
        raise typer.Exit(code)


def measure(
    tiny: bool,
    batch_size: int | None,
    prompt_tokens: int | None,
    decode_tokens: int | None,
    budget: float,
    methods: str,
) -> int:
    """Run the benchmark, print its JSON line; the exit code (0, 1 on a failure, 2 no GPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch

    if tiny:
        device, dtype = torch.device("cpu"), torch.float32
        large_shape, small_shape = "tiny-large", "tiny-small"
        batch, prompt, steps = batch_size or 2, prompt_tokens or 160, decode_tokens or 8
    else:
        if not torch.cuda.is_available():
            print(
                "error: no CUDA device visible to torch "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                "this benchmark needs one GPU. Use --tiny to check its logic on CPU.",
                file=sys.stderr,
            )
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        large_shape, small_shape = "qwen2-7b", "qwen2-0.5b"
        batch, prompt, steps = batch_size or 16, prompt_tokens or 2048, decode_tokens or 256

    from collab_agent.cache import H2O, SmallKV

    started = time.perf_counter()
    log(f"building random-weight {large_shape} and {small_shape} ({dtype}) on {device}")
    large = build(large_shape, dtype, device, seed=1)
    small = build(small_shape, dtype, device, seed=0)
    vocab = SHAPES[large_shape]["vocab_size"]
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    warm_ids = ids[:, : min(prompt, 128)]

    makers = {
        "full_sdpa": lambda: None,
        "h2o": lambda: H2O(budget=budget, budget_of="context"),
        "smallkv": lambda: SmallKV(assistant=small, budget=budget, budget_of="context"),
    }
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "large_shape": large_shape,
        "small_shape": small_shape,
        "batch": batch,
        "prompt_tokens": prompt,
        "decode_tokens": steps,
        "budget": budget,
        "budget_of": "context",
        "dtype": str(dtype).replace("torch.", ""),
        "methods": {},
    }
    try:
        log("correctness: SmallKV at budget 1.0 (exact) and 0.9 vs the full cache")
        check_ids = ids[: min(batch, 2), : min(prompt, 512)]
        result["correctness"] = check_correctness(large, small, check_ids)
        log(f"correctness: {result['correctness']}")
    except Exception as exc:  # report it and go on to the throughput
        traceback.print_exc(file=sys.stderr)
        result["correctness"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    for name in [m.strip() for m in methods.split(",") if m.strip()]:
        if name not in makers:
            print(
                f"error: --methods: unknown method {name!r}; choose from {sorted(makers)}",
                file=sys.stderr,
            )
            return 2
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            method = makers[name]()

            def run(i: Any, s: int, m: Any = method) -> dict[str, Any]:
                return run_full_sdpa(large, i, s) if m is None else run_method(large, i, s, m)

            log(f"{name}: warm-up")
            run(warm_ids, 4)
            log(f"{name}: batch {batch}, {prompt} + {steps} tokens")
            figures = run(ids, steps)
            if device.type == "cuda":
                figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if method is not None and hasattr(method, "detach"):
                method.detach()
            result["methods"][name] = figures
            log(f"{name}: {figures}")
        except Exception as exc:  # keep going: report the other methods
            traceback.print_exc(file=sys.stderr)
            result["methods"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    full = result["methods"].get("full_sdpa", {}).get("decode_tokens_per_s")
    for name in ("h2o", "smallkv"):
        speed = result["methods"].get(name, {}).get("decode_tokens_per_s")
        if full and speed:
            result["methods"][name]["decode_speed_vs_full_sdpa"] = round(speed / full, 3)
    h2o = result["methods"].get("h2o", {}).get("decode_tokens_per_s")
    smallkv = result["methods"].get("smallkv", {}).get("decode_tokens_per_s")
    if h2o and smallkv:
        result["smallkv_vs_h2o"] = round(smallkv / h2o, 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result), flush=True)
    ok = all("error" not in v for v in result["methods"].values())
    return 0 if ok and result["correctness"].get("ok") else 1


def register(bench: typer.Typer) -> None:
    """Add ``gpu-smallkv-throughput`` to the ``bench`` sub-app."""
    bench.command("gpu-smallkv-throughput")(gpu_smallkv_throughput)


if __name__ == "__main__":
    from collab_agent.cli.entry import run_alone

    run_alone(gpu_smallkv_throughput)
