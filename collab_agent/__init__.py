"""collab-agent: a small reasoning model thinks, a large one steps in when a trigger fires.

Everything a user needs is importable from here. Names that pull in langchain, torch or
transformers are exported on first use (``import collab_agent`` loads none of them); the
``TYPE_CHECKING`` imports below give type checkers their real types.
"""

from typing import TYPE_CHECKING

from collab_agent.backends.base import Backend
from collab_agent.backends.specs import PRESETS, load_backend
from collab_agent.core.config import ReasoningConfig
from collab_agent.core.trace import Firing, Step, Trace, Usage
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
from collab_agent.policies import (
    BaseTrigger,
    CognitiveOffload,
    Handoff,
    InterventionRequest,
    LargeOnly,
    Policy,
    Reject,
    SmallOnly,
    SpecReason,
    StrategicPriming,
    Trigger,
    TrigReason,
)
from collab_agent.testing import ScriptedBackend, ScriptedStep
from collab_agent.types import GREEDY, GenerateRequest, Generation, Role, Sampling

if TYPE_CHECKING:
    from collab_agent.backends.local import TransformersBackend
    from collab_agent.backends.openai import OpenAIBackend
    from collab_agent.breaker import CircuitBreaker
    from collab_agent.cache import SmallKV
    from collab_agent.core.reasoner import Reasoner
    from collab_agent.langchain import CollabChatModel

__all__ = [
    "GREEDY",
    "PRESETS",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "BaseTrigger",
    "CallTimeoutError",
    "CapabilityError",
    "CircuitBreaker",
    "CognitiveOffload",
    "CollabChatModel",
    "CollabError",
    "ConfigError",
    "Firing",
    "GenerateRequest",
    "Generation",
    "Handoff",
    "InterventionRequest",
    "InvalidMessagesError",
    "LargeOnly",
    "ModelNotInstalledError",
    "OpenAIBackend",
    "Policy",
    "Reasoner",
    "ReasoningConfig",
    "Reject",
    "Role",
    "Sampling",
    "ScriptedBackend",
    "ScriptedStep",
    "SmallKV",
    "SmallOnly",
    "SpecReason",
    "Step",
    "StrategicPriming",
    "Trace",
    "TransformersBackend",
    "TrigReason",
    "Trigger",
    "Usage",
    "load_backend",
]
__version__ = "0.1.0"

_LAZY = {
    "CollabChatModel": "collab_agent.langchain",
    "Reasoner": "collab_agent.core.reasoner",
    "CircuitBreaker": "collab_agent.breaker",
    "TransformersBackend": "collab_agent.backends.local",
    "OpenAIBackend": "collab_agent.backends.openai",
    "SmallKV": "collab_agent.cache",
}
"""Exported on first use, so ``import collab_agent`` loads neither langchain nor torch; each
name is also imported under ``TYPE_CHECKING`` above."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'collab_agent' has no attribute {name!r}")
