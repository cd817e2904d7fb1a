"""The auth layer on its own (a plain ASGI app behind it, no engine): which credentials reach which routes, in
which scope types, and the tenant limits. That vLLM's real routes sit behind it is checked against a running
server in test_api."""

import asyncio
import json

import httpx
import pytest

from depn_serve.serving.server.http import TENANT_ROUTES, AuthMiddleware, current_request
from depn_serve.serving.server.tenants import Limits, TenantsConfig
from tests.serving.server.conftest import ADMIN_TOKEN, Workers

OPERATOR_ROUTES = [("POST", "/collective_rpc"), ("POST", "/update_weights"), ("POST", "/sleep"), ("POST", "/pause"),
                   ("POST", "/reset_prefix_cache"), ("POST", "/scale_elastic_ep"), ("POST", "/abort_requests"),
                   ("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses"), ("POST", "/v1/load_lora_adapter"),
                   ("GET", "/depn/v1/masks"), ("GET", "/depn/v1/health"), ("GET", "/server_info"),
                   ("DELETE", "/v1/completions"), ("OPTIONS", "/v1/completions"), ("OPTIONS", "/collective_rpc"),
                   ("OPTIONS", "/depn/v1/masks")]
METRICS_TOKEN = "m" * 24


def _reached(scope_log, body: bytes = b"ok"):
    async def app(scope, receive, send):
        request = current_request.get()
        scope_log.append((scope.get("path", scope["type"]), request and request.tenant))
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            return
        scope_log.append(await receive())  # what the app reads of the body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
    return app


@pytest.fixture
def call(world):
    make_state, _, tmp_path = world
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    keys = {"public": config.add_tenant("public", [], allow_unmasked=True)}
    config.anonymous_tenant = "public"
    config.save(tmp_path / "tenants.yaml")
    state = make_state(metrics_token=METRICS_TOKEN)
    workers = Workers()
    asyncio.run(state.start(workers))
    reached: list = []
    app = AuthMiddleware(_reached(reached), state)

    def request(method: str, path: str, authorization: str | None = None, **kwargs) -> tuple[int, str, str | None]:
        async def go():
            headers = {"Authorization": authorization} if authorization else {}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return await client.request(method, path, headers={**headers, **kwargs.pop("headers", {})},
                                            **kwargs)
        before = len(reached)
        response = asyncio.run(go())
        tenant = reached[before][1] if len(reached) > before else None
        return response.status_code, response.text, tenant

    request.reached = reached
    request.app = app
    return request, keys, state, workers


def test_tenant_keys_reach_inference_routes_only(call):
    request, keys, _, _ = call
    tenant = f"Bearer {keys['public']}"
    for path, methods in TENANT_ROUTES.items():
        for method in methods:
            assert request(method, path, tenant)[::2] == (200, "public")
            assert request(method, path)[::2] == (200, "public")  # no key: the anonymous tenant
    for method, path in OPERATOR_ROUTES:
        status, text, _ = request(method, path, tenant)
        assert status == 403 and "admin token" in text, (method, path)
        assert request(method, path)[0] == 401, (method, path)
        assert request(method, path, f"Bearer {ADMIN_TOKEN}")[::2] == (200, None), (method, path)
    assert request("POST", "/v1/completions", f"Bearer {ADMIN_TOKEN}")[0] == 401  # the admin is not a tenant


def test_an_authorization_that_is_not_bearer_is_refused(call):
    request, keys, state, _ = call
    for header in (f"Basic {keys['public']}", "Bearer", "Bearer ", keys["public"], "Token abc"):
        status, text, tenant = request("POST", "/v1/completions", header)
        assert (status, tenant) == (401, None) and "expected 'Bearer <key>'" in text, header
    assert state.metrics.refused.labels("401")._value.get() == 5


def test_metrics_need_the_metrics_or_admin_token_and_scrapes_share_the_workers_status(call):
    request, keys, _, workers = call
    assert request("GET", "/metrics")[0] == 401
    assert request("GET", "/metrics", f"Bearer {keys['public']}")[0] == 403  # a tenant key is no metrics token
    for _ in range(10):
        assert request("GET", "/metrics", f"Bearer {METRICS_TOKEN}")[0] == 200
        assert request("GET", "/metrics", f"Bearer {ADMIN_TOKEN}")[0] == 200
    assert workers.status_calls == 1


def test_health_tells_strangers_nothing_and_the_admin_which_tenants_are_not_served(call):
    request, _, state, _ = call
    state.behind["acme"] = "pushed mask 'acme-main' has no certificate"
    state.unions["globex"] = state.unions["globex"].__class__(99, (), None, problem="stored mask fails its checks")
    for path in ("/health", "/ping"):
        assert request("GET", path)[:2] == (200, "ok")  # the engine's own answer, untouched
    status, text, _ = request("GET", "/depn/v1/health", f"Bearer {ADMIN_TOKEN}")  # the admin route itself
    assert status == 200  # (the plain app answers it here; the real route is tested against a server)
    detail = state.health_detail()
    assert detail.status == "degraded" and detail.tenants_behind_store == state.behind
    assert detail.tenants_quarantined == {"globex": "stored mask fails its checks"}


def test_cors_preflight_reaches_cors_only_on_inference_routes(call):
    request, keys, _, _ = call
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert request("OPTIONS", "/v1/completions", headers=preflight)[::2] == (200, None)
    assert request("OPTIONS", "/collective_rpc", headers=preflight)[0] == 401
    assert request("OPTIONS", "/v1/completions")[0] == 401  # not a preflight: no route takes OPTIONS from anyone


def test_websockets_are_authenticated_like_any_route(call):
    request, keys, state, _ = call

    def connect(authorization: str | None) -> list[dict]:
        sent: list[dict] = []
        headers = [(b"authorization", authorization.encode())] if authorization else []
        scope = {"type": "websocket", "path": "/v1/realtime", "headers": headers}
        messages = iter([{"type": "websocket.connect"}])

        async def receive():
            return next(messages)

        async def send(message):
            sent.append(message)

        asyncio.run(request.app(scope, receive, send))
        return sent

    assert connect(None) == [{"type": "websocket.close", "code": 1008, "reason": "this route needs the admin token"}]
    assert connect(f"Bearer {keys['public']}")[0]["type"] == "websocket.close"
    assert connect(f"Bearer {ADMIN_TOKEN}") == [{"type": "websocket.accept"}]
    assert state.metrics.refused.labels("403")._value.get() == 1

    asyncio.run(request.app({"type": "lifespan"}, None, None))  # the server's own start-up events pass untouched
    assert request.reached[-1] == ("lifespan", None)


def _limits(state, tmp_path, **limits) -> None:
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    config.limits = Limits(**limits)
    config.save(tmp_path / "tenants.yaml")


def test_tenant_limits_answer_429_before_the_engine(call, world):
    request, keys, state, _ = call
    _, _, tmp_path = world
    _limits(state, tmp_path, max_n=4, max_prompts=3, max_in_flight=2, tokens_per_minute=100)
    key = f"Bearer {keys['public']}"
    ok = {"model": "m", "prompt": ["a", "b", "c"], "n": 4}
    assert request("POST", "/v1/completions", key, json=ok)[::2] == (200, "public")
    assert json.loads(request.reached[-1]["body"]) == ok  # the body read for the check reaches vLLM whole
    assert request("POST", "/v1/completions", key, json=[[1, 2, 3, 4, 5]])[0] == 200  # not vLLM's shape: vLLM says
    assert request("POST", "/v1/chat/completions", key, content=b"[" * 100_000)[0] == 200  # nested past the stack
    for body, limit in (({"prompt": ["a"] * 4}, "prompts"), ({"prompt": "a", "n": 5}, "n"),
                        ({"prompt": "a", "best_of": 9}, "n"), ({"items": [[1]] * 4}, "prompts")):
        route = "/generative_scoring" if "items" in body else "/v1/completions"
        status, text, tenant = request("POST", route, key, json=body)
        assert (status, tenant) == (429, None) and "rate limited" in text, (body, text)
        assert state.metrics.limited.labels(limit)._value.get() >= 1
    assert request("POST", "/v1/completions", key, json={"prompt": list(range(500))})[0] == 200  # one prompt of ids
    assert request("POST", "/v1/chat/completions", key, json={"messages": [{"role": "user"}] * 9})[0] == 200

    with state.limiter.admitted("public", state.tenants.limits_of(state.tenants.tenant("public"))):
        with state.limiter.admitted("public", state.tenants.limits_of(state.tenants.tenant("public"))):
            status, text, _ = request("POST", "/v1/completions", key, json={"prompt": "a"})
            assert status == 429 and "in flight" in text
    assert request("POST", "/v1/completions", key, json={"prompt": "a"})[0] == 200  # both places freed

    state.limiter.charge("public", 100)
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=request.app), base_url="http://t") as client:
            return await client.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": key})
    response = asyncio.run(go())
    assert response.status_code == 429 and 1 <= int(response.headers["retry-after"]) <= 60
    assert state.metrics.refused.labels("429")._value.get() == 6


def test_a_tenant_sees_only_its_own_lora_adapters(world):
    make_state, _, tmp_path = world
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    key = config.new_key("globex")
    config.tenant("globex").lora_adapters = ["globex-style"]
    config.tenant("acme").lora_adapters = ["acme-style"]
    config.save(tmp_path / "tenants.yaml")
    state = make_state()
    asyncio.run(state.start(Workers()))
    models = {"object": "list", "data": [{"id": "base", "parent": None}, {"id": "acme-style", "parent": "base"},
                                         {"id": "globex-style", "parent": "base"}]}
    app = AuthMiddleware(_reached([], json.dumps(models).encode()), state)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    response = asyncio.run(go())
    assert [m["id"] for m in response.json()["data"]] == ["base", "globex-style"]
    assert int(response.headers["content-length"]) == len(response.content)
