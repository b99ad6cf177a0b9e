"""Typed errors. Each names the argument or input that is wrong and what would be right."""

from __future__ import annotations


class CollabError(Exception):
    """Base class of every error collab-agent raises on purpose."""


class ConfigError(CollabError, ValueError):
    """A constructor or call argument is out of range or of the wrong kind."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {problem}")


class ContextLengthError(ConfigError):
    """A call's prompt, reasoning budget and answer cannot fit a model's context window."""


class InvalidMessagesError(CollabError, ValueError):
    """The conversation handed to the reasoner cannot be answered as it is."""


class BackendError(CollabError, RuntimeError):
    """A backend failed to produce a generation."""


class BackendUnavailableError(BackendError):
    """A backend stayed unreachable after its bounded retries."""


class CallTimeoutError(CollabError, TimeoutError):
    """A whole call (reasoning and answer) outlasted the chat model's ``timeout``."""


class CapabilityError(CollabError, NotImplementedError):
    """A backend or server cannot do what was asked (e.g. no prompt logprobs)."""


class ModelNotInstalledError(CollabError, LookupError):
    """A bundled model's packages are missing; the message gives the pip command."""


class OverloadedError(BackendError):
    """Too many calls are already waiting for a slot (backpressure): retry later or raise the
    limit (``max_waiting``)."""
