"""Moved to `collab_agent.core.reasoner`; kept so ``from collab_agent.reasoner import ...`` works."""

from collab_agent.core.reasoner import (
    AnswerEvent,
    Event,
    Reasoner,
    StepEvent,
    TokenEvent,
)

__all__ = [
    "AnswerEvent",
    "Event",
    "Reasoner",
    "StepEvent",
    "TokenEvent",
]
