"""The masked SiluAndMul kernel alone, against its unmasked twin and the torch paths, at the Llama-3-8B MLP shape.

    python -m depn_serve.bench.kernel [--tokens 1,16,...] [--intermediate 14336] [--masks 10000] [--json PATH]

Variants, all bf16 by default, same x per token count:
  triton_unmasked  the fused kernel with the mask compiled out (the fair baseline)
  triton_masked    the fused kernel, a table of `--masks` resident packed rows, a different random row per token
  torch_unmasked   eager `F.silu(g) * u`
  triton_mask      the mask alone on an [tokens, intermediate] activation (`kernels.mask_triton`): what the engine
                   runs on CUDA now, after vLLM's own SiluAndMul
  torch_bits       the torch path (the engine's off CUDA): eager silu * u times the token's keep bits expanded from
                   the same table of `--masks` packed rows (`kernels.keep_rows`)
  torch_rows       the path before masks were packed: eager silu * u, then index_select of a bf16 keep row from a
                   66-row table, and a multiply

The variants alternate in one process (each round times every variant over `--launches` launches, in a shuffled
order), so slow phases of the machine hit all of them; the masked/unmasked ratio is taken per round and reported
with a 95 % confidence interval. On CUDA the launches are captured in a CUDA graph by default (the kernel as vLLM
runs it in decode, without Python launch overhead); `--no-graphs` times eager launches.

Needs only torch, numpy and (for the kernels) triton: no vLLM, no pydantic. `--device cpu` runs the Triton kernels
in Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported) as a smoke test with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

VARIANTS = ("triton_unmasked", "triton_masked", "triton_mask", "torch_unmasked", "torch_bits", "torch_rows")
CURRENT_ROWS = 66  # the table before packing: 64 tenant slots + identity + deny, one bf16 row each


@dataclass(frozen=True)
class KernelTiming:
    tokens: int
    median_us: dict[str, float]  # per variant
    ratio_mean: float  # triton_masked / triton_unmasked, mean of the per-round ratios
    ratio_ci95: tuple[float, float]  # mean +- 1.96 sd / sqrt(rounds)
    ratio_median: float  # of the median times
    masked_gbps: float  # bytes the masked kernel moves (x, words, index, out) / its median time
    unmasked_gbps: float
    identical_fraction: float  # masked Triton elements bit-identical to the torch reference


def table_bytes(masks: int, layers: int, intermediate: int) -> dict[str, int]:
    """Device memory of every mask for the whole model: packed int32 words vs one bf16 value per neuron."""
    words = -(-intermediate // 32)
    return {"packed_bits": masks * layers * words * 4, "bf16_rows": masks * layers * intermediate * 2}


def _ci95(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean - half, mean + half


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def _check(k, x, words, index) -> float:
    """Masked Triton vs the torch reference on the shape being timed; returns the bit-identical fraction. The
    mask logic must be exact (masked == unmasked * keep, dropped neurons exactly 0); the values only agree up to
    the last bits of exp (Triton's vs torch's), so they are compared with the dtype's rounding tolerance."""
    import torch

    d = x.shape[1] // 2
    masked = k.silu_and_mul_masked_triton(x, words, index)
    plain = k.silu_and_mul_triton(x)
    keep = k.keep_rows(words, index, d, x.dtype)
    reference = k.silu_and_mul_masked_torch(x, words, index)
    if not torch.equal(masked, plain * keep):
        raise AssertionError(f"masked Triton kernel != unmasked kernel * keep rows at {tuple(x.shape)}: "
                             "the mask bits are read or applied wrongly")
    if masked[keep == 0].ne(0).any():
        raise AssertionError(f"masked Triton kernel leaves dropped neurons non-zero at {tuple(x.shape)}")
    tolerance = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5)}.get(x.dtype, (1.6e-2, 1e-5))
    try:
        torch.testing.assert_close(masked, reference, rtol=tolerance[0], atol=tolerance[1])
    except AssertionError as error:
        raise AssertionError(f"masked Triton kernel differs from the torch reference at {tuple(x.shape)} "
                             f"{x.dtype} beyond rounding:\n{error}") from None
    return masked.eq(reference).float().mean().item() if masked.numel() else 1.0


def _timer(device: str, graphs: bool, launches: int) -> Callable[[Callable[[], object]], Callable[[], float]]:
    """fn -> a callable timing `launches` calls of fn, returning microseconds per launch."""
    import torch

    def prepare(fn):
        if device == "cpu":
            def run() -> float:
                start = time.perf_counter()
                for _ in range(launches):
                    fn()
                return (time.perf_counter() - start) / launches * 1e6
            return run

        step = fn
        if graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(launches):
                    fn()
            step = graph.replay
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record()
            if graphs:
                step()
            else:
                for _ in range(launches):
                    step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / launches
        return run
    return prepare


def measure(token_counts: list[int], intermediate: int, masks: int, rounds: int, launches: int, device: str,
            dtype_name: str = "bfloat16", graphs: bool = True, seed: int = 0) -> list[KernelTiming]:
    import torch
    import torch.nn.functional as F

    from depn_serve.serving import kernels as k

    if masks < 2:
        raise ValueError("--masks must be at least 2 (the identity and deny rows are part of the table)")
    dtype = getattr(torch, dtype_name)
    size = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    d, n_words = intermediate, k.words_per_row(intermediate)

    words = torch.randint(-2**31, 2**31, (masks, n_words), dtype=torch.int32, generator=generator)
    words[:2] = torch.from_numpy(k.reserved_words(d))
    words = words.to(device)
    current = (torch.rand(CURRENT_ROWS, d, generator=generator) > 0.01).to(dtype).to(device)

    results = []
    for tokens in token_counts:
        x = torch.randn(tokens, 2 * d, generator=generator).to(dtype).to(device)
        rows = torch.randperm(masks, generator=generator)[:tokens] if tokens <= masks else \
            torch.randint(0, masks, (tokens,), generator=generator)
        index = rows.to(torch.int32).to(device)
        index_current = torch.randint(0, CURRENT_ROWS, (tokens,), generator=generator, dtype=torch.int32).to(device)
        identical = _check(k, x, words, index)
        out_plain, out_masked = torch.empty(tokens, d, dtype=dtype, device=device), \
            torch.empty(tokens, d, dtype=dtype, device=device)
        gate, up = x[:, :d], x[:, d:]
        fns = {
            "triton_unmasked": lambda: k.silu_and_mul_triton(x, out=out_plain),
            "triton_masked": lambda: k.silu_and_mul_masked_triton(x, words, index, out=out_masked),
            "torch_unmasked": lambda: F.silu(gate) * up,
            "triton_mask": lambda: k.mask_triton(out_plain, words, index, out=out_masked),
            "torch_bits": lambda: k.silu_and_mul_masked_torch(x, words, index),
            "torch_rows": lambda: (F.silu(gate) * up) * torch.index_select(current, 0, index_current),
        }
        for fn in fns.values():  # compile the kernels, warm the allocator
            for _ in range(3):
                fn()
        if device != "cpu":
            torch.cuda.synchronize()
        prepare = _timer(device, graphs, launches)
        timers = {name: prepare(fn) for name, fn in fns.items()}
        for timer in timers.values():  # one untimed pass of each, graphs included
            timer()
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            names = list(VARIANTS)
            order.shuffle(names)
            for name in names:
                samples[name].append(timers[name]())
        ratios = [_div(m, p) for m, p in zip(samples["triton_masked"], samples["triton_unmasked"])]
        median = {name: statistics.median(values) for name, values in samples.items()}
        plain_bytes = tokens * 3 * d * size
        masked_bytes = plain_bytes + tokens * (n_words * 4 + 4)
        results.append(KernelTiming(
            tokens=tokens, median_us=median, ratio_mean=statistics.fmean(ratios), ratio_ci95=_ci95(ratios),
            ratio_median=_div(median["triton_masked"], median["triton_unmasked"]),
            masked_gbps=_div(masked_bytes / 1e3, median["triton_masked"]),  # bytes/µs = MB/s; /1e3 -> GB/s
            unmasked_gbps=_div(plain_bytes / 1e3, median["triton_unmasked"]),
            identical_fraction=identical,
        ))
        del timers, fns
        if device != "cpu":
            torch.cuda.empty_cache()
    return results


def markdown(results: list[KernelTiming], memory: dict[str, int], masks: int, layers: int,
             intermediate: int) -> str:
    lines = [
        "| tokens | Triton unmasked µs | Triton masked µs | Triton mask alone µs | torch silu*u µs | torch bits µs | "
        "torch rows µs | masked / unmasked (95 % CI) | masked GB/s | unmasked GB/s | bit-identical |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        m = r.median_us
        lines.append(
            f"| {r.tokens} | {m['triton_unmasked']:.2f} | {m['triton_masked']:.2f} | {m['triton_mask']:.2f} | "
            f"{m['torch_unmasked']:.2f} | {m['torch_bits']:.2f} | {m['torch_rows']:.2f} | "
            f"{r.ratio_mean:.3f} ({r.ratio_ci95[0]:.3f}–{r.ratio_ci95[1]:.3f}) | "
            f"{r.masked_gbps:.1f} | {r.unmasked_gbps:.1f} | {r.identical_fraction:.4%} |")
    lines.append("")
    lines.append(f"Masks on the device for {masks:,} masks x {layers} layers x {intermediate:,} neurons: packed bits "
                 f"{memory['packed_bits'] / 1e6:,.1f} MB vs bf16 rows {memory['bf16_rows'] / 1e6:,.1f} MB "
                 f"({memory['bf16_rows'] / memory['packed_bits']:.1f}x).")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m depn_serve.bench.kernel", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1,16,64,256,1024,4096,8192", help="comma-separated token counts")
    parser.add_argument("--intermediate", type=int, default=14336, help="MLP width (Llama-3-8B: 14336)")
    parser.add_argument("--masks", type=int, default=10_000, help="resident packed rows the masked kernel reads")
    parser.add_argument("--layers", type=int, default=32, help="layers, for the memory line only")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (each times every variant)")
    parser.add_argument("--launches", type=int, default=None, help="launches per timing (default 50; cpu 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="time CUDA-graph replays (cuda only; --no-graphs: eager launches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--device cpu needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from depn_serve.serving import kernels as k

    if not k.triton_available():
        raise SystemExit("triton is not installed: the kernel benchmark needs it")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu for the interpreter smoke run)")
    launches = args.launches or (2 if args.device == "cpu" else 50)
    graphs = args.graphs and args.device == "cuda"
    token_counts = [int(t) for t in args.tokens.split(",") if t.strip()]
    results = measure(token_counts, args.intermediate, args.masks, args.rounds, launches, args.device, args.dtype,
                      graphs, args.seed)
    memory = table_bytes(args.masks, args.layers, args.intermediate)
    import triton

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu (Triton interpreter, "\
        f"{platform.processor() or platform.machine()})"
    print(f"{device_name}; torch {torch.__version__}, triton {triton.__version__}; {args.dtype}, intermediate "
          f"{args.intermediate}, {args.masks} resident masks, {args.rounds} rounds x {launches} launches"
          f"{', CUDA graphs' if graphs else ''}\n")
    print(markdown(results, memory, args.masks, args.layers, args.intermediate))
    if args.json:
        args.json.write_text(json.dumps({
            "device": device_name, "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
            "intermediate": args.intermediate, "masks": args.masks, "layers": args.layers, "rounds": args.rounds,
            "launches": launches, "graphs": graphs, "seed": args.seed,
            "results": [asdict(r) for r in results], "memory_bytes": memory,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
