"""Server-side tenant/mask state without an engine: what happens when a worker refuses a bind, and when the
tenants file changes while serving. (Serving itself is tested against a real engine in test_serving_api.)"""

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.serving.server.metrics import DepnMetrics
from depn_serve.serving.server.state import Refused, ServingState
from depn_serve.serving.server.store import MaskStore
from depn_serve.serving.server.tenants import TenantsConfig
from tests.helpers import certified


class Workers:
    """Records binds like the worker extension; can be told to fail."""

    def __init__(self):
        self.bound: dict[str, tuple[int, bytes | None]] = {}
        self.fail = False

    async def __call__(self, method: str, args: tuple) -> list:
        if method == "depn_bind":
            if self.fail:
                raise RuntimeError("worker is gone")
            tenant, version, packed = args
            self.bound[tenant] = (version, packed)
            return [None]
        return [{"slots": 4, "resident": {}, "loads": 0, "evictions": 0, "overflows": 0}]


@pytest.fixture
def world(tiny_model_dir, tmp_path):
    config = TenantsConfig()
    config.add_tenant("acme", ["acme-main"])
    config.add_tenant("globex", [], allow_unmasked=True)
    config.save(tmp_path / "tenants.yaml")
    shape = mlp_shape(read_config(tiny_model_dir))
    fp = model_fingerprint(tiny_model_dir)

    def mask(*neurons: int, certificate: str | None = "passed") -> bytes:
        off = torch.zeros(shape.num_layers, shape.intermediate_size, dtype=torch.bool)
        off[0, list(neurons)] = True
        made = NeuronMask.create("acme", fp, shape, off, MaskProvenance(method="test"))
        return (made if certificate is None else certified(made, certificate == "passed")).to_bytes()

    def state(allow_unverified: bool = False) -> ServingState:
        s = ServingState(tmp_path / "tenants.yaml", MaskStore(tmp_path / "store"), fp, shape, "t" * 20,
                         DepnMetrics(CollectorRegistry()), allow_unverified)
        s.prepare()
        return s

    return state, mask, tmp_path


def test_worker_failure_rolls_back_store_and_keeps_the_active_mask(world):
    make_state, mask, tmp_path = world
    state, workers = make_state(), Workers()
    asyncio.run(state.start(workers))
    with pytest.raises(Refused) as missing:
        state.admit("acme")
    assert missing.value.status == 403 and "not pushed" in missing.value.message

    first = mask(1, 2)
    pushed = asyncio.run(state.push("acme", "acme-main", first))
    assert (pushed.tenant, pushed.mask, pushed.version, pushed.neurons, pushed.tenant_neurons) == (
        "acme", "acme-main", 1, 2, 2)
    version = state.admit("acme")
    assert workers.bound["acme"][0] == version and state.unions["acme"].neurons == 2
    listing = {t.tenant: t for t in asyncio.run(state.listing()).tenants}
    assert listing["acme"].mask_version == version and listing["acme"].masked_neurons == 2
    assert [(m.id, m.version, m.neurons) for m in listing["acme"].masks] == [("acme-main", 1, 2)]
    assert listing["globex"].allow_unmasked and listing["globex"].masked_neurons == 0

    workers.fail = True
    with pytest.raises(Refused) as failed:
        asyncio.run(state.push("acme", "acme-main", mask(3)))
    assert failed.value.status == 500
    assert (tmp_path / "store" / "acme-main.safetensors").read_bytes() == first
    assert state.store.index.masks["acme-main"].version == 1
    assert state.admit("acme") == version and state.unions["acme"].neurons == 2

    # A restart restores what the store holds.
    restarted, fresh = make_state(), Workers()
    asyncio.run(restarted.start(fresh))
    assert restarted.unions["acme"].neurons == 2 and "acme" in fresh.bound


def test_rejected_push_changes_nothing(world):
    make_state, mask, tmp_path = world
    state = make_state()
    asyncio.run(state.start(Workers()))
    for data in (b"not safetensors", mask(1)[:-5]):
        with pytest.raises(Refused) as refused:
            asyncio.run(state.push("acme", "acme-main", data))
        assert refused.value.status == 400
    with pytest.raises(Refused) as unknown:
        asyncio.run(state.push("nobody", "x", mask(1)))
    assert unknown.value.status == 404
    assert not (tmp_path / "store" / "acme-main.safetensors").exists()


def test_keys_added_while_serving_are_picked_up(world):
    make_state, _, tmp_path = world
    state = make_state()
    with pytest.raises(Refused):
        state.authenticate("depn_unknown")
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    key = config.add_tenant("initech", [], allow_unmasked=True)
    config.save(tmp_path / "tenants.yaml")
    assert state.authenticate(key).id == "initech"
    assert not state.is_admin("x" * 20) and state.is_admin("t" * 20)


def test_the_gate_refuses_masks_without_a_passing_certificate(world):
    make_state, mask, tmp_path = world
    state = make_state()
    asyncio.run(state.start(Workers()))
    for certificate, found in ((None, "no certificate"), ("failed", "a failed certificate (greedy: 1 records leak)")):
        with pytest.raises(Refused) as refused:
            asyncio.run(state.push("acme", "acme-main", mask(1, certificate=certificate)))
        assert refused.value.status == 400
        assert "field 'verification': expected a passing certificate" in refused.value.message
        assert found in refused.value.message
    assert not (tmp_path / "store" / "acme-main.safetensors").exists()
    assert state.metrics.unverified._value.get() == 0
    pushed = asyncio.run(state.push("acme", "acme-main", mask(1)))
    assert pushed.verification.startswith("verification passed")
    assert state.store.index.masks["acme-main"].verification == "passed"

    # A certificate made for other bits does not load.
    other = NeuronMask.from_bytes(mask(2))
    forged = NeuronMask(other.manifest, NeuronMask.from_bytes(mask(3, certificate=None)).off).to_bytes()
    with pytest.raises(Refused) as refused:
        asyncio.run(state.push("acme", "acme-main", forged))
    assert "verification.mask_sha256" in refused.value.message


def test_allow_unverified_serves_and_counts_unverified_masks(world):
    make_state, mask, tmp_path = world
    state = make_state(allow_unverified=True)
    workers = Workers()
    asyncio.run(state.start(workers))
    pushed = asyncio.run(state.push("acme", "acme-main", mask(1, certificate=None)))
    assert pushed.verification.startswith("UNVERIFIED (no certificate)")
    assert state.admit("acme") and state.metrics.unverified._value.get() == 1
    listing = {t.tenant: t for t in asyncio.run(state.listing()).tenants}
    assert listing["acme"].masks[0].verification == "none"

    # Without the opt-out, a server does not start on a store that holds an unverified mask in use.
    with pytest.raises(Refused) as refused:
        make_state()
    assert refused.value.status == 409 and "passing certificate" in refused.value.message
    asyncio.run(state.push("acme", "acme-main", mask(1)))
    assert state.metrics.unverified._value.get() == 0
    make_state()  # the stored mask is certified now
