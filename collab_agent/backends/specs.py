"""Model spec strings, one syntax wherever a command or a constructor takes a model.

============================  ==================================================================
``bundled:NAME``              a bundled real model, run by transformers on this machine
``hf:PATH_OR_ID``             any causal LM transformers loads (a local folder, or a hub id)
``openai:MODEL@BASE_URL``     an OpenAI-compatible server; key from ``OPENAI_API_KEY``
``llamacpp:bundled:NAME``     a llama.cpp server started (and stopped) for a bundled GGUF
``llamacpp:PATH.gguf``        the same for any GGUF file
``tiny`` / ``tiny:SEED``      random weights at a tiny Qwen2 shape (seed 0 small, others larger)
============================  ==================================================================

`KINDS` is the one table of spec kinds: each prefix with the function that reads the rest of
the spec and the function that builds its backend. A loader imports its backend module when
called, so ``import collab_agent`` loads no model library.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collab_agent import _checks
from collab_agent.backends.base import Backend
from collab_agent.errors import ConfigError

SpecKind = str
"""A spec's prefix, a key of `KINDS`."""

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


@dataclass(frozen=True)
class LoadOptions:
    """What `load_backend` was given besides the spec.

    Attributes:
        options: keyword arguments for the backend's constructor.
        api_key_env: the environment variable holding a server's API key.
        threads: CPU threads to compute with (``None``: the backend's default).
        parallel: conversations the caller runs at once (``None``: one).
        api_key: a server's API key given directly, used instead of ``api_key_env``'s (never
            shown in a repr).
    """

    options: dict[str, Any]
    api_key_env: str = "OPENAI_API_KEY"
    threads: int | None = None
    parallel: int | None = None
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Kind:
    """One spec kind: how its spec is read, how its backend is built, and what that backend is.

    The flags say what callers may do with a kind's backends (the chat model, the server), so
    they never test a kind by its name.

    Attributes:
        load: the backend for a parsed spec.
        parse: the `ModelSpec` for the text after ``KIND:`` (default: that text as the target).
        usage: the spec's syntax, for error messages.
        server: its backend sends requests to a server, and takes ``max_retries`` and a
            per-request ``timeout`` (seconds) as options.
        shared: one backend per spec and options may serve the whole process (it holds no
            secret and no connection tied to one event loop); ``False``: each owner builds its
            own, with its own key, and closes it.
        batches: a local model that runs concurrent conversations as one batch when given
            ``max_batch_size``; a server kind serves them through ``LoadOptions.parallel``.
        tokenizer: the tokenizer of the model a spec names, read from local files only (no
            weights loaded, no server started); ``None``: not readable offline.
    """

    load: Callable[[ModelSpec, LoadOptions], Backend]
    parse: Callable[[str, str], ModelSpec] | None = None
    usage: str = ""
    server: bool = False
    shared: bool = True
    batches: bool = False
    tokenizer: Callable[[ModelSpec], Any] | None = None


# ============================================================================ loaders
def _local(spec: ModelSpec, given: LoadOptions) -> Backend:
    """transformers on this machine: ``bundled:``, ``hf:`` and ``tiny:`` specs."""
    from collab_agent.backends.local import TransformersBackend

    if given.threads is not None:
        import torch

        torch.set_num_threads(given.threads)
    options = dict(given.options)
    cls: type[TransformersBackend] = TransformersBackend
    if options.get("max_batch_size", 1) > 1:
        from collab_agent.backends.batching import BatchedTransformersBackend

        cls = BatchedTransformersBackend
    else:
        options.pop("max_batch_size", None)
    if spec.kind == "tiny":
        from collab_agent.backends.tiny import tiny_qwen2

        seed = int(spec.target)
        model, tokenizer = tiny_qwen2(seed=seed, size="small" if seed == 0 else "large")
        return cls(model, tokenizer, name=f"tiny-qwen2-{seed}", **options)
    name = f"bundled:{spec.target}" if spec.kind == "bundled" else spec.target
    return cls.from_pretrained(name, **options)


def _openai(spec: ModelSpec, given: LoadOptions) -> Backend:
    """An OpenAI-compatible server; the key given, else from ``given.api_key_env``."""
    from collab_agent.backends.openai import OpenAIBackend

    assert spec.base_url is not None
    api_key = given.api_key if given.api_key is not None else os.environ.get(given.api_key_env)
    return OpenAIBackend(spec.target, base_url=spec.base_url, api_key=api_key, **given.options)


def _llamacpp(spec: ModelSpec, given: LoadOptions) -> Backend:
    """A llama.cpp server started for a GGUF model (``parallel`` slots)."""
    from collab_agent.backends.llamacpp import llamacpp_backend

    options = dict(given.options)
    if given.threads is not None:
        options["threads"] = given.threads
    if given.parallel is not None:
        options.setdefault("n_parallel", given.parallel)
    return llamacpp_backend(spec.target, **options)


# ============================================================================ tokenizers
def _tiny_tokenizer(spec: ModelSpec) -> Any:
    from collab_agent.backends.tiny import qwen_tokenizer

    return qwen_tokenizer()


def _gguf_tokenizer(spec: ModelSpec) -> Any:
    """From a GGUF file's metadata: ``bundled:NAME`` specs and ``llamacpp:`` targets."""
    from collab_agent.backends.gguf import gguf_tokenizer

    return gguf_tokenizer(f"bundled:{spec.target}" if spec.kind == "bundled" else spec.target)


def _hf_tokenizer(spec: ModelSpec) -> Any:
    from collab_agent._hf import IMPORT_LOCK

    with IMPORT_LOCK:  # a first load may run in a worker thread
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec.target)


# ============================================================================ parsers
def _tiny(rest: str, spec: str) -> ModelSpec:
    if not rest.isdigit():
        raise ConfigError("model spec", f"tiny:SEED needs an integer seed, got {rest!r}")
    return ModelSpec("tiny", rest)


def _model_at_url(rest: str, spec: str) -> ModelSpec:
    model, at, url = rest.rpartition("@")
    if not at or not model or not url.startswith(("http://", "https://")):
        raise ConfigError("model spec", f"expected openai:MODEL@http(s)://HOST/v1, got {spec!r}")
    return ModelSpec("openai", model, url)


KINDS: dict[SpecKind, Kind] = {
    "bundled": Kind(_local, usage="bundled:NAME", batches=True, tokenizer=_gguf_tokenizer),
    "hf": Kind(_local, usage="hf:PATH", batches=True, tokenizer=_hf_tokenizer),
    "openai": Kind(_openai, _model_at_url, usage="openai:MODEL@URL", server=True, shared=False),
    "llamacpp": Kind(
        _llamacpp,
        usage="llamacpp:bundled:NAME, llamacpp:PATH.gguf",
        server=True,
        tokenizer=_gguf_tokenizer,
    ),
    "tiny": Kind(_local, _tiny, usage="tiny[:SEED]", batches=True, tokenizer=_tiny_tokenizer),
}
"""Every spec kind: ``KIND:REST`` is read by ``KINDS[KIND]``; a new backend is one line here."""


def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec string; raise `ConfigError` naming what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("model spec", f"must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec == "tiny":
        return ModelSpec("tiny", "0")
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        usages = ", ".join(k.usage or f"{name}:TARGET" for name, k in KINDS.items())
        raise ConfigError("model spec", f"{spec!r} is not one of {usages}")
    found = KINDS.get(kind)
    if found is None:
        raise ConfigError("model spec", f"unknown kind {kind!r} in {spec!r}")
    return found.parse(rest, spec) if found.parse else ModelSpec(kind, rest)


def spec_kind(spec: ModelSpec) -> Kind:
    """The `Kind` of a parsed spec; `ConfigError` for a kind not in `KINDS`."""
    kind = KINDS.get(spec.kind)
    if kind is None:
        raise ConfigError("model spec", f"unknown kind {spec.kind!r} in {spec}")
    return kind


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
    api_key: str | None = None,
    threads: int | None = None,
    parallel: int | None = None,
    **options: Any,
) -> Backend:
    """Build the backend a spec names. ``options`` go to the backend's constructor
    (``dtype``, ``device`` for local models; ``timeout``, ``price`` for servers). A server's
    API key is ``api_key`` when given, else the environment variable ``api_key_env``.

    ``threads`` sets the CPU threads a model computes with: torch's for local models (a process-
    wide setting), the server's for ``llamacpp:`` specs; remote servers ignore it. On a machine
    shared by two models (or other busy work) 1 is often fastest: llama.cpp's threads meet at a
    barrier after every operation and stall when the cores are oversubscribed.

    ``parallel`` is how many conversations the caller runs at once: a ``llamacpp:`` server gets
    that many slots, so they decode as one batch instead of queueing; other backends ignore it.
    """
    parsed = spec if isinstance(spec, ModelSpec) else parse_spec(spec)
    if threads is not None:
        _checks.positive_int("threads", threads)
    if parallel is not None:
        _checks.positive_int("parallel", parallel)
    kind = spec_kind(parsed)
    return kind.load(parsed, LoadOptions(options, api_key_env, threads, parallel, api_key))
