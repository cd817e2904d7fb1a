"""The architecture table, and `hooked`: the one way to intervene on the MLP activation."""

import pytest
import torch

from depn_serve.core.arch import (
    SERVABLE_MODEL_TYPES,
    MlpShape,
    UnsupportedArchitectureError,
    adapter_for,
    hooked,
    load_model,
    mlp_shape,
    read_config,
)
from depn_serve.core.errors import DepnError
from depn_serve.editing import masked
from tests.helpers import make_tiny_model


def test_unsupported_architecture_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="'bert' is not supported"):
        adapter_for("bert")
    assert issubclass(UnsupportedArchitectureError, DepnError)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_shape_and_output_projection_of_every_architecture(tmp_path, arch):
    model_dir = make_tiny_model(tmp_path, arch)
    shape = mlp_shape(read_config(model_dir))
    assert shape == MlpShape(arch, 3, 96) and shape.dims == (3, 96)
    model, _ = load_model(model_dir)
    assert mlp_shape(model.config) == shape
    out_proj = adapter_for(arch).out_proj(model, 2)
    weight = out_proj.weight
    # The output projection reads the intermediate activation (Linear [out, in]; GPT-2's Conv1D [in, out]).
    assert shape.intermediate_size in weight.shape and 64 in weight.shape
    assert (arch in SERVABLE_MODEL_TYPES) == (arch != "gpt2")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    return model, torch.tensor([tok("Contact Jane Doe at 5551234567.")["input_ids"]])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_hooked_replaces_the_activation_only_inside_the_block(tiny):
    model, ids = tiny
    seen = []

    def double(x):
        seen.append(tuple(x.shape))
        return 2 * x

    plain = _logits(model, ids)
    with hooked(model, {1: double}):
        inside = _logits(model, ids)
    after = _logits(model, ids)
    assert seen == [(1, ids.shape[1], 96)]  # called once, on layer 1's intermediate activation only
    assert not torch.allclose(plain, inside)
    assert torch.equal(plain, after)
    # Equivalent to doubling the output projection's weight of layer 1.
    proj = model.model.layers[1].mlp.down_proj
    original = proj.weight.detach().clone()
    try:
        with torch.no_grad():
            proj.weight.mul_(2)
        torch.testing.assert_close(inside, _logits(model, ids), rtol=1e-5, atol=1e-6)
    finally:
        with torch.no_grad():
            proj.weight.copy_(original)
    assert torch.equal(plain, _logits(model, ids))


def test_hooked_removes_its_hooks_when_the_block_raises(tiny):
    model, ids = tiny
    plain = _logits(model, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with hooked(model, {0: torch.zeros_like, 2: torch.zeros_like}):
            assert not torch.allclose(plain, _logits(model, ids))
            raise RuntimeError("inside")
    assert torch.equal(plain, _logits(model, ids))
    layers = model.model.layers
    assert all(not layers[i].mlp.down_proj._forward_pre_hooks for i in range(3))


def test_masked_equals_hooked_with_a_zero_one_row(tiny):
    model, ids = tiny
    off = torch.zeros(3, 96, dtype=torch.bool)
    off[0, :10] = off[2, 50:60] = True
    with masked(model, off):
        by_mask = _logits(model, ids)
    rows = (~off).float()
    with hooked(model, {layer: (lambda x, row=rows[layer]: x * row) for layer in range(3)}):
        by_hook = _logits(model, ids)
    assert not torch.allclose(by_mask, _logits(model, ids))
    assert torch.equal(by_mask, by_hook)
