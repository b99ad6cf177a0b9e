"""Moved to `collab_agent.langchain`; kept so ``from collab_agent.chat_model import
CollabChatModel`` works."""

from collab_agent.langchain.backends import LOCAL_BACKENDS as _LOCAL_BACKENDS
from collab_agent.langchain.chat_model import CollabChatModel

__all__ = ["_LOCAL_BACKENDS", "CollabChatModel"]
