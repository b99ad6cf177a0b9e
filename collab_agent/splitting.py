"""Moved to `collab_agent.core.formats`; kept so ``from collab_agent.splitting import ...`` works."""

from collab_agent.core.formats import (
    BLANK_LINE,
    LINE,
    SPLITTERS,
    StepSplitter,
    choose_splitter,
    merge,
    resolve_splitter,
    splitter_for_pair,
)

__all__ = [
    "BLANK_LINE",
    "LINE",
    "SPLITTERS",
    "StepSplitter",
    "choose_splitter",
    "merge",
    "resolve_splitter",
    "splitter_for_pair",
]
