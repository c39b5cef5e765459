"""API keys and browser origins.

With keys configured (`--api-key`, repeatable, or `STREAMVOX_API_KEYS`, comma-separated), every request but
`GET /health` and the playground page must bear one as `Authorization: Bearer KEY`, which is how the OpenAI
clients send theirs; a WebSocket may give it as the `api_key` query parameter instead, since a browser cannot set
headers on one. Anything else gets a 401 before it is routed, so it never reaches the engine. Keys are compared in
constant time, against every configured key.

A WebSocket opened by a page (it carries an `Origin`) is accepted from the server's own origin or one listed with
`--cors-origin`; others are refused at the handshake (403), as CORS would refuse the page's HTTP calls.
"""

from __future__ import annotations

import hmac
import json
import os
from urllib.parse import parse_qs, urlsplit

from streamvox.server.errors import ApiError, error_body, error_response

OPEN_PATHS = ("/health", "/")  # liveness, and the playground's static page (it asks for a key itself)
KEYS_ENV = "STREAMVOX_API_KEYS"


def configured_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    """The flag's keys and the environment's, without blanks."""
    more = os.environ.get(KEYS_ENV, "").split(",")
    return tuple(dict.fromkeys(key.strip() for key in (*keys, *more) if key.strip()))


def _presented(scope) -> str | None:
    headers = dict(scope["headers"])
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scope["type"] == "websocket":
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key")
        return values[0] if values else None
    return None


class ApiKeyAuth:
    """Refuses a request without a configured key with 401 (plain ASGI, before routing)."""

    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    def _is_allowed(self, scope) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS:
            return True
        presented = (_presented(scope) or "").encode()
        matches = [hmac.compare_digest(presented, key) for key in self.keys]  # every key, whichever matches
        return any(matches)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or self._is_allowed(scope):
            await self.app(scope, receive, send)
            return
        error = ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                         headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http":
            await error_response(error)(scope, receive, send)
        else:
            await _deny_websocket(scope, send, error)


async def _deny_websocket(scope, send, error: ApiError) -> None:
    """A refused WebSocket handshake: the error as an HTTP response where the server can send one, else a
    close before accepting (a 403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), *((k.lower().encode(), v.encode())
                                                         for k, v in error.headers.items())]
    await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


def is_origin_allowed(headers, allowed: tuple[str, ...]) -> bool:
    """Whether a WebSocket handshake's Origin may connect: none (not a browser), the server's own, or listed."""
    origin = headers.get("origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return urlsplit(origin).netloc == headers.get("host")
