"""Bearer API keys: read from a file or an environment variable, compared in constant time.

Keys are never logged or shown; a key's identity in metrics and limits is a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from collab_agent.errors import ConfigError
from collab_agent.serve.errors import APIError


def load_keys(file: str | Path | None = None, env: str | None = None) -> frozenset[str]:
    """Keys from ``file`` (one per line; blank lines and ``#`` comments skipped) and from the
    environment variable ``env`` (comma-separated)."""
    keys: set[str] = set()
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError("--api-keys-file", f"{path} is not a file")
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.add(line)
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError("--api-keys-env", f"the environment variable {env} is not set")
        keys.update(k.strip() for k in value.split(",") if k.strip())
    if (file is not None or env is not None) and not keys:
        raise ConfigError("--api-keys-file / --api-keys-env", "no keys found in what was given")
    return frozenset(keys)


def key_id(key: str) -> str:
    """A short stable name for a key (its sha256 prefix), safe to log and to label metrics."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def authenticate(authorization: str | None, keys: frozenset[str]) -> str | None:
    """The caller's key id (``None`` when the server has no keys), or `APIError` 401. Every
    key is compared in constant time."""
    if not keys:
        return None
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            type="invalid_request_error",
            code="invalid_api_key",
        )
    presented_bytes = presented.strip().encode()
    matched = None
    for key in keys:  # no early exit: the time does not depend on which key matched
        if hmac.compare_digest(presented_bytes, key.encode()):
            matched = key
    if matched is None:
        raise APIError(
            401, "incorrect API key", type="invalid_request_error", code="invalid_api_key"
        )
    return key_id(matched)
