"""Cost of the mask inside one MLP, measured precisely: the end-to-end serving benchmark on a shared 2-core machine
swings by tens of percent from run to run, far more than the effect it looks for.

Times a Llama MLP (gate_up -> SiluAndMul -> down) with and without the masked path the patched `down_proj` runs
on CPU (`kernels.mask_bits_`: each token's row of resident bits ANDed into the activation in place), at
decode-sized and prefill-sized token counts, in the same process, interleaved, with every token of the batch
using a different slot.
"""

from __future__ import annotations

import statistics

from pydantic import BaseModel, ConfigDict, Field


class MlpOverhead(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int
    plain_us: float = Field(description="fastest MLP time without the mask (other load only ever slows a run)")
    masked_us: float = Field(description="fastest MLP time with the mask (the engine's CPU op)")
    ratio: float = Field(description="plain / masked: 1.0 = free, 0.98 = 2 % slower")
    median_ratio: float = Field(description="the same ratio from median times")


def mlp_overhead(hidden: int, intermediate: int, dtype: str, token_counts: tuple[int, ...], slots: int = 66,
                 repeats: int = 25, seed: int = 0) -> list[MlpOverhead]:
    import torch
    import torch.nn.functional as F
    from torch.utils import benchmark

    from depn_serve.serving.kernels import keep_table, keep_words, mask_bits_

    torch.manual_seed(seed)
    kind = getattr(torch, dtype)
    gate_up = torch.randn(2 * intermediate, hidden, dtype=kind) / hidden**0.5
    down = torch.randn(hidden, intermediate, dtype=kind) / intermediate**0.5
    words = torch.from_numpy(keep_words((torch.rand(slots, intermediate) < 0.01).numpy()))
    table = keep_table(kind, "cpu")

    def plain(x):
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down)

    def masked(x, index):
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        act = F.silu(g) * u
        mask_bits_(act, words, index, table)
        return F.linear(act, down)

    results = []
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, dtype=kind)
        index = torch.randint(0, slots, (max(token_counts),), dtype=torch.int32)
        timers = {
            "plain": benchmark.Timer("f(x)", globals={"f": plain, "x": x}),
            "masked": benchmark.Timer("f(x, i)", globals={"f": masked, "x": x, "i": index}),
        }
        samples: dict[str, list[float]] = {"plain": [], "masked": []}
        for _ in range(repeats):  # interleaved, so slow phases of the machine hit both
            for name, timer in timers.items():
                samples[name].append(timer.blocked_autorange(min_run_time=0.1).median)
        plain_s, masked_s = min(samples["plain"]), min(samples["masked"])
        results.append(MlpOverhead(
            tokens=tokens, plain_us=plain_s * 1e6, masked_us=masked_s * 1e6, ratio=plain_s / masked_s,
            median_ratio=statistics.median(samples["plain"]) / statistics.median(samples["masked"]),
        ))
    return results
