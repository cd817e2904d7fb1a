"""The masked / plain throughput ratio on one engine: the same weights, the same batch, masking switched on and off
between runs, many times, so the machine's drift hits both sides of every pair.

Three separate engines (`depn bench serving`) differ by more than the effect between rounds on a shared machine.
Here the worker's masked layers go back to vLLM's own class and again (`depn_set_masking`) between `generate`
calls; each round times both, in a random order, on the same prompts (prefix caching off, so neither reuses the
other's KV), and the round's ratio is plain seconds / masked seconds (masked throughput as a fraction of plain).
The reported ratio is the mean over rounds with a 95 % confidence interval (t distribution). The engine runs eager:
a compiled graph keeps the forward it was traced with, so this measures the masked op as separate kernels, which
bounds what torch.compile's fusion can cost.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from depn_serve.bench.serving import BenchSettings, build_model_dir, tenant_masks


class PairedRound(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int
    plain_s: float
    masked_s: float
    output_tokens: int

    @property
    def ratio(self) -> float:
        return self.plain_s / self.masked_s


class PairedRatio(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: BenchSettings
    rounds: list[PairedRound]
    ratio: float = Field(description="mean over rounds of plain seconds / masked seconds")
    ci95: tuple[float, float]
    depn_status: dict[str, Any] = Field(description="the worker's mask slots after the last masked run")

    @property
    def half_width(self) -> float:
        return (self.ci95[1] - self.ci95[0]) / 2

    def markdown(self) -> str:
        s = self.settings
        return (
            f"Llama shape hidden {s.hidden}, {s.layers} layers, intermediate {s.intermediate}, {s.dtype}, eager; "
            f"batch {s.batch} x ({s.prompt_tokens} prompt + {s.max_tokens} output tokens), {s.tenants} distinct "
            f"masks ({s.mask_fraction:.0%} of neurons each); {len(self.rounds)} paired rounds on one engine.\n\n"
            "| masked / plain throughput | 95 % CI | half-width | plain s (median) | masked s (median) |\n"
            "|---:|---|---:|---:|---:|\n"
            f"| {self.ratio:.4f} | {self.ci95[0]:.4f}–{self.ci95[1]:.4f} | {self.half_width:.2%} | "
            f"{statistics.median(r.plain_s for r in self.rounds):.3f} | "
            f"{statistics.median(r.masked_s for r in self.rounds):.3f} |\n"
        )


def ci95(values: list[float]) -> tuple[float, float]:
    """Mean ± t(0.975, n-1) · sd / √n."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def run_paired_ratio(settings: BenchSettings, work_dir: Path,
                     on_round: Callable[[PairedRound, bool], None] = lambda r, w: None) -> PairedRatio:
    """One eager engine with `settings.tenants` masks bound; one warm-up round, then `settings.rounds` pairs."""
    import depn_serve_patches
    import vllm

    from depn_serve.serving.request import MaskRequest

    vocab = build_model_dir(settings, work_dir / "model")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with ExitStack() as running:
        llm = vllm.LLM(model=str(work_dir / "model"), load_format="dummy", dtype=settings.dtype, seed=settings.seed,
                       enforce_eager=True, enable_prefix_caching=False, max_num_seqs=settings.batch,
                       max_model_len=settings.prompt_tokens + settings.max_tokens, gpu_memory_utilization=0.3,
                       **depn_serve_patches.engine_kwargs(max_mask_slots=max(settings.tenants, 1)))
        running.callback(llm.llm_engine.engine_core.shutdown)
        masks = tenant_masks(settings)
        llm.collective_rpc("depn_bind_many", args=([(t, "bench", packed) for t, packed in masks.items()],))
        names = list(masks)
        rng = random.Random(settings.seed)
        prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(settings.prompt_tokens)]}
                   for _ in range(settings.batch)]
        params = [vllm.SamplingParams(max_tokens=settings.max_tokens, temperature=0, ignore_eos=True,
                                      extra_args=MaskRequest(names[i % len(names)]).to_extra_args())
                  for i in range(settings.batch)]

        def timed(masking: bool) -> tuple[float, int]:
            llm.collective_rpc("depn_set_masking", args=(masking,))
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)

        rounds = []
        for number in range(settings.rounds + 1):
            order = [True, False] if rng.random() < 0.5 else [False, True]
            seconds = {masking: timed(masking) for masking in order}
            paired = PairedRound(round=number, plain_s=seconds[False][0], masked_s=seconds[True][0],
                                 output_tokens=seconds[True][1])
            on_round(paired, number == 0)
            if number > 0:
                rounds.append(paired)
        llm.collective_rpc("depn_set_masking", args=(True,))
        status = llm.collective_rpc("depn_status")[0]
    if status["loads"] < min(settings.tenants, settings.batch) or status["overflows"] or status["unknown"]:
        raise RuntimeError(f"masks were not applied as intended: {status}")
    ratios = [r.ratio for r in rounds]
    return PairedRatio(settings=settings, rounds=rounds, ratio=statistics.fmean(ratios), ci95=ci95(ratios),
                       depn_status=status)
