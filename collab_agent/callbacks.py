"""Moved to `collab_agent.langchain.callbacks`; kept so the old import path works."""

from collab_agent.langchain.callbacks import TracedBackend, traced

__all__ = ["TracedBackend", "traced"]
