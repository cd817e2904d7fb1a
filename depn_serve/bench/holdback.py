"""The scheduler's hold-back per engine step, in pure Python (no vLLM): `KeyQueues.feed` as the engine core calls it
once a step, while one key floods the queue (0, 20,000 or 100,000 requests queued) next to a few other keys, with
fewer slots than keys. A simulated engine starts what it is handed, runs each request a fixed number of steps, and
new requests keep arriving, so the queue stays as long while it is timed."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from depn_serve.serving.queues import KeyQueues

STEP_S = 0.02  # simulated time per engine step


@dataclass(frozen=True)
class HoldbackRow:
    flood: int  # requests the flooding key keeps queued
    queued: int  # requests queued, all keys together
    median_us: float
    p99_us: float
    fed_per_step: float


def _step_times(flood: int, others: int, per_other: int, slots: int, max_active: int, length: int,
                steps: int) -> tuple[list[float], int, int]:
    """Seconds of each step's `feed`, the requests queued at the start, and how many were handed over in all."""
    queues: KeyQueues[str] = KeyQueues()  # each request is its key
    serial = 0

    def arrive(key: str, now: float) -> None:
        nonlocal serial
        serial += 1
        queues.add(key, str(serial), key, now)

    for _ in range(flood):
        arrive("flood", 0.0)
    for k in range(others):
        for _ in range(per_other):
            arrive(f"key{k}", 0.0)
    queued = len(queues)
    running: list[tuple[int, str]] = []  # (step it finishes, key)
    times, handed = [], 0
    for step in range(steps):
        now = step * STEP_S
        running = [(end, key) for end, key in running if end > step]
        held = {key for _, key in running}
        started = time.perf_counter()
        fed = queues.feed(held, max_active - len(running), slots, now, 1.0)
        times.append(time.perf_counter() - started)
        handed += len(fed.requests)
        for key in fed.requests:
            running.append((step + length, key))
            arrive(key, now)  # its tenant sends another: the queue stays as long
    return times, queued, handed


def run_holdback(floods: tuple[int, ...] = (0, 20_000, 100_000), others: int = 7, per_other: int = 50,
                 slots: int = 4, max_active: int = 64, length: int = 20, steps: int = 10_000) -> list[HoldbackRow]:
    rows = []
    for flood in floods:
        times, queued, handed = _step_times(flood, others, per_other, slots, max_active, length, steps)
        p99 = statistics.quantiles(times, n=100)[98]
        rows.append(HoldbackRow(flood, queued, statistics.median(times) * 1e6, p99 * 1e6, handed / steps))
    return rows


def markdown(rows: list[HoldbackRow]) -> str:
    lines = ["| flooding key's queue | all queued | µs per step, median | µs per step, p99 | handed over per step |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.flood:,} | {r.queued:,} | {r.median_us:.1f} | {r.p99_us:.1f} | {r.fed_per_step:.1f} |"
              for r in rows]
    return "\n".join(lines)
