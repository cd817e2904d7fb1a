"""The masked / plain throughput ratio on one engine: the same weights and batches, masking switched on and off
between forward steps, so the machine's drift hits both sides of every pair.

Three separate engines (`depn bench serving`) differ by more than the effect between rounds on a shared machine,
and so do whole runs timed one after the other. Here the worker switches its masked modules to vLLM's own class
and back before each step (`depn_pair_steps`) and times the step (`execute_model`: inputs, forward, logits). The
steps of each batch shape go masked, plain, plain, masked, ...; each two in a row of one shape are a pair, the same
work a fraction of a second apart. The ratio is the paired plain seconds over the paired masked seconds (so a
prefill pair weighs by its time, not its count), with a 95 % interval from the ratio estimator's standard error (t
distribution); each shape's own ratio is listed too. Scheduling, sampling and detokenizing are the same on both
sides and outside the timed step, so this is the forward pass's ratio, which bounds the end-to-end one from below.
The engine runs eager: a compiled graph keeps the forward it was traced with, so this measures the masked op as
separate kernels, which bounds what torch.compile's fusion can cost.
"""

from __future__ import annotations

import math
import os
import random
import statistics
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from depn_serve.bench.serving import BenchSettings, build_model_dir, tenant_masks


class StepPair(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int = Field(description="tokens in both steps' batch")
    plain_s: float
    masked_s: float


class Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int
    pairs: int
    ratio: float
    ci95: tuple[float, float]
    plain_ms: float = Field(description="median plain step")


class PairedRatio(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: BenchSettings
    pairs: list[StepPair]
    ratio: float = Field(description="summed plain seconds / summed masked seconds over all pairs")
    ci95: tuple[float, float]
    shapes: list[Shape] = Field(description="the same per batch shape (token count)")
    depn_status: dict[str, Any] = Field(description="the worker's mask slots after the last masked run")

    @property
    def half_width(self) -> float:
        return (self.ci95[1] - self.ci95[0]) / 2

    def markdown(self) -> str:
        s = self.settings
        lines = [
            f"Llama shape hidden {s.hidden}, {s.layers} layers, intermediate {s.intermediate}, {s.dtype}, eager; "
            f"{s.rounds} runs of {s.batch} prompts x ({s.prompt_tokens} prompt + {s.max_tokens} output tokens), "
            f"{s.tenants} distinct masks ({s.mask_fraction:.0%} of neurons each); masking switched per step, "
            f"{len(self.pairs)} step pairs.\n",
            "| steps | pairs | masked / plain throughput | 95 % CI | half-width | plain step (median ms) |",
            "|---|---:|---:|---|---:|---:|",
            f"| all | {len(self.pairs)} | {self.ratio:.4f} | {self.ci95[0]:.4f}–{self.ci95[1]:.4f} | "
            f"{self.half_width:.2%} | |",
        ]
        for shape in self.shapes:
            lines.append(f"| {shape.tokens} tokens | {shape.pairs} | {shape.ratio:.4f} | {shape.ci95[0]:.4f}–"
                         f"{shape.ci95[1]:.4f} | {(shape.ci95[1] - shape.ci95[0]) / 2:.2%} | {shape.plain_ms:.1f} |")
        return "\n".join(lines) + "\n"


def ratio_ci95(pairs: list[StepPair]) -> tuple[float, tuple[float, float]]:
    """R = sum(plain) / sum(masked) and R ± t(0.975, n-1) · se, with se from the linearized residuals
    plain - R · masked (the ratio estimator's usual standard error)."""
    from scipy import stats

    plain = [p.plain_s for p in pairs]
    masked = [p.masked_s for p in pairs]
    ratio = sum(plain) / sum(masked)
    n = len(pairs)
    if n < 2:
        return ratio, (ratio, ratio)
    residual = [a - ratio * b for a, b in zip(plain, masked)]
    se = math.sqrt(sum(r * r for r in residual) / (n * (n - 1))) / statistics.fmean(masked)
    half = stats.t.ppf(0.975, n - 1) * se
    return ratio, (ratio - half, ratio + half)


def pair_up(steps: list[tuple[int, bool, float]]) -> list[StepPair]:
    """The worker's timed steps -> pairs: each two in a row of one token count (one masked, one plain); a count's
    last step without a partner is left out."""
    by_tokens: dict[int, list[tuple[bool, float]]] = {}
    for tokens, masked, seconds in steps:
        by_tokens.setdefault(tokens, []).append((masked, seconds))
    pairs = []
    for tokens, seq in by_tokens.items():
        for first, second in zip(seq[0::2], seq[1::2]):
            if first[0] == second[0]:
                raise RuntimeError(f"steps of {tokens} tokens did not alternate: {first}, {second}")
            plain, masked = (first, second) if second[0] else (second, first)
            pairs.append(StepPair(tokens=tokens, plain_s=plain[1], masked_s=masked[1]))
    return pairs


def summarize(settings: BenchSettings, pairs: list[StepPair], status: dict[str, Any]) -> PairedRatio:
    if not pairs:
        raise RuntimeError("no step pairs were timed")
    ratio, ci = ratio_ci95(pairs)
    shapes = []
    for tokens in sorted({p.tokens for p in pairs}):
        of_shape = [p for p in pairs if p.tokens == tokens]
        shape_ratio, shape_ci = ratio_ci95(of_shape)
        shapes.append(Shape(tokens=tokens, pairs=len(of_shape), ratio=shape_ratio, ci95=shape_ci,
                            plain_ms=1000 * statistics.median(p.plain_s for p in of_shape)))
    return PairedRatio(settings=settings, pairs=pairs, ratio=ratio, ci95=ci, shapes=shapes, depn_status=status)


def run_paired_ratio(settings: BenchSettings, work_dir: Path,
                     on_run: Callable[[int, list[StepPair]], None] = lambda n, p: None) -> PairedRatio:
    """One eager engine with `settings.tenants` masks bound; one warm-up run, then `settings.rounds` runs whose
    steps alternate masked and plain. `on_run(run, pairs so far)` after each."""
    import depn_serve_patches
    import vllm

    from depn_serve.serving.request import MaskRequest

    vocab = build_model_dir(settings, work_dir / "model")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with ExitStack() as running:
        llm = vllm.LLM(model=str(work_dir / "model"), load_format="dummy", dtype=settings.dtype, seed=settings.seed,
                       enforce_eager=True, enable_prefix_caching=False, max_num_seqs=settings.batch,
                       max_model_len=settings.prompt_tokens + settings.max_tokens, gpu_memory_utilization=0.3,
                       **depn_serve_patches.engine_kwargs(max_mask_slots=max(settings.tenants, 1), bench=True))
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
        llm.generate(prompts, params, use_tqdm=False)  # warm-up, masked
        steps: list[tuple[int, bool, float]] = []
        llm.collective_rpc("depn_pair_steps", args=(True,))
        for run in range(1, settings.rounds + 1):
            llm.generate(prompts, params, use_tqdm=False)
            steps += llm.collective_rpc("depn_pair_steps", args=(True,))[0]
            on_run(run, pair_up(steps))
        llm.collective_rpc("depn_pair_steps", args=(False,))
        status = llm.collective_rpc("depn_status")[0]
    if status["loads"] < min(settings.tenants, settings.batch) or status["overflows"] or status["unknown"]:
        raise RuntimeError(f"masks were not applied as intended: {status}")
    return summarize(settings, pair_up(steps), status)
