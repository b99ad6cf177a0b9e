"""Moved to `collab_agent.core.session`; kept so ``from collab_agent.session import ...`` works."""

from collab_agent.core.session import (
    Session,
)

__all__ = [
    "Session",
]
