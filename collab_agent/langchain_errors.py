"""Old home of `collab_agent.langchain.errors` (kept so existing imports work)."""

from collab_agent.langchain.errors import LANGCHAIN_TYPES, as_langchain, langchain_typed

__all__ = ["LANGCHAIN_TYPES", "as_langchain", "langchain_typed"]
