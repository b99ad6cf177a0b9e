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
    "CapabilityError",
    "CollabError",
    "ConfigError",
    "Firing",
    "GenerateRequest",
    "Generation",
    "InvalidMessagesError",
    "ModelNotInstalledError",
    "Role",
    "Sampling",
    "Step",
    "Trace",
    "Usage",
]
__version__ = "0.1.0"
