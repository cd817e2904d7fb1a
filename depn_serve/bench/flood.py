"""`depn bench flood`: one tenant floods a real `depn serve`; how much slower do another tenant's tokens come?

A quiet tenant streams completions (a few at a time); its inter-token latency (per request: the time from its first
streamed token to its last, over the tokens between) and its time to first token are measured in three phases on
one server: alone; while a flooding tenant keeps many requests in flight and asks
for more than its limits allow (`n`, prompt lists) under the tenants file's default limits; and the same flood
with the flooding tenant's limits lifted (the tenants file changed while serving). A third tenant with a mask of
its own keeps the mask slots over-subscribed (`--max-mask-slots 2`), so the scheduler's slot hold-back runs on
every step with the flood's requests waiting. Weights are the test-bed's; the figures are about speed only.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n, random_order
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.fileio import atomic_write_text
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records
from depn_serve.serving.client import AdminClient
from depn_serve.serving.process import ServerProcess
from depn_serve.serving.server.tenants import Limits, TenantsConfig

TENANTS = ("quiet", "flood", "churn")
UNLIMITED = Limits(max_in_flight=None, max_n=None, max_prompts=None, tokens_per_minute=None)


class FloodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seconds: float = Field(20.0, gt=0, description="seconds per phase")
    quiet_streams: int = Field(2, ge=1, description="the quiet tenant's streams in flight at once")
    quiet_tokens: int = Field(32, ge=2, description="tokens per quiet completion")
    flood_concurrency: int = Field(128, ge=1, description="the flooding tenant's requests in flight at once")
    flood_n: int = Field(8, ge=1, description="completions per flood request")
    flood_tokens: int = Field(16, ge=1, description="tokens per flood completion")
    flood_big_n: int = Field(512, ge=1, description="`n` of the oversized asks mixed into the flood")
    slots: int = Field(2, ge=1, description="mask slots: fewer than the masked tenants, so the hold-back works")


class Phase(BaseModel):
    name: str
    quiet_requests: int
    itl_p50_ms: float
    itl_p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    flood_statuses: dict[str, int]


class FloodReport(BaseModel):
    settings: FloodSettings
    phases: list[Phase]

    def write(self, path: Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=2))

    def markdown(self) -> str:
        rows = ["| phase | quiet requests | quiet ITL p50 / p99 (ms) | quiet TTFT p50 / p99 (ms) | flood answers |",
                "|---|---:|---:|---:|---|"]
        for p in self.phases:
            statuses = ", ".join(f"{s}: {n}" for s, n in sorted(p.flood_statuses.items())) or "-"
            rows.append(f"| {p.name} | {p.quiet_requests} | {p.itl_p50_ms:.1f} / {p.itl_p99_ms:.1f} | "
                        f"{p.ttft_p50_ms:.0f} / {p.ttft_p99_ms:.0f} | {statuses} |")
        return "\n".join(rows)


def run_flood(testbed: Path, work: Path, settings: FloodSettings, log=print) -> FloodReport:
    model_dir = testbed / "model"
    shape, fingerprint = mlp_shape(read_config(model_dir)), model_fingerprint(model_dir)
    prompts = [r.prompt for r in load_records(testbed / "records.jsonl")]
    config = TenantsConfig()
    keys = {t: config.add_tenant(t, ["main"]) for t in TENANTS}
    config.save(work / "tenants.yaml")
    (work / "admin.token").write_text("admin-" + "f" * 32)
    server = ServerProcess(model_dir, work / "tenants.yaml", work / "store", work / "admin.token", work / "server.log",
                           max_mask_slots=settings.slots, allow_unverified=True)
    log("starting depn serve …")
    server.start()
    try:
        admin = AdminClient(server.url, work / "admin.token")
        for seed, tenant in enumerate(TENANTS):
            off = first_n(random_order(shape.dims, seed), shape.num_layers * shape.intermediate_size // 100,
                          shape.dims)
            NeuronMask.create(tenant, fingerprint, shape, off, MaskProvenance(method="random")).save(
                work / f"{tenant}.safetensors")
            admin.push(tenant, "main", work / f"{tenant}.safetensors")
        model = server.model_id(keys["quiet"])
        phases = []
        for name, flood, limits in (("quiet tenant alone", False, None), ("flood, default limits", True, None),
                                    ("flood, no limits", True, UNLIMITED)):
            config.tenant("flood").limits = limits
            config.save(work / "tenants.yaml")  # applied by the next request, while serving
            log(f"{name} for {settings.seconds:.0f} s …")
            phases.append(asyncio.run(_phase(server.url, keys, model, prompts, settings, name, flood)))
        return FloodReport(settings=settings, phases=phases)
    finally:
        server.stop()


async def _phase(url: str, keys: dict[str, str], model: str, prompts: list[str], settings: FloodSettings,
                 name: str, flood: bool) -> Phase:
    itl: list[float] = []  # per quiet request: seconds per token after its first
    ttft: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + settings.seconds
    limits = httpx.Limits(max_connections=settings.flood_concurrency + settings.quiet_streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        def ask(tenant: str, i: int, **body) -> dict:
            return {"json": {"model": model, "prompt": prompts[i % len(prompts)], "temperature": 0, **body},
                    "headers": {"Authorization": f"Bearer {keys[tenant]}"}}

        async def quiet(worker: int) -> None:
            i = worker
            while time.monotonic() < deadline:
                sent, arrivals = time.monotonic(), []
                async with http.stream("POST", "/v1/completions", **ask("quiet", i, max_tokens=settings.quiet_tokens,
                                                                        stream=True, ignore_eos=True)) as answer:
                    async for line in answer.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())
                if len(arrivals) > 1:
                    ttft.append(arrivals[0] - sent)
                    itl.append((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1))
                i += settings.quiet_streams

        async def flooder(worker: int) -> None:
            i = worker
            while time.monotonic() < deadline:
                big = i % 10 == 0  # every tenth ask wants far more than a tenant may
                body = {"max_tokens": settings.flood_tokens, "n": settings.flood_big_n if big else settings.flood_n,
                        "temperature": 1.0}
                answer = await http.post("/v1/completions", **ask("flood", i, **body))
                statuses[str(answer.status_code)] += 1
                if answer.status_code == 429:
                    await asyncio.sleep(0.05)
                i += settings.flood_concurrency

        async def churn() -> None:
            i = 0
            while time.monotonic() < deadline:
                await http.post("/v1/completions", **ask("churn", i, max_tokens=4))
                i += 1

        tasks = [quiet(w) for w in range(settings.quiet_streams)]
        if flood:
            tasks += [flooder(w) for w in range(settings.flood_concurrency)] + [churn()]
        await asyncio.gather(*tasks)
    q, t = _percentiles(itl), _percentiles(ttft)
    return Phase(name=name, quiet_requests=len(itl), itl_p50_ms=1000 * q[49], itl_p99_ms=1000 * q[98],
                 ttft_p50_ms=1000 * t[49], ttft_p99_ms=1000 * t[98], flood_statuses=dict(statuses))


def _percentiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=100) if len(values) > 1 else [float("nan")] * 99


