"""The server's mask store: the index survives restarts, old index files still load, bad ones are refused."""

import json

import pytest
import torch

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.errors import DepnError
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.serving.server.store import INDEX_NAME, MaskStore, StoreError

STORED = {"version": 2, "sha256": "0" * 64, "neurons": 1, "built_for": "acme", "pushed_at": "2026-11-28T00:00:00Z"}


def test_old_bindings_key_loads_and_is_written_back_as_tenant_masks(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"masks": {"acme-main": STORED},
                                                   "bindings": {"acme": ["acme-main"], "globex": []}}))
    store = MaskStore(tmp_path)
    assert store.index.tenant_masks == {"acme": ["acme-main"], "globex": []}
    assert store.index.masks["acme-main"].version == 2
    store.set_tenant_masks("initech", ["acme-main"])
    written = json.loads((tmp_path / INDEX_NAME).read_text())
    assert "bindings" not in written
    assert written["tenant_masks"] == {"acme": ["acme-main"], "globex": [], "initech": ["acme-main"]}
    assert MaskStore(tmp_path).index.tenant_masks == written["tenant_masks"]


def test_bad_index_and_bad_ids_are_refused(tmp_path):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"masks": {"m": {**STORED, "version": 0}}}))
    with pytest.raises(StoreError, match=r"index.json: field 'masks.m.version'") as err:
        MaskStore(tmp_path)
    assert isinstance(err.value, DepnError)
    store = MaskStore(tmp_path / "other")
    with pytest.raises(StoreError, match="mask id '../etc'"):
        store.path("../etc")
    with pytest.raises(StoreError, match="not in the mask store"):
        store.load("absent")


def test_put_bumps_the_version_and_restore_undoes_it(tmp_path, tiny_model_dir):
    shape = mlp_shape(read_config(tiny_model_dir))
    off = torch.zeros(shape.dims, dtype=torch.bool)
    off[1, 3] = True
    mask = NeuronMask.create("acme", model_fingerprint(tiny_model_dir), shape, off, MaskProvenance(method="test"))
    data = mask.to_bytes()
    store = MaskStore(tmp_path)
    assert store.put("m", data, mask).version == 1
    checkpoint = store.checkpoint("m")
    entry = store.put("m", data, mask)
    assert entry.version == 2 and entry.neurons == 1 and entry.built_for == "acme"
    store.restore(checkpoint)
    assert MaskStore(tmp_path).index.masks["m"].version == 1
    assert torch.equal(store.load("m").off, off)
    store.remove("m")
    assert "m" not in MaskStore(tmp_path).index.masks and not (tmp_path / "m.safetensors").exists()
