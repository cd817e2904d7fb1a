"""The server's mask store: per-tenant ids, checksums, old stores migrated, bad indexes refused, and crash
consistency: a process killed (SIGKILL) before any file-system step of a change leaves the old or the new state
whole, never a mix, and nothing else behind."""

import errno
import hashlib
import json
import os
import re
import signal

import pytest
import torch
from pydantic import ValidationError

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.errors import DepnError
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.serving.server.store import INDEX_NAME, LEGACY_INDEX_NAME, LOCK_NAME, MaskStore, StoreError
from depn_serve.serving.server.tenants import ID_PATTERN, TenantsConfig, TenantsError
from tests.serving.server.conftest import at_step


@pytest.fixture
def make_mask(tiny_model_dir):
    shape = mlp_shape(read_config(tiny_model_dir))
    fp = model_fingerprint(tiny_model_dir)

    def make(neuron: int, tenant: str = "acme") -> tuple[bytes, NeuronMask]:
        off = torch.zeros(shape.dims, dtype=torch.bool)
        off[1, neuron] = True
        mask = NeuronMask.create(tenant, fp, shape, off, MaskProvenance(method="test"))
        return mask.to_bytes(), mask

    return make


def _entry(data: bytes, version: int = 1, built_for: str = "acme") -> dict:
    return {"version": version, "sha256": hashlib.sha256(data).hexdigest(), "neurons": 1, "built_for": built_for,
            "pushed_at": "2026-11-28T00:00:00Z"}


def test_a_format_1_store_moves_to_per_tenant_ids(tmp_path, make_mask):
    shared, _ = make_mask(1)
    spare, _ = make_mask(2, tenant="initech")
    (tmp_path / "shared.safetensors").write_bytes(shared)
    (tmp_path / "spare.safetensors").write_bytes(spare)
    (tmp_path / LEGACY_INDEX_NAME).write_text(json.dumps({
        "masks": {"shared": _entry(shared, 3), "spare": _entry(spare, built_for="initech")},
        "bindings": {"acme": ["shared"]}}))  # "bindings": the key's name before 0.2
    store = MaskStore(tmp_path)
    with pytest.raises(StoreError, match="written by 0.1"):
        store.put("acme", "new", shared, NeuronMask.from_bytes(shared), ["new"])
    store.migrate({"acme": ["other"], "globex": ["shared"]})  # acme's run-time list wins over its file list
    for tenant, mask_id, version in (("acme", "shared", 3), ("globex", "shared", 3), ("initech", "spare", 1)):
        assert store.index.entry(tenant, mask_id).version == version
        assert store.load(tenant, mask_id).manifest.neuron_count == 1
    assert store.index.tenant_masks == {"acme": ["shared"]}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        ".lock", "_index.json", "acme", "acme/shared.v3.safetensors", "globex", "globex/shared.v3.safetensors",
        "initech", "initech/spare.v1.safetensors"]
    assert json.loads((tmp_path / INDEX_NAME).read_text())["format_version"] == 3
    assert MaskStore(tmp_path).index == store.index


def test_a_format_2_store_moves_its_index_where_no_tenant_can_reach(tmp_path, make_mask):
    data, _ = make_mask(1)
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "m.v1.safetensors").write_bytes(data)
    (tmp_path / LEGACY_INDEX_NAME).write_text(json.dumps({"format_version": 2, "generation": 4,
                                                          "masks": {"acme": {"m": _entry(data)}}}))
    store = MaskStore(tmp_path)
    assert store.load("acme", "m").manifest.neuron_count == 1 and store.index.generation == 5
    assert not (tmp_path / LEGACY_INDEX_NAME).exists()
    assert json.loads((tmp_path / INDEX_NAME).read_text())["format_version"] == 3


def test_no_tenant_id_reaches_the_stores_own_files(tmp_path, make_mask):
    """A tenant named `index.json` once turned a store's index into its directory and stopped every replica."""
    for own in (INDEX_NAME, LEGACY_INDEX_NAME, LOCK_NAME):
        assert own == LEGACY_INDEX_NAME or re.fullmatch(ID_PATTERN, own) is None  # no valid id is their name
    data, mask = make_mask(1)
    for reserved in ("index.json", "INDEX.json"):
        with pytest.raises(StoreError, match="reserved"):
            MaskStore(tmp_path).put(reserved, "m", data, mask, [])
        config = TenantsConfig()
        with pytest.raises(ValidationError, match="reserved"):
            config.add_tenant(reserved, [])
        with pytest.raises(TenantsError, match="reserved"):
            TenantsConfig.parse(f"tenants:\n  - id: {reserved}\n".encode(), tmp_path / "tenants.yaml")
    assert MaskStore(tmp_path).index.generation == 0 and sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_bad_indexes_ids_and_files_are_refused(tmp_path, make_mask):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"format_version": 3, "masks": {"acme": {"m": _entry(b"", 0)}}}))
    with pytest.raises(StoreError, match=r"_index.json: field 'masks.acme.m.version'") as err:
        MaskStore(tmp_path)
    assert isinstance(err.value, DepnError)
    (tmp_path / INDEX_NAME).write_bytes(b'{"masks": "\xff"}')
    with pytest.raises(StoreError, match="index.json: expected UTF-8 JSON"):
        MaskStore(tmp_path)

    store = MaskStore(tmp_path / "other")
    for bad in ("../etc", "m\n", ""):
        with pytest.raises(StoreError, match="mask id"):
            store.file("acme", bad, 1)
    with pytest.raises(StoreError, match="has no mask 'absent'"):
        store.load("acme", "absent")
    data, mask = make_mask(3)
    store.put("acme", "m", data, mask, ["m"])
    path = store.file("acme", "m", 1)
    path.write_bytes(data[:-1] + b" ")  # the bits change, the file still parses
    with pytest.raises(StoreError, match=r"m.v1.safetensors: SHA-256 .* differs from the index's"):
        store.load("acme", "m")


def test_versions_and_ids_per_tenant(tmp_path, make_mask):
    (v1, m1), (v2, m2) = make_mask(1), make_mask(2)
    store = MaskStore(tmp_path)
    store.put("acme", "m", v1, m1, ["m"])
    store.put("globex", "m", v2, m2, ["m"])  # the same id under another tenant is another mask
    assert store.load("acme", "m").off[1, 1] and store.load("globex", "m").off[1, 2]
    assert store.put("acme", "m", v2, m2, ["m"]).version == 2
    assert not store.file("acme", "m", 1).exists() and MaskStore(tmp_path).load("acme", "m").off[1, 2]
    store.remove("acme", "m", [])
    reopened = MaskStore(tmp_path)
    assert reopened.index.entry("acme", "m") is None and reopened.index.tenant_masks["acme"] == []
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")] == ["globex/m.v1.safetensors"]


def test_opening_sweeps_what_a_crash_left(tmp_path, make_mask):
    data, mask = make_mask(1)
    MaskStore(tmp_path).put("acme", "m", data, mask, ["m"])
    (tmp_path / "acme" / ".m.v2.safetensors.x1.tmp").write_bytes(b"half")
    (tmp_path / "acme" / "m.v2.safetensors").write_bytes(data)  # written, but the index never named it
    (tmp_path / "ghost").mkdir()
    MaskStore(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        ".lock", "_index.json", "acme", "acme/m.v1.safetensors"]


def _state(root) -> tuple:
    """What a restart sees: each tenant's masks with versions and bits, checked against the index's digests."""
    store = MaskStore(root)
    seen = {}
    for tenant, masks in store.index.masks.items():
        for mask_id, entry in masks.items():
            bits = store.load(tenant, mask_id).off.nonzero().flatten().tolist()
            seen[(tenant, mask_id)] = (entry.version, tuple(bits))
    named = {store.file(t, m, e.version) for t, ms in store.index.masks.items() for m, e in ms.items()}
    assert set(root.rglob("*.safetensors")) == named and not list(root.rglob("*.tmp"))
    return tuple(sorted(seen.items())), tuple(sorted(store.index.tenant_masks.items()))


@pytest.mark.parametrize("change", ["push", "drop", "migrate"])
def test_kill_9_at_every_step_leaves_the_old_or_the_new_state(tmp_path, make_mask, change):
    (v1, m1), (v2, m2) = make_mask(1), make_mask(2)

    def fresh(root):
        if change == "migrate":  # a format-1 store, as 0.1 wrote it
            root.mkdir()
            (root / "m.safetensors").write_bytes(v1)
            (root / LEGACY_INDEX_NAME).write_text(json.dumps({"masks": {"m": _entry(v1)},
                                                              "tenant_masks": {"acme": ["m"]}}))
        else:
            MaskStore(root).put("acme", "m", v1, m1, ["m"])

    def run(root) -> None:
        store = MaskStore(root)
        if change == "push":
            store.put("acme", "m", v2, m2, ["m"])
        elif change == "drop":
            store.remove("acme", "m", [])
        else:
            store.migrate({})

    def opened(root) -> tuple:
        store = MaskStore(root)
        store.migrate({})  # what a restart does before anything else
        return _state(root)

    fresh(tmp_path / "plain")
    run(tmp_path / "plain")
    new = _state(tmp_path / "plain")
    old = new if change == "migrate" else (((("acme", "m"), (1, (1, 1))),), (("acme", ["m"]),))
    assert change == "migrate" or new != old
    for k in range(1, 100):
        root = tmp_path / f"k{k}"
        fresh(root)
        pid = os.fork()
        if pid == 0:  # the child: crash at step k, or finish and say so with its exit status
            code = 3
            try:
                at_step(k, lambda: os.kill(os.getpid(), signal.SIGKILL))
                run(root)
                code = 7
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert opened(root) in (old, new), k
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 7 and _state(root) == new  # finished (acknowledged): the change holds
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
    assert k > 3, "no step was interrupted"
    print(f"{change}: killed before each of {k - 1} file-system steps")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("change", ["push", "drop"])
def test_a_failed_write_leaves_the_old_state_whole(tmp_path, make_mask, monkeypatch, code, change):
    """A disk error (full, or I/O) at each file-system step of a push or drop in turn: the change fails and nothing
    changed, in memory or on disk, or it went through whole."""
    (v1, m1), (v2, m2) = make_mask(1), make_mask(2)

    def fail():
        raise OSError(code, os.strerror(code))

    for k in range(1, 100):
        root = tmp_path / f"k{k}"
        store = MaskStore(root)
        store.put("acme", "m", v1, m1, ["m"])
        before, index_before = _state(root), store.index
        at_step(k, fail, monkeypatch.setattr)
        try:
            store.put("acme", "m", v2, m2, ["m"]) if change == "push" else store.remove("acme", "m", [])
            done = True
        except OSError as exc:
            assert exc.errno == code
            done = False
        finally:
            monkeypatch.undo()
        after = _state(root)
        assert (after != before) == done and (store.index != index_before) == done, k
        assert MaskStore(root).index == store.index, k  # memory and disk agree: a restart serves what this did
        if done:
            break
    assert k > 2
