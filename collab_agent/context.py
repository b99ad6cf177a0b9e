"""Moved to `collab_agent.core.context`; kept so ``from collab_agent.context import ...`` works."""

from collab_agent.core.context import (
    fit_budget,
)

__all__ = [
    "fit_budget",
]
