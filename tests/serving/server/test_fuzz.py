"""Hostile input against the server's control plane, generated with hypothesis: mask bytes, mask ids, tenants
files, and HTTP methods, paths and `Authorization` headers through the auth layer. Every case ends in a refusal
with a reason (4xx, or 503 for a tenants file that cannot be applied) or a success, never an unexpected exception,
and never changes what an admitted tenant runs with unless it succeeded."""

import asyncio
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depn_serve.serving.server.http import TENANT_ROUTES, AuthMiddleware, current_request
from depn_serve.serving.server.state import Refused
from depn_serve.serving.server.tenants import TenantsConfig
from tests.serving.server.conftest import ADMIN_TOKEN, Workers

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
STALL_BOUND = 0.5  # seconds one request may hold the event loop in the auth layer (generous for a loaded CI box)


@pytest.fixture
def served(world):
    make_state, mask, tmp_path = world
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    key = config.add_tenant("fuzz", [], allow_unmasked=True)
    config.save(tmp_path / "tenants.yaml")
    state, workers = make_state(), Workers()
    asyncio.run(state.start(workers))
    asyncio.run(state.push("acme", "acme-main", mask(1)))
    return state, workers, mask, tmp_path, key


@FUZZ
@given(data=st.data())
def test_pushed_bytes_are_refused_with_a_reason_or_accepted(served, data):
    state, workers, mask, _, _ = served
    valid = mask(2)
    body = data.draw(st.one_of(
        st.binary(max_size=2048),
        st.builds(lambda cut: valid[:cut], st.integers(0, len(valid))),
        st.builds(lambda at, byte: valid[:at] + bytes([byte]) + valid[at + 1:], st.integers(0, len(valid) - 1),
                  st.integers(0, 255)),
    ))
    version, bound = state.admit("acme"), workers.bound["acme"]
    try:
        result = asyncio.run(state.push("acme", "acme-main", body))
    except Refused as exc:
        assert 400 <= exc.status < 500 and exc.message
        assert state.admit("acme") == version and workers.bound["acme"] == bound
    else:
        assert result.neurons >= 1 and state.admit("acme") != version


@FUZZ
@given(mask_id=st.text(max_size=80))
def test_mask_ids_are_checked(served, mask_id):
    state, _, mask, tmp_path, _ = served
    try:
        asyncio.run(state.push("acme", mask_id, mask(3)))
    except Refused as exc:
        assert exc.status == 400 and "mask id" in exc.message
    else:
        stored = list((tmp_path / "store" / "acme").glob("*.safetensors"))
        assert all(p.parent == tmp_path / "store" / "acme" for p in stored)
        assert (tmp_path / "store" / "acme" / f"{mask_id}.v1.safetensors") in stored


yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=12)


@FUZZ
@given(doc=st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["version", "anonymous_tenant", "tenants", "extra"]), yaml_values, max_size=4),
    st.builds(lambda tenants: {"tenants": tenants}, st.lists(st.dictionaries(
        st.sampled_from(["id", "masks", "allow_unmasked", "api_keys"]), yaml_values, max_size=4), max_size=3)),
))
def test_any_tenants_file_applies_whole_or_refuses(served, doc):
    import yaml

    state, _, _, tmp_path, key = served
    path = tmp_path / "tenants.yaml"
    original = path.read_bytes()
    path.write_bytes(doc if isinstance(doc, bytes) else yaml.safe_dump(doc).encode())
    try:
        asyncio.run(state.authenticate(None))
    except Refused as exc:
        assert exc.status in (401, 403, 503) and exc.message
    if state._tenants_problem is None:  # applied: the server's view is the file's
        assert [t.id for t in state.tenants.tenants] == [t.id for t in TenantsConfig.load(path).tenants]
    path.write_bytes(original)
    assert asyncio.run(state.authenticate(key)).id == "fuzz" and state._tenants_problem is None  # applies again


def _app(log: list):
    async def app(scope, receive, send):
        request = current_request.get()
        log.append(request and request.tenant)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


PATHS = st.one_of(st.sampled_from([*TENANT_ROUTES, "/depn/v1/masks", "/collective_rpc", "/metrics", "/health",
                                   "/v1/responses", "/"]),
                  st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"),
                          max_size=40).map(
                      lambda p: "/" + p.lstrip("/")))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"]), path=PATHS,
       authorization=st.one_of(st.none(), st.text(max_size=60), st.sampled_from(["admin", "tenant"])))
def test_requests_reach_the_app_only_with_the_right_credentials(served, method, path, authorization):
    state, _, _, _, key = served
    authorization = {"admin": f"Bearer {ADMIN_TOKEN}", "tenant": f"Bearer {key}"}.get(authorization, authorization)
    log: list = []
    app = AuthMiddleware(_app(log), state)
    headers = {}
    if authorization is not None:
        try:
            headers["Authorization"] = authorization.encode("latin-1")
        except UnicodeEncodeError:
            return  # not sendable as an HTTP header

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            started = time.perf_counter()
            response = await client.request(method, path, headers=headers)
            return response, time.perf_counter() - started

    try:
        response, seconds = asyncio.run(go())
    except httpx.InvalidURL:
        return
    assert seconds < STALL_BOUND
    route = path.rstrip("/") or "/"
    if response.status_code == 200 and log:
        open_route = route in {"/metrics", "/health", "/ping", "/version"} or method == "OPTIONS"
        tenant_route = method in TENANT_ROUTES.get(route, ())
        assert open_route or authorization == f"Bearer {ADMIN_TOKEN}" or (tenant_route and log[-1] == "fuzz")
        assert log[-1] is None or tenant_route
    else:
        assert response.status_code in (401, 403, 503) and (method == "HEAD" or "error" in response.json())
