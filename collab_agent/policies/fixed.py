"""Baselines: one model writes everything."""

from __future__ import annotations

from collab_agent.policies.base import Policy


def SmallOnly(name: str = "small-only") -> Policy:
    """The small model writes every step and the answer; the large model is never called."""
    return Policy(triggers=(), name=name, default_author="small", answer_by="small")


def LargeOnly(name: str = "large-only") -> Policy:
    """The large model writes every step and the answer; the small model is never called."""
    return Policy(triggers=(), name=name, default_author="large", answer_by="large")
