"""Server-side tenant/mask state without an engine: what happens when a worker refuses a bind, and when the
tenants file changes while serving. (Serving itself is tested against a real engine in test_serving_api.)"""

import asyncio
import hashlib
import os
import shutil
import signal

import pytest

from depn_serve.artifacts.mask import NeuronMask, pack_bits
from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.selectors import MaskPolicy
from depn_serve.serving.server.state import Refused
from depn_serve.serving.server.tenants import TenantsConfig
from tests.serving.server.conftest import Workers, at_step


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
    assert workers.bound["acme"][0] == state.unions["acme"].digest and state.unions["acme"].neurons == 2
    listing = {t.tenant: t for t in asyncio.run(state.listing()).tenants}
    assert listing["acme"].mask_version == version and listing["acme"].masked_neurons == 2
    assert [(m.id, m.version, m.neurons) for m in listing["acme"].masks] == [("acme-main", 1, 2)]
    assert listing["globex"].allow_unmasked and listing["globex"].masked_neurons == 0

    workers.fail = True
    with pytest.raises(Refused) as failed:
        asyncio.run(state.push("acme", "acme-main", mask(3)))
    assert failed.value.status == 500
    assert (tmp_path / "store" / "acme" / "acme-main.v1.safetensors").read_bytes() == first
    assert state.store.index.entry("acme", "acme-main").version == 1
    assert not (tmp_path / "store" / "acme" / "acme-main.v2.safetensors").exists()
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
    assert not list((tmp_path / "store").rglob("*.safetensors"))


def test_the_tenants_file_applies_whole_while_serving(world, monkeypatch):
    make_state, mask, tmp_path = world
    path = tmp_path / "tenants.yaml"
    state, workers = make_state(), Workers()
    asyncio.run(state.start(workers))
    asyncio.run(state.push("acme", "acme-main", mask(1)))
    asyncio.run(state.push("acme", "acme-extra", mask(2)))
    with pytest.raises(Refused):
        asyncio.run(state.authenticate("depn_unknown"))
    assert not state.is_admin("x" * 20) and state.is_admin("t" * 20)

    # A tenant added (allowed unmasked), globex no longer allowed, acme's file list edited after its pushes.
    config = TenantsConfig.load(path)
    key = config.add_tenant("initech", [], allow_unmasked=True)
    config.tenant("globex").allow_unmasked = False
    config.tenant("acme").masks = ["acme-extra"]
    config.save(path)
    assert asyncio.run(state.authenticate(key)).id == "initech"
    state.admit("initech")
    assert workers.bound["initech"] == (state.unions["initech"].digest, None)  # identity
    with pytest.raises(Refused) as refused:
        state.admit("globex")
    assert refused.value.status == 403
    assert state.unions["acme"].mask_ids == ("acme-extra",) and "acme" not in state.store.index.tenant_masks
    assert state.metrics.tenants_file_ok._value.get() == 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert state.metrics.tenants_file.labels(digest)._value.get() == 1  # which file version is in force
    config.tenant("globex").allow_unmasked = True  # flipped back: bound to the identity, not the zero row
    config.save(path)
    asyncio.run(state.authenticate(key))
    state.admit("globex")
    assert workers.bound["globex"] == (state.unions["globex"].digest, None)

    # A revocation saved with a typo: every tenant request is refused, the file is parsed once, not per request.
    parsed = []
    real_parse = TenantsConfig.parse
    monkeypatch.setattr(TenantsConfig, "parse", classmethod(lambda cls, *a: parsed.append(1) or real_parse(*a)))
    text = path.read_text()
    path.write_text(text.replace("initech", "initech", 1).replace("tenants:", "tenants: [", 1))
    for _ in range(5):
        with pytest.raises(Refused) as refused:
            asyncio.run(state.authenticate(key))
        assert refused.value.status == 503 and "initech" not in refused.value.message
    assert len(parsed) == 1 and state.metrics.tenants_file_ok._value.get() == 0
    config.tenants = [t for t in config.tenants if t.id != "initech"]  # the revocation, saved properly
    config.save(path)
    with pytest.raises(Refused) as refused:
        asyncio.run(state.authenticate(key))
    assert refused.value.status == 401 and state.metrics.tenants_file_ok._value.get() == 1
    with pytest.raises(Refused) as refused:
        state.admit("initech")  # a request admitted before the revocation may not start
    assert refused.value.status == 403 and "acme" not in refused.value.message

    # Workers that refuse the change: nothing applied (acme keeps both masks), requests refused until it applies.
    config.tenant("acme").masks = ["acme-main", "acme-extra"]
    config.save(path)
    workers.fail = True
    with pytest.raises(Refused) as refused:
        asyncio.run(state.authenticate(None))
    assert refused.value.status == 503 and state.unions["acme"].mask_ids == ("acme-extra",)


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
    assert not list((tmp_path / "store").rglob("*.safetensors"))
    assert state.metrics.unverified._value.get() == 0
    pushed = asyncio.run(state.push("acme", "acme-main", mask(1)))
    assert pushed.verification.startswith("verification passed")
    assert state.store.index.entry("acme", "acme-main").verification == "passed"

    # A certificate made for other bits does not load.
    other = NeuronMask.from_bytes(mask(2))
    forged = NeuronMask(other.manifest, NeuronMask.from_bytes(mask(3, certificate=None)).off).to_bytes()
    with pytest.raises(Refused) as refused:
        asyncio.run(state.push("acme", "acme-main", forged))
    assert "verification.mask_sha256" in refused.value.message


def test_a_mask_made_for_another_tenant_is_refused_unless_the_operator_opts_in(world):
    """globex's isolation mask keeps globex's records and forgets acme's: pushed for acme by a mistyped flag, it
    would serve acme exactly the leak the product exists to stop."""
    make_state, mask, tmp_path = world
    state, workers = make_state(), Workers()
    asyncio.run(state.start(workers))
    globex_isolation = mask(1, tenant="globex")
    assert NeuronMask.from_bytes(globex_isolation).manifest.made_for == "globex"
    with pytest.raises(Refused) as refused:
        asyncio.run(state.push("acme", "acme-main", globex_isolation))
    assert refused.value.status == 400 and "made for tenant 'globex'" in refused.value.message
    assert "'acme'" in refused.value.message and "--cross-tenant" in refused.value.message
    assert state.store.index.entry("acme", "acme-main") is None and "acme" not in workers.bound

    pushed = asyncio.run(state.push("acme", "acme-main", globex_isolation, cross_tenant=True))
    assert "made for tenant 'globex', served to 'acme' by the operator's choice" in pushed.verification
    (listed,) = {t.tenant: t for t in asyncio.run(state.listing()).tenants}["acme"].masks
    assert (listed.made_for, listed.cross_tenant) == ("globex", True) and state.admit("acme")
    restarted = make_state()  # the opt-in is recorded with the stored mask: a restart serves it too
    asyncio.run(restarted.start(Workers()))
    assert restarted.admit("acme")

    # A mask made for no tenant in particular (`depn aggregate` without --for) serves any tenant, and says so.
    anyone = mask(2, tenant="globex", policy=MaskPolicy(tenant="globex", forget=("tenant=initech",)))
    assert NeuronMask.from_bytes(anyone).manifest.made_for is None
    asyncio.run(state.push("acme", "acme-main", anyone))
    assert {t.tenant: t for t in asyncio.run(state.listing()).tenants}["acme"].masks[0].made_for is None

    # A foreign mask already in the store without the opt-in (written before the check) quarantines its tenant.
    state.store.put("acme", "acme-main", globex_isolation, NeuronMask.from_bytes(globex_isolation), [])
    stale = make_state()
    asyncio.run(stale.start(Workers()))
    assert "made for tenant 'globex'" in stale.unions["acme"].problem
    with pytest.raises(Refused) as refused:
        stale.admit("acme")
    assert refused.value.status == 503


def test_the_server_judges_certificates_by_its_own_criteria(world):
    """A certificate carries the criteria its maker chose: `--max-rate 1 --max-perplexity-increase 100` on a
    one-neuron mask passes by its own criteria, not by the server's."""
    make_state, mask, tmp_path = world
    state = make_state()
    asyncio.run(state.start(Workers()))
    lax = Criteria(max_rate=1, max_perplexity_increase=100)
    attempts = {
        "criteria weaker than required: max_rate 1 (> the required 0.01), max_perplexity_increase 100 (> the "
        "required 0.01)":
            mask(1, criteria=lax),
        "zero-leak attacks ['paraphrase', 'substitution'] not required":
            mask(1, criteria=Criteria(zero=("greedy", "context"))),
        "attacks never run: ['context', 'substitution']": mask(1, attacks=("greedy", "beam")),
        "policy forgets ['tenant=globex'], not every record of every tenant but 'acme'":
            mask(1, made_for="acme", policy=MaskPolicy(tenant="acme", forget=("tenant=globex",))),
    }
    for why, data in attempts.items():
        assert NeuronMask.from_bytes(data).manifest.verification.passed  # each passes by its own criteria
        with pytest.raises(Refused) as refused:
            asyncio.run(state.push("acme", "acme-main", data))
        assert refused.value.status == 400 and "falls short of this server's criteria" in refused.value.message
        assert why in refused.value.message, refused.value.message
    assert state.store.index.entry("acme", "acme-main") is None

    # The operator may require less (the tenants file, or the command line): then the lax certificate passes, and
    # the listing shows the criteria the server requires and those each mask was judged by.
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    config.criteria = Criteria(max_rate=1, max_perplexity_increase=100)
    config.save(tmp_path / "tenants.yaml")
    asyncio.run(state.push("acme", "acme-main", mask(1, criteria=lax)))
    listing = asyncio.run(state.listing())
    assert listing.criteria == config.criteria and listing.tenants[0].masks[0].criteria == lax
    strict = make_state(criteria={"max_rate": 0.01})  # the command line over the file: the stored mask falls short
    asyncio.run(strict.start(Workers()))
    assert "falls short of this server's criteria" in strict.unions["acme"].problem


def test_every_bind_decision_uses_the_current_tenants_file_and_store(world):
    """Two API server processes (two states) bind into the same workers. One applies an edit of the tenants file;
    the other, which has not seen the edit, must not bind the old file's masks when it follows the store; and a
    push through a process that missed another's push binds the union of both."""
    make_state, mask, tmp_path = world
    workers = Workers()  # one engine behind both processes
    a, b = make_state(), make_state()
    path = tmp_path / "tenants.yaml"

    def bits(*neurons: int) -> bytes:
        return NeuronMask.from_bytes(mask(*neurons)).to_bytes()

    async def run():
        await a.start(workers)
        await b.start(workers)
        await a.push("acme", "acme-main", mask(1))
        await a.push("acme", "acme-extra", mask(2))
        await b.sync_store()
        config = TenantsConfig.load(path)
        config.tenant("acme").masks = ["acme-extra"]
        config.save(path)
        await a.refresh_tenants()  # a request reached `a`: the file applies, acme follows it again
        new = workers.bound["acme"][0]
        assert a.unions["acme"].mask_ids == ("acme-extra",) and new == a.unions["acme"].digest
        await b.sync_store()  # `b` follows the store's change without having served a request since the edit
        assert workers.bound["acme"][0] == new and b.unions["acme"].digest == new

        await b.push("acme", "acme-third", mask(3))
        await a.push("acme", "acme-fourth", mask(4))  # `a` has not followed b's push yet
        assert a.unions["acme"].mask_ids == ("acme-extra", "acme-third", "acme-fourth")
        assert workers.bound["acme"][1] == pack_bits(a.unions["acme"].off).tobytes()
        assert a.unions["acme"].neurons == 3

    asyncio.run(run())


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

    # Without the opt-out, a server started on that store quarantines the tenant: refused, counted, explained.
    strict, workers = make_state(), Workers()
    asyncio.run(strict.start(workers))
    with pytest.raises(Refused) as refused:
        strict.admit("acme")
    assert refused.value.status == 503 and "failed its checks" in refused.value.message
    assert strict.admit("globex") and "acme" not in workers.bound and strict.metrics.quarantined._value.get() == 1
    listing = {t.tenant: t for t in asyncio.run(strict.listing()).tenants}
    assert "passing certificate" in listing["acme"].problem and listing["globex"].problem is None
    asyncio.run(strict.push("acme", "acme-main", mask(1)))  # a certified mask under the same id lifts it
    assert strict.admit("acme") and strict.metrics.quarantined._value.get() == 0
    assert strict.metrics.unverified._value.get() == 0


def test_an_empty_mask_is_not_a_mask(world):
    make_state, mask, tmp_path = world
    state, workers = make_state(), Workers()
    asyncio.run(state.start(workers))
    with pytest.raises(Refused) as refused:
        asyncio.run(state.push("acme", "acme-main", mask()))
    assert refused.value.status == 400 and "field 'neuron_count'" in refused.value.message
    assert state.store.index.entry("acme", "acme-main") is None

    # One already in the store (written before pushes were checked) leaves its tenant refused, not unmasked.
    state.store.put("acme", "acme-main", mask(), NeuronMask.from_bytes(mask()), ["acme-main"])
    restarted, fresh = make_state(), Workers()
    asyncio.run(restarted.start(fresh))
    with pytest.raises(Refused) as refused:
        restarted.admit("acme")
    assert refused.value.status == 403 and "may not run unmasked" in refused.value.message
    assert "acme" not in fresh.bound  # nothing bound: the worker would give a stray request the deny row


def test_scrapes_share_one_worker_call(world):
    make_state, _, _ = world
    state, workers = make_state(), Workers()
    asyncio.run(state.start(workers))

    async def flood():
        await asyncio.gather(*(state.worker_status(max_age=1.0) for _ in range(200)))

    asyncio.run(flood())
    assert workers.status_calls == 1
    asyncio.run(state.worker_status())  # the listing asks for a fresh status
    assert workers.status_calls == 2


def test_mask_ids_with_a_newline_are_refused(world):
    make_state, _, _ = world
    state = make_state()
    asyncio.run(state.start(Workers()))
    with pytest.raises(Refused) as refused:
        asyncio.run(state.push("acme", "acme-main\n", b""))
    assert refused.value.status == 400 and "mask id" in refused.value.message


def test_a_full_disk_leaves_store_workers_and_server_on_the_old_mask(world, monkeypatch):
    make_state, mask, tmp_path = world
    state, workers = make_state(), Workers()
    asyncio.run(state.start(workers))
    asyncio.run(state.push("acme", "acme-main", mask(1)))
    version, bound = state.admit("acme"), workers.bound["acme"]

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("depn_serve.serving.server.store.atomic_write_bytes", full)
    with pytest.raises(Refused) as refused:
        asyncio.run(state.push("acme", "acme-main", mask(2)))
    assert refused.value.status == 507 and "No space left on device" in refused.value.message
    assert state.admit("acme") == version and workers.bound["acme"][1] == bound[1]  # the old bits, bound again
    assert state.store.index.entry("acme", "acme-main").version == 1
    monkeypatch.setattr("depn_serve.serving.server.store.atomic_write_text", full)
    with pytest.raises(Refused) as refused:
        asyncio.run(state.drop("acme", "acme-main"))
    assert refused.value.status == 507 and state.admit("acme") == version
    restarted = make_state()
    asyncio.run(restarted.start(Workers()))
    assert restarted.unions["acme"].neurons == 1 and restarted.store.index.entry("acme", "acme-main").version == 1


def test_first_token_waits_are_reported():
    from prometheus_client import CollectorRegistry, generate_latest

    from depn_serve.serving.server.metrics import DepnMetrics

    registry = CollectorRegistry()
    metrics = DepnMetrics(registry)
    first, second, dropped = object(), object(), object()
    for request in (first, second, dropped):
        metrics.waiting(request)
    metrics._waiting[first] -= 3.0  # came 3 s ago
    metrics.started(first)
    metrics.started(dropped, first_token=False)  # cancelled before its first token: no wait to report
    metrics._waiting[second] -= 1.5
    text = generate_latest(registry).decode()
    current = float(next(line.split()[1] for line in text.splitlines()
                         if line.startswith("depn_first_token_wait_seconds ")))
    assert 1.5 <= current < 2.5 and 3.0 <= metrics.longest_wait < 4.0
    assert "depn_first_token_wait_max_seconds" in text


def test_a_server_killed_during_a_push_restarts_on_the_old_or_the_new_mask(world):
    """SIGKILL before each file-system step of a push, then a restart: the store, its checksums and what the
    workers are given agree, on the old mask or the new one, and a push that was answered is the one served."""
    from depn_serve.artifacts.mask import pack_bits

    make_state, mask, tmp_path = world
    first, second = mask(1), mask(2)
    packed = {name: pack_bits(NeuronMask.from_bytes(data).off).tobytes() for name, data in
              (("first", first), ("second", second))}
    state = make_state()
    asyncio.run(state.start(Workers()))
    asyncio.run(state.push("acme", "acme-main", first))
    shutil.copytree(tmp_path / "store", tmp_path / "baseline")
    for k in range(1, 100):
        shutil.rmtree(tmp_path / "store")
        shutil.copytree(tmp_path / "baseline", tmp_path / "store")
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                child = make_state()
                asyncio.run(child.start(Workers()))
                at_step(k, lambda: os.kill(os.getpid(), signal.SIGKILL))
                asyncio.run(child.push("acme", "acme-main", second))
                code = 7
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        restarted, workers = make_state(), Workers()
        asyncio.run(restarted.start(workers))
        served = workers.bound["acme"][1]
        assert served in packed.values(), k
        assert (served == packed["second"]) == (restarted.store.index.entry("acme", "acme-main").version == 2), k
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 7 and served == packed["second"]  # answered: served after a restart
            break
    assert k > 3
