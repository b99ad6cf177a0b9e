"""Moved to `collab_agent.core.trace`; kept so ``from collab_agent.trace import ...`` works."""

from collab_agent.core.trace import (
    Firing,
    Step,
    Trace,
    TraceStop,
    Usage,
)

__all__ = [
    "Firing",
    "Step",
    "Trace",
    "TraceStop",
    "Usage",
]
