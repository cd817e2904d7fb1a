"""HTTP layer added to vLLM's OpenAI server: default-deny authentication, tenant limits and the admin routes.

Every HTTP and websocket connection passes through `AuthMiddleware` (pure ASGI, so streaming responses and context
variables work; only the server's own lifespan events pass untouched):
- `/health`, `/ping` and `/version` are open (probes) and say nothing of tenants: healthy or not;
- `/metrics` needs the metrics token (`--metrics-token-file`) or the admin token: it names tenants and masks;
- the inference routes in `TENANT_ROUTES` need a tenant key (or the anonymous tenant); the request is checked
  against the tenant's limits and admitted here, once, and `current_request` (tenant and mask version) is set for
  it, which the engine hook reads; no header or body field can set it. Admitted is admitted: the request runs
  with the mask it was admitted with (the workers keep it until the request ends), even if its tenant's mask is
  replaced or dropped meanwhile. `/v1/models` lists only the tenant's own LoRA adapters;
- a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`) to an inference route goes to vLLM's CORS
  middleware, which answers it without running the route;
- every other path and method (`/depn/...`, vLLM's own operator routes: `/collective_rpc`, `/sleep`, `/pause`,
  `/scale_elastic_ep`, stored Responses, ..., every websocket) needs the admin token; a tenant key gets 403 there.
An `Authorization` header that is not `Bearer <token>` is refused, never read as "no key".
"""

from __future__ import annotations

import json
from contextvars import ContextVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from depn_serve.serving.request import MaskRequest
from depn_serve.serving.server.api import (API_PREFIX, ApiError, DropResult, ErrorBody, HealthDetail, MaskListing,
                                           PushResult)
from depn_serve.serving.server.errors import Refused
from depn_serve.serving.server.state import ServingState

current_request: ContextVar[MaskRequest | None] = ContextVar("depn_current_request", default=None)

OPEN_PATHS = frozenset({"/health", "/ping", "/version"})
METRICS_PATH = "/metrics"
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
# Routes whose body says how much a request asks for (`n`, prompts), checked against the tenant's limits.
SIZED_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/generative_scoring"})
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


async def _send_error(send, exc: Refused) -> None:
    status = exc.status
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            429: "RateLimitError"}.get(status, "Error")
    body = ErrorBody(error=ApiError(message=exc.message, type=kind, code=status)).model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _rewriting(send, rewrite):
    """vLLM's 200 answer with its body replaced by `rewrite(body)` (held until its last part, for the new length); a
    compressed or failed answer passes unchanged."""
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
            body = rewrite(b"".join(parts))
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
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] not in ("http", "websocket"):
            return None  # no route answers other kinds: nothing to pass on
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        route = path.rstrip("/") or "/"
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        refuse = self._refuse_websocket if scope["type"] == "websocket" else self._refuse
        if method != "WEBSOCKET" and route in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if method == "OPTIONS" and route in TENANT_ROUTES and _header(scope, b"access-control-request-method"):
            return await self.app(scope, receive, send)  # a CORS preflight: vLLM's CORS middleware answers it
        try:
            token = _bearer(scope)
        except BadAuthorization as exc:
            return await refuse(receive, send, Refused(401, str(exc)))
        if route == METRICS_PATH and method != "WEBSOCKET":
            if not self.state.may_scrape(token):
                return await refuse(receive, send, Refused(401 if not token else 403, "/metrics needs the metrics "
                                                                                      "token or the admin token"))
            return await self._metrics(scope, receive, send)
        if method not in TENANT_ROUTES.get(route, ()):
            if self.state.is_admin(token):
                return await self.app(scope, receive, send)
            return await refuse(receive, send, Refused(401 if not token else 403, "this route needs the admin token"))
        try:
            tenant = await self.state.authenticate(token)
            version = self.state.admit(tenant.id)
        except Refused as exc:
            return await refuse(receive, send, exc)
        n, prompts = 1, 1
        if route in SIZED_ROUTES:
            body = await _read_body(receive)
            if body is None:
                return None  # the client went away
            n, prompts = _size(route, body)
            receive = _replaying(body, receive)
        if route == "/v1/models":
            send = _rewriting(send, lambda body: _own_models(body, set(tenant.lora_adapters)))
        try:
            with self.state.limiter.admitted(tenant.id, self.state.tenants.limits_of(tenant), n, prompts):
                reset = current_request.set(MaskRequest(tenant.id, version, self.state.unions[tenant.id].digest))
                try:
                    await self.app(scope, receive, send)
                finally:
                    current_request.reset(reset)
        except Refused as exc:
            return await refuse(receive, send, exc)

    async def _metrics(self, scope, receive, send) -> None:
        try:
            await self.state.worker_status(max_age=METRICS_MAX_AGE)
        except Exception:  # a scrape must not fail because a worker is busy restarting
            pass
        if extra := self.state.metrics.appended():
            send = _rewriting(send, lambda body: body + extra)
        await self.app(scope, receive, send)

    async def _refuse(self, receive, send, exc: Refused) -> None:
        self.state.metrics.refused.labels(str(exc.status)).inc()
        await _send_error(send, exc)

    async def _refuse_websocket(self, receive, send, exc: Refused) -> None:
        """Close the connection before it is accepted (the client sees 403), with the reason."""
        self.state.metrics.refused.labels(str(exc.status)).inc()
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})


def _header(scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope.get("headers", []) if key == name), None)


async def _read_body(receive) -> bytes | None:
    """The whole request body (None if the client disconnected first)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


def _replaying(body: bytes, receive):
    """`receive` for the app: the body read already, then the connection's own messages (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _size(route: str, body: bytes) -> tuple[int, int]:
    """(completions per prompt, prompts) a request body asks for; (1, 1) where the body is not what vLLM takes (vLLM
    answers that with 400 itself)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        return 1, 1
    if not isinstance(doc, dict):
        return 1, 1
    n = max((v for v in (doc.get("n"), doc.get("best_of")) if isinstance(v, int) and not isinstance(v, bool)),
            default=1)
    many = doc.get("prompt") if route == "/v1/completions" else doc.get("items")
    if route == "/v1/chat/completions" or not isinstance(many, list) or not many:
        return n, 1
    flat_tokens = route == "/v1/completions" and all(isinstance(v, int) for v in many)  # one prompt as token ids
    return n, 1 if flat_tokens else len(many)


def _own_models(body: bytes, adapters: set[str]) -> bytes:
    """vLLM's model list without the LoRA adapters of other tenants (an adapter is a model with a parent)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body  # not vLLM's list (it is JSON): nothing in it to filter
    if not isinstance(doc, dict):
        return body
    doc["data"] = [m for m in doc.get("data", []) if m.get("parent") is None or m.get("id") in adapters]
    return json.dumps(doc).encode()


def admin_router(state: ServingState) -> APIRouter:
    router = APIRouter(prefix=API_PREFIX)

    def error(exc: Refused) -> JSONResponse:
        body = ErrorBody(error=ApiError(message=exc.message, code=exc.status))
        return JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status)

    refusals = {status: {"model": ErrorBody, "description": why} for status, why in (
        (400, "the mask or its id is invalid, it is made for another tenant, or its certificate does not pass the "
              "server's criteria"), (401, "no admin token"),
        (403, "not the admin token"), (404, "no such tenant or mask"),
        (409, "another of the tenant's stored masks fails its checks"), (500, "the workers refused the mask"),
        (503, "the tenants file cannot be applied"),
        (507, "the mask store is full"))}
    mask_body = {"requestBody": {"required": True, "description": "the mask file's bytes (`.safetensors`)",
                                 "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                     "format": "binary"}}}}}

    @router.get("/masks", response_model=MaskListing, responses={k: refusals[k] for k in (401, 403)})
    async def list_masks():
        return await state.listing()

    @router.get("/health", response_model=HealthDetail, responses={k: refusals[k] for k in (401, 403)})
    async def health_detail():
        return state.health_detail()

    @router.put("/tenants/{tenant}/masks/{mask_id}", response_model=PushResult, responses=refusals,
                openapi_extra=mask_body)
    async def push_mask(tenant: str, mask_id: str, request: Request, cross_tenant: bool = False):
        """`cross_tenant`: serve the tenant this mask even though it is made for another tenant (recorded)."""
        try:
            return await state.push(tenant, mask_id, await request.body(), cross_tenant)
        except Refused as exc:
            return error(exc)

    @router.delete("/tenants/{tenant}/masks/{mask_id}", response_model=DropResult, responses=refusals)
    async def drop_mask(tenant: str, mask_id: str):
        try:
            return await state.drop(tenant, mask_id)
        except Refused as exc:
            return error(exc)

    return router
