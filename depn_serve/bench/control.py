"""The control plane at scale: a tenants file with thousands of tenants, through the server's own state (parsing,
start-up binding, authentication, a reload). The workers are real `MaskSlots` called in process, so the figures are
depn-serve's own cost without vLLM's inter-process calls."""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from pathlib import Path

from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n, random_order
from depn_serve.bench.soak import rss_mib
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.serving.server.metrics import DepnMetrics
from depn_serve.serving.server.state import ServingState
from depn_serve.serving.server.store import MaskStore
from depn_serve.serving.server.tenants import TenantsConfig
from depn_serve.serving.slots import MaskSlots


class ControlPlaneReport(BaseModel):
    tenants: int
    masked_tenants: int
    tenants_file_kib: float
    start_seconds: float  # parse the file, load and check the masks, bind every tenant
    auth_p50_us: float
    auth_p99_us: float
    reload_seconds: float  # one tenant added to the file, applied
    rss_start_mib: float
    rss_end_mib: float

    def markdown(self) -> str:
        rows = [("tenants (with a mask)", f"{self.tenants:,} ({self.masked_tenants:,})"),
                ("tenants file", f"{self.tenants_file_kib:,.0f} KiB"),
                ("start-up: parse, check masks, bind all", f"{self.start_seconds:.2f} s"),
                ("authentication p50 / p99", f"{self.auth_p50_us:.1f} / {self.auth_p99_us:.1f} µs"),
                ("reload after `depn tenants add`", f"{self.reload_seconds * 1000:.0f} ms"),
                ("process RSS before / after", f"{self.rss_start_mib:,.0f} / {self.rss_end_mib:,.0f} MiB")]
        return "\n".join(["| control plane | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])


def run_control_bench(model: Path, work: Path, tenants: int = 5000, masked: int = 200, lookups: int = 20000,
                      seed: int = 0) -> ControlPlaneReport:
    logging.getLogger("depn_serve.serving").setLevel(logging.ERROR)  # one "unverified" line per random mask
    rss_start = rss_mib()
    shape, fingerprint = mlp_shape(read_config(model)), model_fingerprint(model)
    config = TenantsConfig()
    keys = [config.add_tenant(f"t{i:05d}", ["main"] if i < masked else [], allow_unmasked=i >= masked)
            for i in range(tenants)]
    path = work / "tenants.yaml"
    config.save(path)
    store = MaskStore(work / "store")
    order = random_order(shape.dims, seed)
    for i in range(masked):
        mask = NeuronMask.create(f"t{i:05d}", fingerprint, shape, first_n(order[i:], 64, shape.dims),
                                 MaskProvenance(method="random"))
        store.put(f"t{i:05d}", "main", mask.to_bytes(), mask, ["main"])

    slots = MaskSlots(64, shape.num_layers, shape.intermediate_size, (0, shape.intermediate_size),
                      "cpu", deny_untagged=True)

    async def workers(method: str, args: tuple) -> list:
        if method == "depn_status":
            return [slots.status()]
        for binding in args[0] if method == "depn_bind_many" else [args]:
            slots.bind(*binding)
        return [None]

    async def scenario() -> tuple[float, list[float], float]:
        started = time.perf_counter()
        state = ServingState(path, MaskStore(work / "store"), fingerprint, shape, "x" * 32,
                             DepnMetrics(CollectorRegistry()), allow_unverified=True)
        state.prepare()
        await state.start(workers)
        start_seconds = time.perf_counter() - started
        rng = random.Random(seed)
        times = []
        for _ in range(lookups):
            key = rng.choice(keys)
            t0 = time.perf_counter()
            tenant = await state.authenticate(key)
            state.admit(tenant.id)
            times.append(time.perf_counter() - t0)
        config.add_tenant("late", [], allow_unmasked=True)
        config.save(path)
        t0 = time.perf_counter()
        await state.refresh_tenants()
        reload_seconds = time.perf_counter() - t0
        assert state.admit("late")
        return start_seconds, times, reload_seconds

    start_seconds, times, reload_seconds = asyncio.run(scenario())
    q = statistics.quantiles(times, n=100)
    return ControlPlaneReport(tenants=tenants, masked_tenants=masked, tenants_file_kib=path.stat().st_size / 1024,
                              start_seconds=start_seconds, auth_p50_us=q[49] * 1e6, auth_p99_us=q[98] * 1e6,
                              reload_seconds=reload_seconds, rss_start_mib=rss_start, rss_end_mib=rss_mib())
