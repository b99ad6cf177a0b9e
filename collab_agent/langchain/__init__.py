"""collab-agent as a LangChain chat model: `CollabChatModel` (`chat_model`), message
conversion (`messages`), tool calling (`tools`), one call's run (`call`), backends built from
spec strings (`backends`) and each model call as a child run in callbacks (`callbacks`)."""

from collab_agent.langchain.chat_model import CollabChatModel

__all__ = ["CollabChatModel"]
