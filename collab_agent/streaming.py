"""Moved to `collab_agent.core.streaming`; kept so ``from collab_agent.streaming import ...`` works."""

from collab_agent.core.streaming import (
    AnswerReveal,
    StepReveal,
)

__all__ = [
    "AnswerReveal",
    "StepReveal",
]
