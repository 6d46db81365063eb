"""API keys and request-size limits: the checks every request passes before a route runs.

Keys are compared in constant time and never logged (they are SecretStr in Settings).
The body limit is enforced on the bytes actually received, not on a Content-Length a
client may omit or misstate.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.middleware import send_json_error
from app.config import Settings
from app.errors import Unauthorized

# Reachable without a key: probes must work for orchestrators that hold no secret.
OPEN_PREFIXES = ("/health/",)
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


async def require_api_key(request: Request) -> None:
    """App-wide dependency: with keys configured, every route but health (and docs) needs one."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    path = request.url.path
    if path.startswith(OPEN_PREFIXES) or (settings.docs_public and path.startswith(DOCS_PATHS)):
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token or not key_matches(settings, token.strip()):
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")


def key_matches(settings: Settings, token: str) -> bool:
    # Compare against every key, so the time taken does not reveal which (or whether one) matched.
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(key.get_secret_value().encode(), token.encode())
    return matched


class BodySizeLimit:
    """Answers 413 once a request body passes ``max_body_bytes``, before any route parses it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, send)
            return
        # Read the body up front (it is small by construction), counting what really arrives.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        message = (
            f"the request body is over {self.limit} bytes (TESSERA_MAX_BODY_BYTES); "
            "send fewer or shorter inputs per request"
        )
        await send_json_error(send, 413, "input_too_large", message, scope.get("state", {}).get("request_id"))
