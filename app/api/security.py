"""API keys with their scopes and tenants, and the body-size limit: the checks a request
passes before a route runs.

Keys are compared in constant time and never logged (they are SecretStr in Settings).
The body limit is enforced on the bytes actually received, not on a Content-Length a
client may omit or misstate.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.middleware import send_json_error
from app.config import Settings
from app.errors import Forbidden, Unauthorized

# Reachable without a key: probes must work for orchestrators that hold no secret.
OPEN_PREFIXES = ("/health/",)
DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")


class KeyScope(StrEnum):
    inference = "inference"  # TESSERA_API_KEYS: the task and compatibility routes, reading the catalog
    admin = "admin"  # TESSERA_ADMIN_KEYS: all of that, and loading or unloading models


@dataclass(frozen=True)
class Key:
    """Who a request is, once its key matched: the key's scope and its tenant (the name
    fair batching and the rate limit know it by; never the secret itself)."""

    scope: KeyScope
    tenant: str


class Keys:
    """The server's keys, matched in constant time whichever of them a token equals."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [
            (secret.get_secret_value().encode(), Key(scope, f"{scope.value}-key-{i + 1}"))
            for scope, secrets in ((KeyScope.inference, settings.api_keys), (KeyScope.admin, settings.admin_keys))
            for i, secret in enumerate(secrets)
        ]
        self.inference_needs_key = bool(settings.api_keys)
        self.management_open = not settings.api_keys and not settings.admin_keys
        self.has_admin = bool(settings.admin_keys)

    def match(self, token: str) -> Key | None:
        # Compare against every key, so the time taken does not reveal which (or whether one) matched.
        found = None
        presented = token.encode()
        for secret, key in self._keys:
            if hmac.compare_digest(secret, presented):
                found = key
        return found


def bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def require_api_key(request: Request) -> None:
    """App-wide dependency with keys configured: every route but health (and docs) needs a
    key when TESSERA_API_KEYS is set; whatever key a request carries is recorded on it."""
    settings: Settings = request.app.state.settings
    keys: Keys = request.app.state.keys
    path = request.url.path
    if path.startswith(OPEN_PREFIXES) or (settings.docs_public and path.startswith(DOCS_PATHS)):
        return
    token = bearer_token(request)
    key = keys.match(token) if token else None
    if key is None and keys.inference_needs_key:
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")
    request.state.key = key


async def require_admin(request: Request) -> None:
    """Loading and unloading models: an admin key where any keys are configured; refused
    outright on a server with API keys but no admin keys, rather than open to every client."""
    keys: Keys = request.app.state.keys
    if keys.management_open:
        return
    if not keys.has_admin:
        raise Forbidden(
            "model management is off on this server: it has API keys (TESSERA_API_KEYS) but no admin keys; "
            "set TESSERA_ADMIN_KEYS to load and unload models over HTTP"
        )
    key: Key | None = getattr(request.state, "key", None)
    if key is None:
        raise Unauthorized("loading and unloading models needs an admin key; send 'Authorization: Bearer <key>'")
    if key.scope is not KeyScope.admin:
        raise Forbidden(
            "loading and unloading models needs an admin key (TESSERA_ADMIN_KEYS); this key is an inference key"
        )


def tenant_of(request: Request) -> str:
    """Whom a request counts against for fair batching and the rate limit: its key's tenant,
    or without keys the client's address."""
    key: Key | None = request.scope.get("state", {}).get("key")  # request.state.key, without an AttributeError
    if key is not None:
        return key.tenant
    client = request.scope.get("client")
    return f"client-{client[0]}" if client else "client"


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
