"""API-key access control as a pure ASGI middleware, after vLLM's.

- The server keeps only SHA-256 digests of the keys, never the keys.
- A request offers a key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; the
  digest of what it offers is compared with **every** stored digest by
  :func:`secrets.compare_digest`, with no early exit, so the time taken says nothing about
  which key (or how much of one) matched.
- Deny by default: every path is guarded, unknown paths included (a 404 would tell an
  attacker which routes exist), except the public ones that probes and scrapers must reach
  without a key: ``/v2/health/live``, ``/v2/health/ready``, ``/metrics``, ``/openapi.json``.
- A refusal is ``401 {"error": "Unauthorized"}`` with ``WWW-Authenticate: Bearer``.

>>> digests = hash_keys(["k1"])
>>> check_key(b"Bearer k1", b"", digests), check_key(b"Bearer k2", b"", digests)
(True, False)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["PUBLIC_PATHS", "APIKeyMiddleware", "check_key", "hash_keys", "load_api_keys"]

PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json"})


def hash_keys(keys: Iterable[str]) -> tuple[bytes, ...]:
    """SHA-256 digests of ``keys`` (what the server stores instead of the keys)."""
    out = []
    for k in keys:
        if not isinstance(k, str) or not k.strip():
            raise ValueError("API keys must be non-empty strings")
        out.append(hashlib.sha256(k.strip().encode()).digest())
    return tuple(out)


def _offered(authorization: bytes, x_api_key: bytes) -> list[bytes]:
    found = []
    scheme, _, value = authorization.strip().partition(b" ")
    if scheme.lower() == b"bearer" and value.strip():
        found.append(value.strip())
    if x_api_key.strip():
        found.append(x_api_key.strip())
    return found


def check_key(authorization: bytes, x_api_key: bytes, digests: Sequence[bytes]) -> bool:
    """Whether the offered key (either header) hashes to one of ``digests``.

    Every stored digest is compared, whatever matched before, in constant time each.
    """
    ok = False
    for offered in _offered(authorization, x_api_key):
        d = hashlib.sha256(offered).digest()
        for stored in digests:
            ok |= secrets.compare_digest(d, stored)
    return ok


def load_api_keys(
    file: str | os.PathLike[str] | None = None, env: str | None = "MAAS_JAX_API_KEYS"
) -> list[str]:
    """Read API keys from a file (one per line, ``#`` starts a comment line) and/or ``env``.

    The environment variable holds comma-separated keys. Both sources are merged (file first),
    duplicates dropped. An empty result means an open server.

    >>> import os
    >>> os.environ["DOCTEST_KEYS"] = "a, b,,a"
    >>> load_api_keys(env="DOCTEST_KEYS")
    ['a', 'b']
    """
    keys: list[str] = []
    if file is not None:
        for line in Path(file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    if env is not None:
        keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


_UNAUTHORIZED = json.dumps({"error": "Unauthorized"}).encode()


class APIKeyMiddleware:
    """Refuse every non-public request that does not carry one of the keys.

    Args:
      app: the ASGI app to guard.
      digests: SHA-256 digests of the keys (:func:`hash_keys`); empty = no access control.
      public_paths: paths reachable without a key (exact matches).
    """

    def __init__(
        self,
        app: ASGIApp,
        digests: Sequence[bytes],
        public_paths: Iterable[str] = PUBLIC_PATHS,
    ) -> None:
        self.app = app
        self.digests = tuple(digests)
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or not self.digests
            or scope["path"] in self.public_paths
        ):
            await self.app(scope, receive, send)
            return
        auth = x_key = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                auth = value
            elif name == b"x-api-key":
                x_key = value
        if check_key(auth, x_key, self.digests):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
