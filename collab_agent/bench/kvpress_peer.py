"""kvpress's presses on `bench kv`'s contexts: the peer rows of its table.

kvpress (NVIDIA, https://github.com/NVIDIA/kvpress) pins ``transformers<5.3``, so this file runs
under a separate interpreter that has it and imports only the standard library, torch,
transformers and kvpress; `bench kv --peer-kvpress PYTHON` calls it with a JSON request on stdin
and reads a JSON answer on stdout:

    request  {"model": DIR, "contexts": [[id, ...], ...], "continuations": [[id, ...], ...],
              "budgets": [0.2, ...], "presses": ["snapkv", ...], optional "dtype": "bfloat16",
              optional "check_hooks": true}
    answer   {"methods": {"kvpress_snapkv": {"0.2": {"top1_agreement", "kl",
              "kv_bytes_ratio", "decode_speed_ratio"}}}, "peer": {...}}

Protocol, as `bench kv`'s: the whole prompt is compressed to the budget (a press keeps
``budget`` of its tokens; decoded tokens all stay), then the continuation is teacher-forced one
token at a time with positions that continue the uncompressed prompt (as kvpress's pipeline
does). The reference is the full cache decoded in the same way in this process, so the figures
compare like with like. Every press uses kvpress's own ``compress`` on one shared prefill: a
press's scores at a layer depend only on that layer's inputs, which compression never changes
(it happens after the layer's attention), so this equals running the press's own forward hook
once per budget. ``decode_speed_ratio`` is null: the presses' rows decode in other batch shapes
than the reference here, so no ratio would be fair. ``check_hooks`` also runs each press's own
hook and reports the largest difference from the shared-prefill caches (the test asserts 0).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

PRESSES = {
    "snapkv": "SnapKVPress",
    "streaming": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
    "observed_attention": "ObservedAttentionPress",
}


def log(message: str) -> None:
    print(f"[kvpress] {message}", file=sys.stderr, flush=True)


def make_press(name: str) -> Any:
    import kvpress

    if name not in PRESSES:
        raise SystemExit(f"unknown press {name!r}; choose from {sorted(PRESSES)}")
    return getattr(kvpress, PRESSES[name])()


def compressed_prefill(
    model: Any, ids: Any, presses: dict[str, Any], budgets: list[float]
) -> tuple[Any, Any, dict[tuple[str, float], list[tuple[Any, Any]]]]:
    """One prefill of ``ids``; returns (full cache, last logits, {(press, budget): per-layer
    (keys, values) after that press's ``compress`` at that budget})."""
    from transformers import DynamicCache

    language_model = model.model
    kept: dict[tuple[str, float], list[tuple[Any, Any]]] = {
        (name, b): [] for name in presses for b in budgets
    }
    cache = DynamicCache()

    def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        layer = cache.layers[module.layer_idx]
        keys, values = layer.keys, layer.values
        for name, press in presses.items():
            for budget in budgets:
                press.compression_ratio = 1.0 - budget
                k, v = press.compress(
                    module, kwargs["hidden_states"], keys, values, output[1], kwargs
                )
                kept[(name, budget)].append((k, v))
        return output

    for press in presses.values():
        press.post_init_from_model(model)
    hooks = []
    try:
        for layer in language_model.layers:
            layer.self_attn.rotary_emb = language_model.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    finally:
        for handle in hooks:
            handle.remove()
    return cache, out.logits[:, -1].float(), kept


def stacked_cache(rows: list[list[tuple[Any, Any]]]) -> Any:
    """A DynamicCache whose batch rows are the given per-layer (keys, values) lists."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    for index in range(len(rows[0])):
        keys = torch.cat([row[index][0] for row in rows], 0)
        values = torch.cat([row[index][1] for row in rows], 0)
        cache.update(keys, values, index)
    return cache


def forced_decode(
    model: Any,
    cache: Any,
    first: Any,
    forced: Any,
    start: int,
    on_step: Callable[[int, Any], None],
) -> float:
    """Feed ``forced`` ``(B, T)`` one token at a time at positions ``start, start + 1, ...``;
    ``on_step(t, logits)`` sees the ``(B, V)`` logits before token ``t`` (nothing is kept, so
    long continuations over a large vocabulary fit in memory). Returns the decode seconds."""
    import torch

    on_step(0, first)
    begin = time.perf_counter()
    for t in range(forced.shape[1] - 1):
        position = torch.full((forced.shape[0], 1), start + t, dtype=torch.long)
        out = model(input_ids=forced[:, t : t + 1], past_key_values=cache, position_ids=position)
        on_step(t + 1, out.logits[:, -1].float())
    return time.perf_counter() - begin


class Figures:
    """Running sums of KL(reference || row) and top-1 agreement per batch row; row ``r`` is
    compared with reference row ``of[r]``."""

    def __init__(self, reference: Any, of: list[int]) -> None:
        import torch

        self.reference, self.of = reference, torch.tensor(of)
        self.kl = torch.zeros(len(of), dtype=torch.float64)
        self.agree = torch.zeros(len(of), dtype=torch.float64)
        self.steps = 0

    def __call__(self, t: int, logits: Any) -> None:
        import torch

        lp_ref = self.reference[self.of, t]
        lp_got = torch.log_softmax(logits, -1)
        self.kl += (lp_ref.exp() * (lp_ref - lp_got)).sum(-1).double()
        self.agree += (lp_ref.argmax(-1) == lp_got.argmax(-1)).double()
        self.steps += 1


def hook_difference(
    model: Any, ids: Any, presses: dict[str, Any], budgets: list[float], kept: Any
) -> float:
    """Largest absolute difference between the shared-prefill caches and the caches kvpress's
    own hook (``with press(model)``) leaves, over every press, budget and layer."""
    from transformers import DynamicCache

    worst = 0.0
    for name, press in presses.items():
        for budget in budgets:
            press.compression_ratio = 1.0 - budget
            cache: Any = DynamicCache()
            with press(model):
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for layer, (k, v) in zip(cache.layers, kept[(name, budget)], strict=True):
                if layer.keys.shape != k.shape:
                    return float("inf")
                worst = max(
                    worst,
                    (layer.keys - k).abs().max().item(),
                    (layer.values - v).abs().max().item(),
                )
    return worst


def run(request: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    budgets = [float(b) for b in request["budgets"]]
    presses = {name: make_press(name) for name in request["presses"]}
    # eager: ObservedAttention reads the attention weights, which only eager returns
    model = AutoModelForCausalLM.from_pretrained(
        request["model"],
        dtype=getattr(torch, request.get("dtype", "bfloat16")),
        attn_implementation="eager",
    ).eval()
    ids = torch.tensor(request["contexts"])
    forced = torch.tensor(request["continuations"])
    n_ctx, length = ids.shape
    steps = forced.shape[1]
    with torch.inference_mode():
        log(f"{n_ctx} contexts of {length} tokens: one prefill, {len(presses)} presses")
        full, last, kept = compressed_prefill(model, ids, presses, budgets)
        reference = torch.empty(n_ctx, steps, last.shape[-1])  # log-probabilities

        def keep(t: int, logits: Any) -> None:
            reference[:, t] = torch.log_softmax(logits, -1)

        full_seconds = forced_decode(model, full, last, forced, length, keep)
        log(f"full: {full_seconds:.0f} s for {steps} tokens")
        floor = (reference.argmax(-1) == forced).float().mean().item()
        methods: dict[str, dict[str, Any]] = {f"kvpress_{name}": {} for name in presses}
        for budget in budgets:
            names = list(presses)
            rows = [
                [(k[c : c + 1], v[c : c + 1]) for k, v in kept[(name, budget)]]
                for name in names
                for c in range(n_ctx)
            ]
            n_kept = rows[0][0][0].shape[2]
            figures = Figures(reference, list(range(n_ctx)) * len(names))
            seconds = forced_decode(
                model,
                stacked_cache(rows),
                last.repeat(len(names), 1),
                forced.repeat(len(names), 1),
                length,
                figures,
            )
            log(f"budget {budget}: {n_kept} of {length} prompt tokens kept, {seconds:.0f} s")
            for i, name in enumerate(names):
                part = slice(i * n_ctx, (i + 1) * n_ctx)
                methods[f"kvpress_{name}"][str(budget)] = {
                    "top1_agreement": round(figures.agree[part].mean().item() / steps, 4),
                    "kl": round(figures.kl[part].mean().item() / steps, 4),
                    "kv_bytes_ratio": round((n_kept + steps - 1) / (length + steps - 1), 4),
                    "decode_speed_ratio": None,
                }
        checked = (
            {"hook_max_abs_diff": hook_difference(model, ids, presses, budgets, kept)}
            if request.get("check_hooks")
            else {}
        )
    return {
        "methods": methods,
        **checked,
        "peer": {
            "kvpress": version("kvpress"),
            "transformers": transformers.__version__,
            "presses": {name: PRESSES[name] + " (defaults)" for name in presses},
            "reference": "full cache, eager attention, teacher-forced one token at a time here",
            "reference_vs_continuation_top1": round(floor, 4),
        },
    }


def main() -> None:
    request = json.load(sys.stdin)
    print(json.dumps(run(request)))


if __name__ == "__main__":
    main()
