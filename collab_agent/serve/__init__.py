"""``collab-agent serve``: the collaboration behind an OpenAI-compatible HTTP API.

`create_app` builds the ASGI app from a `ServeConfig` and a loaded (small, large) pair;
`launch.serve_forever` runs it under uvicorn with graceful shutdown. Imports are lazy so the
command line's ``--help`` does not load FastAPI and LangChain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collab_agent.serve.app import create_app
    from collab_agent.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from collab_agent.serve.app import create_app

        return create_app
    if name == "ServeConfig":
        from collab_agent.serve.config import ServeConfig

        return ServeConfig
    raise AttributeError(f"module 'collab_agent.serve' has no attribute {name!r}")
