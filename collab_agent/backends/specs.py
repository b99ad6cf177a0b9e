"""Model spec strings, one syntax wherever a command or a constructor takes a model.

============================  ==================================================================
``bundled:NAME``              a bundled real model, run by transformers on this machine
``hf:PATH_OR_ID``             any causal LM transformers loads (a local folder, or a hub id)
``openai:MODEL@BASE_URL``     an OpenAI-compatible server; key from ``OPENAI_API_KEY``
``llamacpp:bundled:NAME``     a llama.cpp server started (and stopped) for a bundled GGUF
``llamacpp:PATH.gguf``        the same for any GGUF file
``tiny`` / ``tiny:SEED``      random weights at a tiny Qwen2 shape (seed 0 small, others larger)
============================  ==================================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from collab_agent import _checks
from collab_agent.backends.base import Backend
from collab_agent.errors import ConfigError

SpecKind = Literal["bundled", "hf", "openai", "llamacpp", "tiny"]

SMALL_BUNDLED = "qwen2.5-coder-0.5b-instruct"
LARGE_BUNDLED = "qwen2.5-coder-1.5b-instruct"

PRESETS: dict[str, tuple[str, str]] = {
    "bundled": (f"bundled:{SMALL_BUNDLED}", f"bundled:{LARGE_BUNDLED}"),
    "llamacpp": (f"llamacpp:bundled:{SMALL_BUNDLED}", f"llamacpp:bundled:{LARGE_BUNDLED}"),
    "tiny": ("tiny:0", "tiny:1"),
}
"""``--models NAME`` presets: (small, large) spec pairs."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: its kind, its target (name, path, model id) and base URL."""

    kind: SpecKind
    target: str
    base_url: str | None = None

    def __str__(self) -> str:
        if self.kind == "openai":
            return f"openai:{self.target}@{self.base_url}"
        return f"{self.kind}:{self.target}"


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raise `ConfigError` naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("model spec", f"must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec == "tiny":
        return ModelSpec("tiny", "0")
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ConfigError(
            "model spec",
            f"{spec!r} is not one of bundled:NAME, hf:PATH, openai:MODEL@URL, "
            "llamacpp:bundled:NAME, llamacpp:PATH.gguf, tiny[:SEED]",
        )
    if kind == "tiny":
        if not rest.isdigit():
            raise ConfigError("model spec", f"tiny:SEED needs an integer seed, got {rest!r}")
        return ModelSpec("tiny", rest)
    if kind in ("bundled", "hf", "llamacpp"):
        return ModelSpec(kind, rest)  # type: ignore[arg-type]
    if kind == "openai":
        model, at, url = rest.rpartition("@")
        if not at or not model or not url.startswith(("http://", "https://")):
            raise ConfigError(
                "model spec", f"expected openai:MODEL@http(s)://HOST/v1, got {spec!r}"
            )
        return ModelSpec("openai", model, url)
    raise ConfigError("model spec", f"unknown kind {kind!r} in {spec!r}")


def resolve_pair(models: str | None, small: str | None, large: str | None) -> tuple[str, str]:
    """The (small, large) specs from a ``--models`` preset and/or explicit ``--small/--large``."""
    if models is not None and models not in PRESETS:
        raise ConfigError("--models", f"must be one of {sorted(PRESETS)}, got {models!r}")
    default_small, default_large = PRESETS[models or "bundled"]
    return small or default_small, large or default_large


def load_backend(
    spec: str | ModelSpec,
    *,
    api_key_env: str = "OPENAI_API_KEY",
    threads: int | None = None,
    parallel: int | None = None,
    **options: Any,
) -> Backend:
    """Build the backend a spec names. ``options`` go to the backend's constructor
    (``dtype``, ``device`` for local models; ``timeout``, ``price`` for servers).

    ``threads`` sets the CPU threads a model computes with: torch's for local models (a process-
    wide setting), the server's for ``llamacpp:`` specs; remote servers ignore it. On a machine
    shared by two models (or other busy work) 1 is often fastest: llama.cpp's threads meet at a
    barrier after every operation and stall when the cores are oversubscribed.

    ``parallel`` is how many conversations the caller runs at once: a ``llamacpp:`` server gets
    that many slots, so they decode as one batch instead of queueing (0.5B model, 1 thread, 8
    callers: 12.5 tokens/s with 1 slot, 17.1 with 2, 25.6 with 8); other backends ignore it.
    """
    parsed = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    if threads is not None:
        _checks.positive_int("threads", threads)
    if parallel is not None:
        _checks.positive_int("parallel", parallel)
    if parsed.kind in ("bundled", "hf", "tiny"):
        from collab_agent.backends.local import TransformersBackend

        if threads is not None:
            import torch

            torch.set_num_threads(threads)

        cls: type[TransformersBackend] = TransformersBackend
        if options.get("max_batch_size", 1) > 1:
            from collab_agent.backends.batching import BatchedTransformersBackend

            cls = BatchedTransformersBackend
        else:
            options.pop("max_batch_size", None)
        if parsed.kind == "tiny":
            from collab_agent.backends.tiny import tiny_qwen2

            seed = int(parsed.target)
            model, tokenizer = tiny_qwen2(seed=seed, size="small" if seed == 0 else "large")
            return cls(model, tokenizer, name=f"tiny-qwen2-{seed}", **options)
        name = f"bundled:{parsed.target}" if parsed.kind == "bundled" else parsed.target
        return cls.from_pretrained(name, **options)
    if parsed.kind == "openai":
        from collab_agent.backends.openai import OpenAIBackend

        assert parsed.base_url is not None
        return OpenAIBackend(
            parsed.target, base_url=parsed.base_url, api_key=os.environ.get(api_key_env), **options
        )
    from collab_agent.backends.llamacpp import llamacpp_backend

    if threads is not None:
        options["threads"] = threads
    if parallel is not None:
        options.setdefault("n_parallel", parallel)
    return llamacpp_backend(parsed.target, **options)
