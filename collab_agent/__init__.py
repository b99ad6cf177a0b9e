"""collab-agent: a small reasoning model thinks, a large one steps in when a trigger fires."""

from collab_agent.backends.base import (
    GREEDY,
    Backend,
    GenerateRequest,
    Generation,
    Role,
    Sampling,
)
from collab_agent.errors import (
    BackendError,
    BackendUnavailableError,
    CallTimeoutError,
    CapabilityError,
    CollabError,
    ConfigError,
    InvalidMessagesError,
    ModelNotInstalledError,
)
from collab_agent.trace import Firing, Step, Trace, Usage

__all__ = [
    "GREEDY",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "CallTimeoutError",
    "CapabilityError",
    "CircuitBreaker",
    "CollabChatModel",
    "CollabError",
    "ConfigError",
    "Firing",
    "GenerateRequest",
    "Generation",
    "InvalidMessagesError",
    "ModelNotInstalledError",
    "OpenAIBackend",
    "Reasoner",
    "Role",
    "Sampling",
    "SmallKV",
    "SpecReason",
    "Step",
    "Trace",
    "TransformersBackend",
    "TrigReason",
    "Usage",
    "load_backend",
]
__version__ = "0.1.0"

_LAZY = {
    "CollabChatModel": "collab_agent.chat_model",
    "Reasoner": "collab_agent.reasoner",
    "CircuitBreaker": "collab_agent.breaker",
    "TransformersBackend": "collab_agent.backends.local",
    "OpenAIBackend": "collab_agent.backends.openai",
    "load_backend": "collab_agent.backends.specs",
    "TrigReason": "collab_agent.policies",
    "SpecReason": "collab_agent.policies.specreason",
    "SmallKV": "collab_agent.cache",
}
"""Exported on first use, so ``import collab_agent`` loads neither langchain nor torch."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'collab_agent' has no attribute {name!r}")
