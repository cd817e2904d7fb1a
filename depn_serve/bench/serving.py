"""Serving overhead of per-tenant masks: plain vLLM vs. the extension without masks vs. 16 tenants' masks.

All three engines live in one parent process with identical settings, so the only differences are the plugin's
hooks and the masks. Runs are interleaved (rotated order each round) so drift in machine load hits every
configuration alike; the medians over rounds are compared. Weights are vLLM's random "dummy" weights: the figures
measure speed only.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from depn_serve.core.fileio import atomic_write_text

ConfigName = Literal["vllm", "depn-identity", "depn-masked"]
CONFIGS: tuple[ConfigName, ...] = ("vllm", "depn-identity", "depn-masked")
LABELS: dict[ConfigName, str] = {
    "vllm": "(a) vLLM, no extension",
    "depn-identity": "(b) extension, no masks",
    "depn-masked": "(c) extension, {tenants} tenants' masks",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BenchSettings(_Frozen):
    hidden: int = Field(1024, ge=64)
    layers: int = Field(8, ge=1)
    intermediate: int = Field(2816, ge=64)
    heads: int = Field(16, ge=1)
    kv_heads: int = Field(4, ge=1)
    vocab: int = Field(4096, ge=512, description="requested BPE vocabulary; the trained one may be a little smaller")
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    eager: bool = Field(False, description="enforce_eager; False = vLLM's default torch.compile path")
    rounds: int = Field(10, ge=1, description="measured rounds, after one discarded warm-up round")
    batch: int = Field(32, ge=1, description="prompts per run")
    prompt_tokens: int = Field(32, ge=1)
    max_tokens: int = Field(128, ge=2, description="output tokens per prompt")
    tenants: int = Field(64, ge=1, le=1024,
                         description="distinct masks in (c), at most the 1,024 default mask slots")
    mask_fraction: float = Field(0.01, gt=0, lt=1)
    seed: int = 0


class Measurement(_Frozen):
    config: ConfigName
    round: int
    seconds: float
    output_tokens: int
    tokens_per_s: float
    tpot_ms: float = Field(description="mean over requests of (last token time - first token time) / (tokens - 1)")


class ConfigSummary(_Frozen):
    config: ConfigName
    label: str
    tokens_per_s: float = Field(description="median over measured rounds")
    tpot_ms: float = Field(description="median over measured rounds")
    throughput_ratio: float = Field(description="tokens/s over (a)'s")
    latency_ratio: float = Field(description="(a)'s per-token latency over this one's: above 1 = faster than (a)")
    best_tokens_per_s: float = Field(description="fastest round: other load on the machine only ever slows a run")
    best_ratio: float = Field(description="best tokens/s over (a)'s best")


class ServingBenchResult(_Frozen):
    settings: BenchSettings
    vocab_size: int
    versions: dict[str, str]
    cpu_count: int | None
    measurements: list[Measurement]
    summary: list[ConfigSummary]
    depn_status: dict[str, Any] = Field(description="the worker's mask slots in (c) after the last round")

    def markdown(self) -> str:
        s = self.settings
        lines = [
            (f"Llama shape: hidden {s.hidden}, {s.layers} layers, intermediate {s.intermediate}, {s.heads} heads "
             f"({s.kv_heads} KV), vocab {self.vocab_size}; {s.dtype}, {'eager' if s.eager else 'torch.compile'}; "
             f"batch {s.batch} x ({s.prompt_tokens} prompt + {s.max_tokens} output tokens), median of {s.rounds} "
             f"interleaved rounds; (c): {s.tenants} tenants round-robin, {s.mask_fraction:.0%} of neurons each. "
             f"vLLM {self.versions['vllm']}, torch {self.versions['torch']}, {self.cpu_count} CPUs. (c)'s worker "
             f"after the run: {self.depn_status['loads']} mask loads, {self.depn_status['evictions']} evictions, "
             f"{self.depn_status['overflows']} overflows."),
            "",
            ("| configuration | output tokens/s | per-token latency (ms) | tokens/s vs (a) | latency (a)/x "
             "| best tokens/s | best vs (a) |"),
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {c.label} | {c.tokens_per_s:.1f} | {c.tpot_ms:.2f} | {c.throughput_ratio:.3f} | {c.latency_ratio:.3f} "
            f"| {c.best_tokens_per_s:.1f} | {c.best_ratio:.3f} |"
            for c in self.summary
        ]
        return "\n".join(lines) + "\n"

    def write(self, json_path: Path | None = None, markdown_path: Path | None = None) -> None:
        if json_path is not None:
            atomic_write_text(json_path, self.model_dump_json(indent=2) + "\n")
        if markdown_path is not None:
            atomic_write_text(markdown_path, self.markdown())


def build_model_dir(settings: BenchSettings, out: Path) -> int:
    """config.json + a byte-level BPE tokenizer (no weights: the engines use load_format="dummy"); -> vocab size."""
    from faker import Faker
    from transformers import LlamaConfig

    from depn_serve.testbed.tokenizer import BOS, EOS, PAD, train_tokenizer

    fake = Faker()
    fake.seed_instance(settings.seed)
    tokenizer = train_tokenizer([fake.text(1000) for _ in range(3000)], settings.vocab)
    LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden, intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.kv_heads,
        max_position_embeddings=settings.prompt_tokens + settings.max_tokens,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        tie_word_embeddings=False, dtype=settings.dtype,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def tenant_masks(settings: BenchSettings) -> dict[str, bytes]:
    """Distinct seeded masks, each switching off the same number of random neurons."""
    from depn_serve.artifacts.mask import first_n, pack_bits, random_order

    dims = (settings.layers, settings.intermediate)
    count = max(1, round(settings.mask_fraction * dims[0] * dims[1]))
    return {f"bench-{t:02d}": pack_bits(first_n(random_order(dims, settings.seed * 1000 + t), count, dims)).tobytes()
            for t in range(settings.tenants)}


def run_serving_bench(
    settings: BenchSettings, work_dir: Path, on_measurement: Callable[[Measurement, bool], None] = lambda m, w: None
) -> ServingBenchResult:
    """Start (a), (b), (c) in this process, run them interleaved, check (c) used its masks; `on_measurement(m,
    warm_up)` is called after every run. Leaves DEPN_SERVE=1 in os.environ (engine_kwargs sets it)."""
    import depn_serve_patches
    import torch
    import vllm

    vocab = build_model_dir(settings, work_dir / "model")
    # (a) must start without the plugin; engine_kwargs() switches it on for the engines started after it.
    os.environ.pop(depn_serve_patches.ENABLE_ENV, None)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Every engine compiles fresh, so no configuration starts with another's cached graph.
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    common = {
        "model": str(work_dir / "model"), "load_format": "dummy", "dtype": settings.dtype, "seed": settings.seed,
        "enforce_eager": settings.eager, "max_num_seqs": settings.batch,
        "max_model_len": settings.prompt_tokens + settings.max_tokens, "gpu_memory_utilization": 0.3,
        "disable_log_stats": False,  # per-request timestamps (RequestOutput.metrics) for the per-token latency
    }
    with ExitStack() as running:

        def start(**kwargs) -> vllm.LLM:
            llm = vllm.LLM(**common, **kwargs)
            running.callback(llm.llm_engine.engine_core.shutdown)  # else a failure leaves engine processes behind
            return llm

        engines = {"vllm": start()}
        extension = depn_serve_patches.engine_kwargs()
        engines["depn-identity"] = start(**extension)
        engines["depn-masked"] = start(**extension)
        measurements = _interleaved(settings, engines, vocab, on_measurement)
        identity_status = engines["depn-identity"].collective_rpc("depn_status")[0]
        status = engines["depn-masked"].collective_rpc("depn_status")[0]
    used = min(settings.tenants, settings.batch)
    if identity_status["loads"] or status["loads"] < used or status["overflows"] or status["unknown"]:
        raise RuntimeError(f"masks were not applied as intended: (b) {identity_status}, (c) {status}")
    return ServingBenchResult(
        settings=settings, vocab_size=vocab, versions={"vllm": vllm.__version__, "torch": torch.__version__,
                                                       "python": platform.python_version()},
        cpu_count=os.cpu_count(), measurements=measurements, summary=_summarize(settings, measurements),
        depn_status=status,
    )


def _interleaved(
    settings: BenchSettings, engines: dict, vocab: int, on_measurement: Callable[[Measurement, bool], None]
) -> list[Measurement]:
    """Bind (c)'s masks, then run the same batch on each engine, rotating the order every round."""
    import random

    import vllm

    from depn_serve.serving.request import MaskRequest

    tenants = tenant_masks(settings)
    for tenant, packed in tenants.items():
        engines["depn-masked"].collective_rpc("depn_bind", args=(tenant, 1, packed))
    names = list(tenants)

    def params(config: ConfigName, i: int) -> vllm.SamplingParams:
        extra = MaskRequest(names[i % len(names)]).to_extra_args() if config == "depn-masked" else None
        return vllm.SamplingParams(max_tokens=settings.max_tokens, temperature=0, ignore_eos=True, extra_args=extra)

    measurements = []
    for round_ in range(settings.rounds + 1):
        rng = random.Random(settings.seed * 1000 + round_)  # fresh prompts each round (no prefix-cache hits)
        prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(settings.prompt_tokens)]}
                   for _ in range(settings.batch)]
        for config in CONFIGS[round_ % 3:] + CONFIGS[: round_ % 3]:
            m = _timed(engines[config], prompts, [params(config, i) for i in range(settings.batch)], config, round_)
            on_measurement(m, round_ == 0)
            if round_ > 0:
                measurements.append(m)
    return measurements


def _timed(llm, prompts: list[dict], params: list, config: ConfigName, round_: int) -> Measurement:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    tpot = statistics.mean(
        (o.metrics.last_token_ts - o.metrics.first_token_ts) / (n - 1) for o, n in zip(outputs, tokens)
    )
    return Measurement(config=config, round=round_, seconds=seconds, output_tokens=sum(tokens),
                       tokens_per_s=sum(tokens) / seconds, tpot_ms=tpot * 1000)


def _summarize(settings: BenchSettings, measurements: list[Measurement]) -> list[ConfigSummary]:
    def runs(config: ConfigName) -> list[Measurement]:
        return [m for m in measurements if m.config == config]

    def figures(config: ConfigName) -> tuple[float, float, float]:
        tps = [m.tokens_per_s for m in runs(config)]
        return statistics.median(tps), statistics.median(m.tpot_ms for m in runs(config)), max(tps)

    base_tps, base_tpot, base_best = figures("vllm")
    summary = []
    for config in CONFIGS:
        tps, tpot, best = figures(config)
        summary.append(ConfigSummary(
            config=config, label=LABELS[config].format(tenants=settings.tenants), tokens_per_s=tps, tpot_ms=tpot,
            throughput_ratio=tps / base_tps, latency_ratio=base_tpot / tpot, best_tokens_per_s=best,
            best_ratio=best / base_best,
        ))
    return summary
