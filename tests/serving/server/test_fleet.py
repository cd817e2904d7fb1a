"""A fleet: servers sharing one mask store converge on the same masks. Two server states (workers stubbed) on one
store, writers in several processes, a stored mask one server cannot apply; then two real `depn serve` on
loopback."""

import asyncio
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from click.testing import CliRunner

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
from depn_serve.cli import main
from depn_serve.core.arch import load_model, mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records
from depn_serve.editing import masked
from depn_serve.serving.process import ServerProcess
from depn_serve.serving.server.fleet import fleet_status, push_to_store
from depn_serve.serving.server.state import Refused
from depn_serve.serving.server.store import MaskStore
from depn_serve.serving.server.tenants import TenantsConfig
from tests.serving.server.conftest import Workers


def test_a_change_through_one_server_is_applied_by_the_others(world):
    make_state, mask, tmp_path = world
    a, b, wa, wb = make_state(), make_state(), Workers(), Workers()

    async def run():
        await a.start(wa)
        await b.start(wb)
        await a.push("acme", "acme-main", mask(1, 2))
        assert "acme" not in wb.bound  # b has not looked at the store yet
        await b.sync_store()
        assert wb.bound["acme"][1] == wa.bound["acme"][1] and b.unions["acme"].neurons == 2
        b.admit("acme")
        assert fleet_status({"a": await a.listing(), "b": await b.listing()}).converged
        await b.drop("acme", "acme-main")
        assert not fleet_status({"a": await a.listing(), "b": await b.listing()}).converged
        await a.sync_store()
        with pytest.raises(Refused):
            a.admit("acme")
        status = fleet_status({"a": await a.listing(), "b": await b.listing()})
        assert status.converged and status.generations[0] == a.store.index.generation == 2

    asyncio.run(run())


def test_writers_in_several_processes_lose_no_change(world):
    """Two processes push to one store at once, each for its own tenant: every change is in the index (each writer
    re-reads it under the store's lock), and the generation counts them all."""
    _, mask, tmp_path = world
    store = tmp_path / "store"
    MaskStore(store)
    data = mask(3)
    children = []
    for tenant in ("acme", "globex"):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for _ in range(15):
                    MaskStore(store).put(tenant, "m", data, NeuronMask.from_bytes(data), [])
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
    index = MaskStore(store).index
    assert index.entry("acme", "m").version == index.entry("globex", "m").version == 15
    assert index.generation == 30
    assert sorted(p.name for p in (store / "acme").iterdir()) == ["m.v15.safetensors"]


def test_a_stored_mask_a_server_cannot_apply_leaves_the_previous_one_for_a_while(world):
    """Written straight into the store, a mask without a certificate: the server keeps serving the tenant's previous
    mask, says so in the admin's health detail, the listing and the metric; past `max_behind_s` it refuses the
    tenant (503) rather than serve a mask weaker than the store's; it applies the store once it is fixed."""
    make_state, mask, tmp_path = world
    state, workers = make_state(max_behind_s=0.3), Workers()
    tenants, store = tmp_path / "tenants.yaml", tmp_path / "store"

    async def run():
        await state.start(workers)
        await state.push("acme", "acme-main", mask(1, 2))
        before = workers.bound["acme"]
        push_to_store(store, tenants, "acme", "acme-main", mask(4, certificate=None))
        await state.sync_store()
        assert workers.bound["acme"] == before and state.unions["acme"].digest == before[0]
        assert "certificate" in state.behind["acme"] and state.metrics.behind._value.get() == 1
        assert state.health_detail().tenants_behind_store == state.behind
        listing = {t.tenant: t for t in (await state.listing()).tenants}
        assert listing["acme"].behind and not fleet_status({"a": await state.listing()}).converged
        await state.sync_store()  # retried: still behind, still the previous mask, still served for now
        assert workers.bound["acme"] == before and state.admit("acme")
        await asyncio.sleep(0.4)
        await state.sync_store()
        with pytest.raises(Refused) as refused:
            state.admit("acme")
        assert refused.value.status == 503 and state.metrics.refused_behind._value.get() == 1
        assert state.health_detail().tenants_refused_behind == ["acme"]
        assert {t.tenant: t for t in (await state.listing()).tenants}["acme"].refused_behind
        push_to_store(store, tenants, "acme", "acme-main", mask(5))
        await state.sync_store()
        assert state.behind == {} and state.health_detail().status == "ok" and state.unions["acme"].neurons == 1
        assert state.admit("acme") and state.metrics.refused_behind._value.get() == 0
        assert workers.bound["acme"][0] == state.unions["acme"].digest != before[0]

    asyncio.run(run())


def test_push_to_store_refuses_what_no_server_could_serve(world):
    _, mask, tmp_path = world
    tenants, store = tmp_path / "tenants.yaml", tmp_path / "store"
    MaskStore(store)
    for tenant, mask_id, data, why in (("nobody", "m", mask(1), "no tenant"), ("acme", "m\n", mask(1), "mask id"),
                                       ("acme", "m", b"junk", "safetensors"), ("acme", "m", mask(), "neuron_count")):
        result = CliRunner().invoke(main, ["masks", "push", "--store", str(store), "--tenants", str(tenants),
                                           "--tenant", tenant, "--id", mask_id, "--mask", _file(tmp_path, data)])
        assert result.exit_code != 0 and why in result.output, (tenant, mask_id, result.output)
    assert MaskStore(store).index.generation == 0


def _file(tmp_path, data: bytes) -> str:
    path = tmp_path / f"mask-{hash(data) & 0xFFFF}.safetensors"
    path.write_bytes(data)
    return str(path)


# --- two real servers -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_servers_on_one_store_converge_within_seconds(ci_testbed, tmp_path):
    model_dir = ci_testbed / "model"
    shape, fp = mlp_shape(read_config(model_dir)), model_fingerprint(model_dir)
    model, tokenizer = load_model(model_dir, "cpu", torch.float32)

    def greedy(off: torch.Tensor, prompt: str) -> str:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with masked(model, off):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def mask_file(name: str, share: float, seed: int) -> tuple[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        off = torch.rand(shape.num_layers, shape.intermediate_size, generator=generator) < share
        path = tmp_path / f"{name}.safetensors"
        NeuronMask.create("acme", fp, shape, off, MaskProvenance(method="random")).save(path)
        return str(path), off

    first, second = mask_file("first", 0.3, 1), mask_file("second", 0.3, 2)
    # A record prompt whose answer tells the two masks apart.
    prompt = next(r.prompt for r in load_records(ci_testbed / "records.jsonl")
                  if greedy(first[1], r.prompt) != greedy(second[1], r.prompt))
    config = TenantsConfig()
    key = config.add_tenant("acme", ["main"])
    config.save(tmp_path / "tenants.yaml")
    (tmp_path / "admin.token").write_text("admin-" + "f" * 32)
    servers = [ServerProcess(model_dir, tmp_path / "tenants.yaml", tmp_path / "store", tmp_path / "admin.token",
                             tmp_path / f"server{i}.log", allow_unverified=True, depn_options=("--max-behind", "2"))
               for i in (1, 2)]
    cli = CliRunner()
    token = ["--admin-token-file", str(tmp_path / "admin.token")]
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once
            list(pool.map(ServerProcess.start, servers))
        pushed = cli.invoke(main, ["masks", "push", "--server", servers[0].url, *token, "--tenant", "acme",
                                   "--id", "main", "--mask", first[0]])
        assert pushed.exit_code == 0, pushed.output
        assert _answers_within(servers[1], key, prompt, greedy(first[1], prompt), seconds=5)
        stored = cli.invoke(main, ["masks", "push", "--store", str(tmp_path / "store"), "--tenants",
                                   str(tmp_path / "tenants.yaml"), "--tenant", "acme", "--id", "main",
                                   "--mask", second[0]])
        assert stored.exit_code == 0 and "generation 2" in stored.output, stored.output
        for server in servers:
            assert _answers_within(server, key, prompt, greedy(second[1], prompt), seconds=5)
        status = cli.invoke(main, ["masks", "status", *token, "--server", servers[0].url, "--server", servers[1].url,
                                   "--wait", "5"])
        assert status.exit_code == 0 and "converged" in status.output and "main v2" in status.output, status.output
        with urllib.request.urlopen(servers[1].url + "/health", timeout=10) as health:
            assert health.status == 200 and health.read() == b""  # vLLM's plain answer

        # A mask no server can apply (made for other weights), straight into the store: each serves the previous
        # mask for --max-behind seconds, then refuses the tenant (503) rather than serve a mask weaker than the
        # store's; the metric for the alert says so; a good mask brings it back.
        other = tmp_path / "other.safetensors"
        wrong = NeuronMask.create("acme", fp.model_copy(update={"mlp_sha256": "0" * 64}), shape, second[1],
                                  MaskProvenance(method="random"))
        wrong.save(other)
        assert cli.invoke(main, ["masks", "push", "--store", str(tmp_path / "store"), "--tenants",
                                 str(tmp_path / "tenants.yaml"), "--tenant", "acme", "--id", "main",
                                 "--mask", str(other)]).exit_code == 0
        time.sleep(0.5)
        assert servers[0].complete(key, prompt, 8) == greedy(second[1], prompt)  # behind, within the bound
        for server in servers:
            assert _refused_within(server, key, prompt, seconds=6)
            assert re.search(r"^depn_tenants_refused_behind 1\.0$", server.metrics(), re.M)
        assert cli.invoke(main, ["masks", "push", "--store", str(tmp_path / "store"), "--tenants",
                                 str(tmp_path / "tenants.yaml"), "--tenant", "acme", "--id", "main",
                                 "--mask", first[0]]).exit_code == 0
        for server in servers:
            assert _answers_within(server, key, prompt, greedy(first[1], prompt), seconds=5)
    finally:
        for server in servers:
            server.stop()


def _refused_within(server: ServerProcess, key: str, prompt: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            server.complete(key, prompt, 8)
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                return True
        time.sleep(0.2)
    return False


def _answers_within(server: ServerProcess, key: str, prompt: str, expected: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if server.complete(key, prompt, 8) == expected:
                return True
        except urllib.error.HTTPError:
            pass  # 403 until the server applied its first mask
        time.sleep(0.2)
    return False
