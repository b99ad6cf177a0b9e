"""Shared fixtures. Everything runs offline: no model hub is ever contacted."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest

from collab_agent.backends.tiny import TinyPair

pytest_plugins = ["servers"]


@pytest.fixture(scope="session")
def tiny_pair() -> TinyPair:
    """Two tiny random-weight Qwen2 models (small: seed 0, large: seed 1, a larger shape)
    sharing the real Qwen2.5 tokenizer. Session-scoped: do not change their weights."""
    from collab_agent.backends.tiny import tiny_pair as build

    return build()
