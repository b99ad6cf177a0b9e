"""Moved to `collab_agent.core.formats`; kept so ``from collab_agent.prompting import ...`` works."""

from collab_agent.core.formats import (
    FORMATS,
    STEP_DELIMITER,
    STEPWISE,
    STEPWISE_INSTRUCTION,
    THINK,
    ReasoningFormat,
    normalise_step,
    validate_messages,
)

__all__ = [
    "FORMATS",
    "STEPWISE",
    "STEPWISE_INSTRUCTION",
    "STEP_DELIMITER",
    "THINK",
    "ReasoningFormat",
    "normalise_step",
    "validate_messages",
]
