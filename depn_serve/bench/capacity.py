"""Resident masks at a model's shape: the device table `MaskSlots` allocates, and the slot traffic of a steady load.

The table holds every slot as bits, so its size is measured (the tensor's bytes, and on CUDA what the allocator
handed out) against what the bf16 rows it replaced would take. Then `masks` tenants, each with its own random
mask (`fraction` of its neurons off, drawn at random), are bound and sent through `assign` in steps of `batch`
tenants, twice over: the first round loads every mask once, and in the second (the steady state, all masks
resident) nothing may load or be evicted. With fewer slots than masks the LRU works, and the second round shows
what it costs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from depn_serve.serving.kernels import words_per_row
from depn_serve.serving.request import mask_key
from depn_serve.serving.slots import RESERVED_SLOTS, MaskSlots


class RoundCounts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    loads: int
    evictions: int
    overflows: int
    assign_ms_per_step: float = Field(description="mean time of one step's `assign` (host side, uploads included)")


class CapacityReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int
    intermediate: int
    masks: int
    slots: int
    batch: int
    device: str
    table_bytes: int = Field(description="the resident table's tensor, reserved rows included")
    allocated_bytes: int | None = Field(description="CUDA allocator growth for the table; None off CUDA")
    bf16_rows_bytes: int = Field(description="the same slots as bf16 keep rows")
    bind_s: float
    first: RoundCounts
    steady: RoundCounts

    def markdown(self) -> str:
        gib = 1 << 30
        per_gib = gib // (self.layers * words_per_row(self.intermediate) * 4)
        allocated = "" if self.allocated_bytes is None else f" (CUDA allocator: {self.allocated_bytes / 1e6:,.0f} MB)"
        return (
            f"{self.masks:,} masks of {self.layers} layers x {self.intermediate:,} neurons, {self.slots:,} slots on "
            f"{self.device}, steps of {self.batch} tenants\n\n"
            f"| | value |\n|---|---:|\n"
            f"| resident table, bits | {self.table_bytes / 1e6:,.0f} MB{allocated} |\n"
            f"| the same slots as bf16 rows | {self.bf16_rows_bytes / 1e6:,.0f} MB |\n"
            f"| masks per GiB as bits | {per_gib:,} |\n"
            f"| bind {self.masks:,} masks | {self.bind_s:.2f} s |\n"
            f"| first round: loads / evictions / overflows | {self.first.loads:,} / {self.first.evictions:,} / "
            f"{self.first.overflows:,} ({self.first.assign_ms_per_step:.2f} ms a step) |\n"
            f"| steady round: loads / evictions / overflows | {self.steady.loads:,} / {self.steady.evictions:,} / "
            f"{self.steady.overflows:,} ({self.steady.assign_ms_per_step:.2f} ms a step) |\n"
        )


def run_capacity(layers: int, intermediate: int, masks: int, slots: int | None = None, batch: int = 64,
                 fraction: float = 0.01, device: str = "cpu", seed: int = 0) -> CapacityReport:
    slots = masks if slots is None else slots
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    before = torch.cuda.memory_allocated(dev) if cuda else 0
    table = MaskSlots(slots, layers, intermediate, (0, intermediate), dev)
    allocated = torch.cuda.memory_allocated(dev) - before if cuda else None
    rng = np.random.default_rng(seed)
    count = max(1, round(fraction * layers * intermediate))
    packed = []
    for _ in range(masks):  # `count` random neurons off in each mask
        off = np.zeros(layers * intermediate, dtype=bool)
        off[rng.integers(0, off.size, count)] = True
        packed.append(np.packbits(off.reshape(layers, intermediate), axis=1, bitorder="little").tobytes())
    start = time.perf_counter()
    for tenant, bits in enumerate(packed):
        table.bind(f"t{tenant}", f"v{tenant}", bits)
    bind_s = time.perf_counter() - start

    def round_() -> RoundCounts:
        counts = table.counters
        loads, evictions, overflows = counts.loads, counts.evictions, counts.overflows
        steps = [[(f"t{t}", f"v{t}") for t in range(first, min(first + batch, masks))]
                 for first in range(0, masks, batch)]
        begin = time.perf_counter()
        for step in steps:  # each request names the mask it was admitted with, as a server's do
            table.assign(step, live=lambda s=step: {mask_key(*r) for r in s})
        if cuda:
            torch.cuda.synchronize(dev)
        return RoundCounts(loads=counts.loads - loads, evictions=counts.evictions - evictions,
                           overflows=counts.overflows - overflows,
                           assign_ms_per_step=1000 * (time.perf_counter() - begin) / len(steps))

    first, steady = round_(), round_()
    return CapacityReport(
        layers=layers, intermediate=intermediate, masks=masks, slots=slots, batch=batch, device=str(dev),
        table_bytes=table.words.nbytes, allocated_bytes=allocated,
        bf16_rows_bytes=layers * (slots + RESERVED_SLOTS) * intermediate * 2, bind_s=bind_s, first=first,
        steady=steady,
    )
