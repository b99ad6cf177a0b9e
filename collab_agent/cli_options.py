"""Deprecated home of the shared command-line options: they are `collab_agent.cli.options`."""

from collab_agent.cli.options import (
    JsonOption,
    LargeOption,
    ModelsOption,
    SmallOption,
    SplitterOption,
    ThreadsOption,
)

__all__ = [
    "JsonOption",
    "LargeOption",
    "ModelsOption",
    "SmallOption",
    "SplitterOption",
    "ThreadsOption",
]
