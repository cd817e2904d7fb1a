"""The auth layer on its own (a plain ASGI app behind it, no engine): which credentials reach which routes.
That vLLM's real routes sit behind it is checked against a running server in test_api."""

import asyncio
import json

import httpx
import pytest

from depn_serve.serving.server.http import TENANT_ROUTES, AuthMiddleware, current_request
from depn_serve.serving.server.tenants import TenantsConfig
from tests.serving.server.conftest import ADMIN_TOKEN, Workers

OPERATOR_ROUTES = [("POST", "/collective_rpc"), ("POST", "/update_weights"), ("POST", "/sleep"), ("POST", "/pause"),
                   ("POST", "/reset_prefix_cache"), ("POST", "/scale_elastic_ep"), ("POST", "/abort_requests"),
                   ("GET", "/v1/responses/resp_1"), ("POST", "/v1/responses"), ("POST", "/v1/load_lora_adapter"),
                   ("GET", "/depn/v1/masks"), ("GET", "/server_info"), ("DELETE", "/v1/completions")]


def _reached(scope_log):
    async def app(scope, receive, send):
        request = current_request.get()
        scope_log.append((scope["path"], request and request.tenant))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


@pytest.fixture
def call(world):
    make_state, _, tmp_path = world
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    keys = {"public": config.add_tenant("public", [], allow_unmasked=True)}
    config.anonymous_tenant = "public"
    config.save(tmp_path / "tenants.yaml")
    state = make_state()
    workers = Workers()
    asyncio.run(state.start(workers))
    reached: list = []
    app = AuthMiddleware(_reached(reached), state)

    def request(method: str, path: str, authorization: str | None = None) -> tuple[int, str, str | None]:
        async def go():
            headers = {"Authorization": authorization} if authorization else {}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return await client.request(method, path, headers=headers)
        before = len(reached)
        response = asyncio.run(go())
        tenant = reached[-1][1] if len(reached) > before else None
        return response.status_code, response.text, tenant

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


def test_metrics_scrapes_are_open_and_share_the_workers_status(call):
    request, _, _, workers = call
    for _ in range(20):
        assert request("GET", "/metrics")[0] == 200
    assert workers.status_calls == 1


def test_health_names_the_tenants_not_served_as_the_store_says(call):
    request, _, state, _ = call
    assert request("GET", "/health")[:2] == (200, "ok")  # all is well: the engine's own answer, untouched
    state.behind["acme"] = "pushed mask 'acme-main' has no certificate"
    status, text, _ = request("GET", "/health")
    assert status == 200 and json.loads(text)["tenants_behind_store"] == state.behind
    assert json.loads(text)["status"] == "degraded"
