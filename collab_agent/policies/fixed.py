"""Baselines: one model writes everything."""

from __future__ import annotations

from collab_agent.policies.base import Policy


class SmallOnly(Policy):
    """The small model writes every step and the answer; the large model is never called."""

    def __init__(self, name: str = "small-only") -> None:
        super().__init__(triggers=(), name=name, default_author="small", answer_by="small")


class LargeOnly(Policy):
    """The large model writes every step and the answer; the small model is never called."""

    def __init__(self, name: str = "large-only") -> None:
        super().__init__(triggers=(), name=name, default_author="large", answer_by="large")
