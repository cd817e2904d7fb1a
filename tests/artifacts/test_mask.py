import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from depn_serve.artifacts.mask import (
    BITS_KEY,
    MANIFEST_KEY,
    MaskError,
    MaskProvenance,
    NeuronMask,
    first_n,
    pack_bits,
    random_order,
)
from depn_serve.core.arch import MlpShape, load_model, mlp_shape
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.selectors import MaskPolicy
from depn_serve.editing import masked
from depn_serve.selection.vote import tally_votes, vote_order
from tests.helpers import make_tiny_model

SHAPE = MlpShape("llama", 3, 13)  # 13: not a multiple of 8, so padding bits exist


def _mask(fp, off=None, tenant="acme"):
    if off is None:
        off = torch.zeros(3, 13, dtype=torch.bool)
        off[0, [1, 12]] = True
        off[2, 5] = True
    return NeuronMask.create(tenant, fp, SHAPE, off, MaskProvenance(method="test"))


@pytest.fixture(scope="module")
def fp(tiny_model_dir):
    return model_fingerprint(tiny_model_dir)


def test_whom_a_mask_is_made_for(tmp_path, fp):
    """An isolation mask is made for the tenant whose records it keeps; another mask for none in particular, unless
    it says so; a file from before `made_for` reads its isolation policy."""
    isolation = MaskProvenance(method="test", policy=MaskPolicy.isolation("acme"))
    assert _mask(fp).manifest.made_for is None
    made = NeuronMask.create("acme", fp, SHAPE, _mask(fp).off, isolation)
    assert made.manifest.made_for == "acme"
    assert _mask(fp).made_for("globex").manifest.made_for == "globex"
    with pytest.raises(MaskError, match="an isolation mask is made for that tenant"):
        made.made_for("globex")

    old = json.loads(made.manifest.model_dump_json())
    del old["made_for"]
    path = tmp_path / "old.safetensors"
    bits = {BITS_KEY: torch.from_numpy(pack_bits(made.off))}
    path.write_bytes(st_save(bits, metadata={MANIFEST_KEY: json.dumps(old)}))
    assert NeuronMask.load(path).manifest.made_for == "acme"

    assert MaskPolicy.isolation("acme").isolates() == "acme" and MaskPolicy.own_records("acme").isolates() is None
    assert MaskPolicy(tenant="acme", forget=("all",)).isolates() is None
    assert MaskPolicy(tenant="acme", forget=("tenant=globex", "tenant!=acme")).forgets_all_but("acme")


def test_roundtrip_and_bits(tmp_path, fp):
    mask = _mask(fp)
    path = tmp_path / "m.safetensors"
    mask.save(path)
    loaded = NeuronMask.load(path)
    assert torch.equal(loaded.off, mask.off)
    assert loaded.manifest.neurons_per_layer == [2, 0, 1]
    assert loaded.neurons() == {0: [1, 12], 1: [], 2: [5]}
    bits = st_load(path.read_bytes())[BITS_KEY]
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (3, 2)  # one bit per neuron


def _tamper(path, manifest=None, bits=None):
    data = path.read_bytes()
    tensors = st_load(data)
    meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    doc = json.loads(meta[MANIFEST_KEY])
    if manifest:
        manifest(doc)
    if bits is not None:
        tensors[BITS_KEY] = bits
    path.write_bytes(st_save(tensors, metadata={MANIFEST_KEY: json.dumps(doc)}))


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(manifest=lambda d: d.update(num_layers="three")), "num_layers"),
        (dict(manifest=lambda d: d.update(format_version=9)), "format_version"),
        (dict(manifest=lambda d: d.pop("tenant")), "tenant"),
        (dict(manifest=lambda d: d.update(neurons_per_layer=[2, 0])), "manifest"),
        (dict(manifest=lambda d: d.update(neurons_per_layer=[1, 1, 1])), "neurons_per_layer"),
        (dict(bits=torch.zeros(3, 3, dtype=torch.uint8)), BITS_KEY),
        (dict(bits=torch.full((3, 2), 255, dtype=torch.uint8)), BITS_KEY),
    ],
)
def test_bad_files_name_file_and_field(tmp_path, fp, change, field):
    path = tmp_path / "bad.safetensors"
    _mask(fp).save(path)
    _tamper(path, **change)
    with pytest.raises(MaskError) as err:
        NeuronMask.load(path)
    assert str(path) in str(err.value) and f"'{field}'" in str(err.value)


def test_garbage_and_missing(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MaskError, match="field 'file': expected a safetensors file"):
        NeuronMask.load(junk)
    with pytest.raises(MaskError, match="nothing at that path"):
        NeuronMask.load(tmp_path / "absent.safetensors")


def test_check_model_refuses_other_weights(tmp_path, tiny_model_dir):
    fp = model_fingerprint(tiny_model_dir)
    other = model_fingerprint(make_tiny_model(tmp_path / "other", seed=1))
    assert other.config_sha256 == fp.config_sha256 and other.mlp_sha256 != fp.mlp_sha256
    model, _ = load_model(tiny_model_dir)
    shape = mlp_shape(model.config)
    mask = NeuronMask.create("acme", fp, shape, torch.zeros(shape.num_layers, shape.intermediate_size), MaskProvenance(method="t"))
    mask.check_model(fp, shape)
    with pytest.raises(MaskError, match="model_fingerprint.mlp_sha256"):
        mask.check_model(other, shape)
    with pytest.raises(MaskError, match="intermediate_size"):
        mask.check_model(fp, MlpShape("llama", shape.num_layers, 7))


def test_failed_save_leaves_old_file(tmp_path, fp, monkeypatch):
    path = tmp_path / "m.safetensors"
    _mask(fp).save(path)
    before = path.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("depn_serve.core.fileio.os.replace", boom)
    with pytest.raises(OSError):
        _mask(fp, tenant="other").save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_votes_threshold_and_ties():
    a = torch.tensor([[1.0, 0.5, 0.05, 0.0], [0.2, 0.0, 0.0, -3.0]])
    b = torch.tensor([[0.0, 0.9, 0.0, 0.0], [1.0, 0.0, 0.3, 0.0]])
    c = -torch.ones(2, 4)  # no positive score: no votes
    tally = tally_votes(iter([a, b, c]), threshold=0.25)
    assert tally.records == 3 and tally.voters == 2
    assert tally.votes.tolist() == [[1, 2, 0, 0], [1, 0, 1, 0]]
    # (0,1) has 2 votes; (0,0), (1,0), (1,2) one each, tie broken by summed score: 0.2 > 0.0 > -0.7
    order = vote_order(tally)
    assert order.tolist() == [1, 4, 0, 6]  # flat indices, most voted first
    dims = tuple(tally.votes.shape)
    assert first_n(order, 2, dims).nonzero().tolist() == [[0, 1], [1, 0]]
    assert first_n(order, 3, dims).nonzero().tolist() == [[0, 0], [0, 1], [1, 0]]
    assert int(first_n(order, 100, dims).sum()) == 4  # never neurons without votes


def test_random_selection_count_and_seed():
    def random_selection(dims, count, seed):
        return first_n(random_order(dims, seed), count, dims)

    a = random_selection((4, 50), 17, seed=3)
    assert a.shape == (4, 50) and a.dtype == torch.bool
    assert int(a.sum()) == 17 and torch.equal(a, random_selection((4, 50), 17, seed=3))
    assert not torch.equal(a, random_selection((4, 50), 17, seed=4))
    assert sorted(random_order((4, 50), 3).tolist()) == list(range(200))  # every neuron exactly once


def test_editing_equals_zeroed_weight_columns(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ids = torch.tensor([tok("Contact Jane Doe at 5551234567.")["input_ids"]])
    off = torch.zeros(3, 96, dtype=torch.bool)
    off[0, :10] = off[2, 50:60] = True
    with torch.no_grad():
        plain = model(ids).logits
        with masked(model, off):
            hooked = model(ids).logits
        after = model(ids).logits
        for layer in (0, 2):
            model.model.layers[layer].mlp.down_proj.weight[:, off[layer]] = 0
        zeroed = model(ids).logits
    assert not torch.allclose(plain, hooked)
    torch.testing.assert_close(hooked, zeroed, rtol=1e-5, atol=1e-6)
    assert torch.equal(plain, after)  # hooks removed on exit
