"""HTTP layer added to vLLM's OpenAI server: default-deny authentication and the admin routes.

Every request passes through `AuthMiddleware` (pure ASGI, so streaming responses and context variables work):
- `/health`, `/ping`, `/version` and `/metrics` are open (probes and Prometheus);
- the inference routes in `TENANT_ROUTES` need a tenant key (or the anonymous tenant); the request is admitted
  here, once, and `current_request` (tenant and mask version) is set for it, which the engine hook reads; no
  header or body field can set it. Admitted is admitted: a mask dropped while the request waits for the engine
  does not turn it into an error halfway through a stream (it runs with the mask its tenant still has bound);
- every other path (`/depn/...` and vLLM's own operator routes: `/collective_rpc`, `/sleep`, `/pause`,
  `/scale_elastic_ep`, stored Responses, ...) needs the admin token; a tenant key gets 403 there.
An `Authorization` header that is not `Bearer <token>` is refused, never read as "no key".
"""

from __future__ import annotations

import json
from contextvars import ContextVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from depn_serve.serving.request import MaskRequest
from depn_serve.serving.server.api import API_PREFIX, ApiError, DropResult, ErrorBody, MaskListing, PushResult
from depn_serve.serving.server.state import Refused, ServingState

current_request: ContextVar[MaskRequest | None] = ContextVar("depn_current_request", default=None)

OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})
# What a tenant key may reach: generation under its mask, and the model list and tokenizer it needs for that.
# Stored Responses (`/v1/responses`) are not scoped to a tenant by vLLM, so they stay admin-only.
TENANT_ROUTES: dict[str, frozenset[str]] = {
    "/v1/completions": frozenset({"POST"}),
    "/v1/chat/completions": frozenset({"POST"}),
    "/generative_scoring": frozenset({"POST"}),
    "/v1/models": frozenset({"GET"}),
    "/tokenize": frozenset({"POST"}),
    "/detokenize": frozenset({"POST"}),
}
METRICS_MAX_AGE = 1.0  # seconds a scrape may reuse the workers' status: at most one engine call per second


class BadAuthorization(ValueError):
    pass


def _bearer(scope) -> str | None:
    """The bearer token, None if there is no `Authorization` header; any other scheme is an error."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise BadAuthorization("Authorization: expected 'Bearer <key>'")
            return token.strip()
    return None


async def _send_error(send, status: int, message: str) -> None:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError"}.get(status, "Error")
    body = ErrorBody(error=ApiError(message=message, type=kind, code=status)).model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _with_body(send, body: bytes):
    """vLLM's answer with `body` (JSON) in place of its empty one: `/health` stays 200 while some tenants are not
    served as the store says (the others are), and says which."""
    replacing = False

    async def wrapped(message) -> None:
        nonlocal replacing
        if message["type"] == "http.response.start" and message["status"] == 200:
            replacing = True
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in (b"content-length",
                                                                                          b"content-type")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and replacing:
            if message.get("more_body"):
                return
            message = {"type": "http.response.body", "body": body}
        await send(message)

    return wrapped


def _appending(send, extra: bytes):
    """vLLM's 200 answer with `extra` after its body (held until its last part, for the new length); a compressed
    or failed answer passes unchanged."""
    start: dict | None = None
    parts: list[bytes] = []

    async def wrapped(message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if message["status"] == 200 and b"content-encoding" not in {k.lower() for k in headers}:
                start = message
                return
        elif message["type"] == "http.response.body" and start is not None:
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(parts) + extra
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            message = {"type": "http.response.body", "body": body}
        await send(message)

    return wrapped


class AuthMiddleware:
    def __init__(self, app, state: ServingState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path.rstrip("/") or "/"
        if route in OPEN_PATHS or scope["method"] == "OPTIONS":
            if route == "/health" and (detail := self.state.health_detail()) is not None:
                return await self.app(scope, receive, _with_body(send, json.dumps(detail).encode()))
            if route == "/metrics":
                try:
                    await self.state.worker_status(max_age=METRICS_MAX_AGE)
                except Exception:  # a scrape must not fail because a worker is busy restarting
                    pass
                if extra := self.state.metrics.appended():
                    return await self.app(scope, receive, _appending(send, extra))
            return await self.app(scope, receive, send)
        try:
            token = _bearer(scope)
        except BadAuthorization as exc:
            return await self._refuse(send, Refused(401, str(exc)))
        if scope["method"] not in TENANT_ROUTES.get(route, ()):
            if self.state.is_admin(token):
                return await self.app(scope, receive, send)
            return await self._refuse(send, Refused(401 if not token else 403, "this route needs the admin token"))
        try:
            tenant = await self.state.authenticate(token)
            version = self.state.admit(tenant.id)
        except Refused as exc:
            return await self._refuse(send, exc)
        reset = current_request.set(MaskRequest(tenant.id, version, self.state.unions[tenant.id].digest))
        try:
            await self.app(scope, receive, send)
        finally:
            current_request.reset(reset)

    async def _refuse(self, send, exc: Refused) -> None:
        self.state.metrics.refused.labels(str(exc.status)).inc()
        await _send_error(send, exc.status, exc.message)


def admin_router(state: ServingState) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)

    def error(exc: Refused) -> JSONResponse:
        body = ErrorBody(error=ApiError(message=exc.message, code=exc.status))
        return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status)

    refusals = {status: {"model": ErrorBody, "description": why} for status, why in (
        (400, "the mask or its id is invalid, or its certificate does not pass"), (401, "no admin token"),
        (403, "not the admin token"), (404, "no such tenant or mask"),
        (409, "another of the tenant's stored masks fails its checks"), (500, "the workers refused the mask"),
        (507, "the mask store is full"))}
    mask_body = {"requestBody": {"required": True, "description": "the mask file's bytes (`.safetensors`)",
                                 "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}}

    @router.get("/masks", response_model=MaskListing, responses={k: refusals[k] for k in (401, 403)})
    async def list_masks():
        return await state.listing()

    @router.put("/tenants/{tenant}/masks/{mask_id}", response_model=PushResult, responses=refusals,
                openapi_extra=mask_body)
    async def push_mask(tenant: str, mask_id: str, request: Request):
        try:
            return await state.push(tenant, mask_id, await request.body())
        except Refused as exc:
            return error(exc)

    @router.delete("/tenants/{tenant}/masks/{mask_id}", response_model=DropResult, responses=refusals)
    async def drop_mask(tenant: str, mask_id: str):
        try:
            return await state.drop(tenant, mask_id)
        except Refused as exc:
            return error(exc)

    return router
