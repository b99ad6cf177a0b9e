"""``collab-agent serve``: the collaboration behind an OpenAI-compatible HTTP API.

`create_app` builds the ASGI app from a `ServeConfig` and a loaded (small, large) pair;
`serve_forever` runs it under uvicorn with graceful shutdown. The command lives in `command`.
"""

from collab_agent.serve.app import create_app
from collab_agent.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
