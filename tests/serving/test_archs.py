"""Qwen2 and Mistral through the masked vLLM engine (tiny random models; the Llama test-bed is covered in
test_serving_engine): masked requests equal HF with the same neurons switched off, unmasked ones the plain model."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

from depn_serve.artifacts.mask import pack_bits
from depn_serve.core.arch import load_model
from depn_serve.editing import masked
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.slow

PROMPTS = ["Contact Jane Doe at", "Hello team, the meeting with"]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_masked_engine_matches_hf(arch, tmp_path):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import depn_serve_patches
    from vllm import LLM, SamplingParams

    model_dir = make_tiny_model(tmp_path / arch, arch=arch)
    model, tokenizer = load_model(model_dir, "cpu", torch.float32)
    off = torch.rand(model.config.num_hidden_layers, model.config.intermediate_size,
                     generator=torch.Generator().manual_seed(0)) < 0.3
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=128,
              gpu_memory_utilization=0.3, **depn_serve_patches.engine_kwargs(max_mask_slots=2))
    try:
        llm.collective_rpc("depn_bind", args=("t", 1, pack_bits(off).tobytes()))
        params = [SamplingParams(max_tokens=8, temperature=0, logprobs=0, ignore_eos=True,
                                 extra_args={"depn_tenant": t} if t else None) for t in ("t", None, "t", None)]
        outputs = llm.generate(PROMPTS + PROMPTS[::-1], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    first_logprob = {}
    for output, tenant in zip(outputs, ("t", None, "t", None)):
        ids = torch.tensor([list(output.prompt_token_ids)])
        with masked(model, off) if tenant else contextlib.nullcontext():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  pad_token_id=2)[0, ids.shape[1]:].tolist()
            logits = model(ids).logits[0, -1]
        got = list(output.outputs[0].token_ids)
        assert got == want, f"{arch}, tenant {tenant}: vLLM {got} != HF {want}"
        lp = output.outputs[0].logprobs[0][got[0]].logprob
        assert abs(lp - torch.log_softmax(logits, -1)[got[0]].item()) < 1e-4
        first_logprob[(output.prompt, tenant)] = lp
    assert any(abs(first_logprob[(p, "t")] - first_logprob[(p, None)]) > 1e-3 for p in PROMPTS)
