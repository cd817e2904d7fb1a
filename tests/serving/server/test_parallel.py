"""vLLM's parallelism, run for real on CPU, answers each tenant as the HF model does with that tenant's neurons
switched off:
- `--tensor-parallel-size 2`: two worker processes, each with half of every MLP's neurons and its own slice of each
  mask (the shard slicing alone is unit-tested in tests/serving/test_slots.py);
- `--data-parallel-size 2`: two engines, each with the whole model and every tenant's mask; a push reaches both,
  and requests sent at once are spread over both (vLLM's own balancer);
- `--api-server-count 2`: two API server processes on one port, each with its own tenant state; a push answered by
  one reaches the other through the mask store, and the metrics of both are summed on /metrics; an edit of the
  tenants file that one process applies never makes the other bind the old file's masks (the workers' mask for the
  tenant never goes back)."""

import hashlib
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import pytest
import torch

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, pack_bits
from depn_serve.core.arch import load_model, mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records
from depn_serve.editing import masked
from depn_serve.serving.client import AdminClient
from depn_serve.serving.process import SMALL_CPU_OPTIONS, ServerProcess
from depn_serve.serving.server.tenants import TenantsConfig

pytestmark = pytest.mark.slow


OPTIONS = {"tensor": ("--tensor-parallel-size", "2"), "data": ("--data-parallel-size", "2"),
           "api": ("--api-server-count", "2")}


def _series(metrics: str, name: str) -> list[tuple[str, float]]:
    return [(labels, float(value)) for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}})? (\S+)$", metrics, re.M)]


@pytest.mark.parametrize("parallel", list(OPTIONS))
def test_parallel_2_serves_each_tenant_its_mask(ci_testbed, tmp_path, monkeypatch, parallel):
    # One OpenMP thread per rank, on cores 0 and 1 (vLLM's automatic binding wants a NUMA node per rank).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model_dir = ci_testbed / "model"
    shape, fp = mlp_shape(read_config(model_dir)), model_fingerprint(model_dir)
    model, tokenizer = load_model(model_dir, "cpu", torch.float32)
    prompts = [r.prompt for r in load_records(ci_testbed / "records.jsonl")][:6]

    def greedy(off: torch.Tensor | None, prompt: str) -> str:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with masked(model, off if off is not None else torch.zeros(shape.dims, dtype=torch.bool)):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    # Masks that reach into both halves of the MLP (rank 0 holds neurons [0, 512), rank 1 the rest).
    offs = {}
    for seed, tenant in enumerate(("acme", "globex"), start=1):
        offs[tenant] = torch.rand(shape.dims, generator=torch.Generator().manual_seed(seed)) < 0.3
        half = shape.intermediate_size // 2
        assert offs[tenant][:, :half].any() and offs[tenant][:, half:].any()
        NeuronMask.create(tenant, fp, shape, offs[tenant], MaskProvenance(method="random")).save(
            tmp_path / f"{tenant}.safetensors")
    expected = {t: [greedy(off, p) for p in prompts] for t, off in offs.items()}
    unmasked = [greedy(None, p) for p in prompts]
    assert expected["acme"] != expected["globex"] and expected["acme"] != unmasked  # the masks change answers

    config = TenantsConfig()
    keys = {t: config.add_tenant(t, ["main"]) for t in offs}
    keys["public"] = config.add_tenant("public", [], allow_unmasked=True)
    config.save(tmp_path / "tenants.yaml")
    (tmp_path / "admin.token").write_text("admin-" + "p" * 32)
    server = ServerProcess(model_dir, tmp_path / "tenants.yaml", tmp_path / "store", tmp_path / "admin.token",
                           tmp_path / "server.log", allow_unverified=True,
                           vllm_options=(*SMALL_CPU_OPTIONS, *OPTIONS[parallel]),
                           env={"VLLM_SERVER_DEV_MODE": "1"} if parallel == "api" else None)
    try:
        server.start(timeout=600)
        admin = AdminClient(server.url, tmp_path / "admin.token")
        for tenant in offs:
            admin.push(tenant, "main", tmp_path / f"{tenant}.safetensors")
        if parallel == "api":  # the process that did not answer a push applies it from the store (lowest wins)
            deadline = time.monotonic() + 10
            while _series(server.metrics(), "depn_store_generation") != [("", 2.0)]:
                assert time.monotonic() < deadline, _series(server.metrics(), "depn_store_generation")
                time.sleep(0.2)
        asks = [(tenant, p) for tenant in (*expected, "public") for p in prompts]
        with ThreadPoolExecutor(6) as pool:  # at once, so that data parallelism has both engines busy
            answers = list(pool.map(lambda a: server.complete(keys[a[0]], a[1], 8), asks))
        for (tenant, prompt), answer in zip(asks, answers):
            assert answer == {**expected, "public": unmasked}[tenant][prompts.index(prompt)], (tenant, prompt)
        metrics = server.metrics()
        if parallel == "api":
            _an_edit_applied_by_one_process_is_never_undone_by_the_other(server, tmp_path, offs, keys, shape, fp)
    finally:
        server.stop()
    marker = {"tensor": "tensor_parallel_size=2,", "data": "(EngineCore_DP1 pid=",  # the 2nd engine
              "api": "Started 2 API server processes"}[parallel]
    assert marker in (tmp_path / "server.log").read_text(), f"the server did not run with {parallel} parallelism 2"
    if parallel == "data":  # both engines answered requests
        done: dict[str, float] = {}
        for engine, value in re.findall(r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} (\S+)$', metrics,
                                        re.M):
            done[engine] = done.get(engine, 0.0) + float(value)
        assert set(done) == {"0", "1"} and all(v > 0 for v in done.values()), done
    if parallel == "api":  # both processes' figures on /metrics: counters summed, collected ones from the answerer
        assert sum(v for _, v in _series(metrics, "depn_requests_total")) == len(asks)
        assert set(re.findall(r"\(ApiServer_(\d+) pid=\d+\)", (tmp_path / "server.log").read_text())) == {"0", "1"}
        assert _series(metrics, "depn_mask_slots") == [("", 64.0)]


def _digest(off: torch.Tensor) -> str:
    """The hash the workers key a tenant's mask by (`MaskUnion.digest`)."""
    return hashlib.sha256(pack_bits(off).tobytes()).hexdigest()[:32]


def _an_edit_applied_by_one_process_is_never_undone_by_the_other(server, tmp_path, offs, keys, shape, fp):
    """acme runs with main + extra (pushed); the file is edited to extra only. One request reaches one process,
    which applies the edit (acme follows the file again: a store change); the other follows that store change
    within a second without having seen the edit. The workers' mask for acme, read through the admin-only
    `/collective_rpc` (which reloads nothing), must never go back to the old file's `main` or to main + extra."""
    extra = torch.rand(shape.dims, generator=torch.Generator().manual_seed(9)) < 0.2
    NeuronMask.create("acme", fp, shape, extra, MaskProvenance(method="random")).save(tmp_path / "extra.safetensors")
    AdminClient(server.url, tmp_path / "admin.token").push("acme", "extra", tmp_path / "extra.safetensors")
    old, both, new = _digest(offs["acme"]), _digest(offs["acme"] | extra), _digest(extra)
    admin = {"Authorization": f"Bearer {(tmp_path / 'admin.token').read_text()}"}

    def bound() -> str:
        answer = httpx.post(server.url + "/collective_rpc", json={"method": "depn_status"}, headers=admin, timeout=30)
        return answer.json()["results"][0]["bound"]["acme"]

    deadline = time.monotonic() + 10
    while bound() != both:  # both processes bound the push
        assert time.monotonic() < deadline
        time.sleep(0.1)
    config = TenantsConfig.load(tmp_path / "tenants.yaml")
    config.tenant("acme").masks = ["extra"]
    config.save(tmp_path / "tenants.yaml")
    server.complete(keys["public"], "Hello", 2)  # one process sees the edit
    seen = []
    for step in range(60):
        seen.append(bound())
        if step == 30:  # then requests through both
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: server.complete(keys["acme"], "Hello", 2), range(8)))
        time.sleep(0.1)
    assert new in seen, seen
    after = seen[seen.index(new):]
    assert set(after) == {new}, f"the workers went back to an older mask: {after}"
    assert old not in seen
