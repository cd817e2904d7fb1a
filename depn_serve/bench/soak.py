"""`depn bench soak`: a real `depn serve` on loopback under load while masks are pushed and dropped.

Tenants: one *stable* tenant whose mask never changes (every greedy answer it gets is compared with the HF
reference under that mask, token for token) and churn tenants whose masks are replaced or dropped every few seconds
(dropped = refused with 403 until the next push, a documented answer). There are fewer mask slots than tenants, so
the scheduler's hold-back and the slot LRU work all the time. Clients stream or not, completions or chat, at random,
while hostile requests (odd methods, paths, credentials, broken masks) hit the same server. A failure is anything
else: an unexpected status, a broken stream, a stable answer that differs, a push that fails, a hostile request
answered with 5xx, an engine that dies. Then the faults (`faults.py`): kill -9 during mask changes and a disk that
refuses writes, each checked against the store and the HF reference.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import torch
from pydantic import BaseModel, Field

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n, random_order
from depn_serve.core.arch import load_model, mlp_shape
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records
from depn_serve.bench.faults import MASK_ID, FaultReport, Faults, hostile_request
from depn_serve.serving.process import ServerProcess
from depn_serve.editing import masked
from depn_serve.serving.client import AdminClient, AdminError
from depn_serve.serving.server.tenants import TenantsConfig

STABLE = "stable"
HOSTILE = "hostile"  # the tenant that admin-authenticated hostile requests may change


class SoakSettings(BaseModel):
    seconds: float = Field(600, gt=0, description="how long the load runs")
    tenants: int = Field(4, ge=3, description="tenants: one stable, the others churn")
    slots: int = Field(2, ge=1, description="mask slots (fewer than tenants)")
    concurrency: int = Field(8, ge=1, description="client requests in flight")
    push_every: float = Field(2.0, gt=0, description="seconds between two mask changes")
    max_tokens: int = Field(16, ge=1)
    mask_fraction: float = Field(0.25, gt=0, lt=1, description="share of MLP neurons each random mask switches off")
    prompts: int = Field(8, ge=1, description="record prompts the clients use")
    hostile_every: float = Field(0.05, gt=0, description="seconds between two hostile requests")
    kills: int = Field(4, ge=0, description="times the server is killed -9 during a mask change, then restarted")
    disk_faults: int = Field(4, ge=0, description="pushes made while the store's disk refuses writes")
    seed: int = 0


class SoakReport(BaseModel):
    settings: SoakSettings
    seconds: float
    requests: int
    completed: int
    streamed: int
    refused: dict[str, int]  # documented answers by status (403: a churn tenant between drop and push)
    failures: int
    failure_examples: list[str]
    checked: int  # stable answers compared with the HF reference
    prompts_changed: int  # prompts whose answer the stable mask changes (so the comparison can tell masks apart)
    hostile: int  # hostile requests sent (each must be answered below 500)
    pushes: int
    drops: int
    push_p50_ms: float
    push_p99_ms: float
    longest_wait_s: float  # the server's depn_first_token_wait_max_seconds
    rss_start_mib: float
    rss_end_mib: float
    faults: FaultReport
    healthy_at_end: bool

    @property
    def passed(self) -> bool:
        return not self.failures and not self.faults.problems and self.healthy_at_end

    def markdown(self) -> str:
        rows = [
            ("duration", f"{self.seconds:.0f} s"),
            ("requests (completed, streamed)", f"{self.requests:,} ({self.completed:,}, {self.streamed:,})"),
            ("documented refusals", ", ".join(f"{n} × {s}" for s, n in sorted(self.refused.items())) or "0"),
            ("**failures**", f"**{self.failures}**"),
            ("stable tenant's answers equal to the HF reference under its mask",
             (f"{self.checked:,} of {self.checked:,}" if not self.failures else f"{self.checked:,} checked")
             + f" ({self.prompts_changed} of {self.settings.prompts} prompts answered differently unmasked)"),
            ("hostile requests (every one answered below 500)" if not self.failures else "hostile requests",
             f"{self.hostile:,}"),
            ("pushes / drops applied", f"{self.pushes} / {self.drops}"),
            ("push-to-active p50 / p99", f"{self.push_p50_ms:.0f} / {self.push_p99_ms:.0f} ms"),
            ("longest wait for a first token", f"{self.longest_wait_s:.2f} s"),
            ("API server RSS at start / end of the load", f"{self.rss_start_mib:,.0f} / {self.rss_end_mib:,.0f} MiB"),
            ("kill -9 during a push or drop, then restart (acknowledged before the kill)",
             f"{self.faults.kills} ({self.faults.kills_after_ack})"),
            ("pushes while the disk refused writes (507, old mask kept)", f"{self.faults.disk_faults}"),
            ("**faults survived** (store, checksums, listing and served masks agree)",
             f"**{self.faults.survived} of {self.faults.kills + self.faults.disk_faults}**"),
            ("engine healthy at the end", "yes" if self.healthy_at_end else "NO"),
        ]
        return "\n".join(["| soak | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (this one by default), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_soak(testbed: Path, work: Path, settings: SoakSettings, log: Callable[[str], None] = print) -> SoakReport:
    """Serve `testbed`'s model under load and mask churn for `settings.seconds`; the report counts everything."""
    from openai import AsyncOpenAI, PermissionDeniedError

    rng = random.Random(settings.seed)
    model_dir = testbed / "model"
    model, tokenizer = load_model(model_dir, "cpu", torch.float32)
    shape, fingerprint = mlp_shape(model.config), model_fingerprint(model_dir)
    prompts = [r.prompt for r in load_records(testbed / "records.jsonl")][: settings.prompts]
    count = int(settings.mask_fraction * shape.num_layers * shape.intermediate_size)
    masks_made = [0]

    def random_mask(tenant: str) -> Path:
        masks_made[0] += 1
        off = first_n(random_order(shape.dims, settings.seed * 10_000 + masks_made[0]), count, shape.dims)
        path = work / f"mask-{masks_made[0]}.safetensors"
        NeuronMask.create(tenant, fingerprint, shape, off, MaskProvenance(method="random")).save(path)
        return path

    def greedy(prompt: str) -> str:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_tokens,
                             do_sample=False, pad_token_id=0)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    stable_mask = random_mask(STABLE)
    with masked(model, NeuronMask.load(stable_mask).off):
        reference = {prompt: greedy(prompt) for prompt in prompts}
    changed = sum(greedy(prompt) != reference[prompt] for prompt in prompts)

    def reference_under(off: torch.Tensor) -> str:
        with masked(model, off):
            return greedy(prompts[0])

    config = TenantsConfig()
    churn = [f"churn{i}" for i in range(1, settings.tenants)]
    keys = {t: config.add_tenant(t, [MASK_ID]) for t in [STABLE, *churn, HOSTILE]}
    config.save(work / "tenants.yaml")
    admin_token, token_file = "admin-" + "s" * 32, work / "admin.token"
    token_file.write_text(admin_token)
    server = ServerProcess(model_dir, work / "tenants.yaml", work / "store", token_file,
                           work / "server.log", max_mask_slots=settings.slots, allow_unverified=True)
    log(f"starting depn serve ({settings.tenants} tenants, {settings.slots} slots) …")
    server.start()
    admin = AdminClient(server.url, token_file)
    try:
        admin.push(STABLE, MASK_ID, stable_mask)
        for tenant in [*churn, HOSTILE]:
            admin.push(tenant, MASK_ID, random_mask(tenant))
        hostile_mask = random_mask(HOSTILE).read_bytes()
        rss_start = rss_mib(server.proc.pid)
        stats: dict = {"requests": 0, "completed": 0, "streamed": 0, "checked": 0, "pushes": 0, "drops": 0,
                       "hostile": 0}
        refused: Counter[str] = Counter()
        failures: list[str] = []
        push_ms: list[float] = []
        has_mask = dict.fromkeys(churn, True)

        async def client_loop(deadline: float) -> None:
            clients = {t: AsyncOpenAI(base_url=server.url + "/v1", api_key=k, max_retries=0, timeout=120)
                       for t, k in keys.items()}
            model_id = (await clients[STABLE].models.list()).data[0].id
            while time.monotonic() < deadline:
                tenant = STABLE if rng.random() < 0.4 else rng.choice(churn)
                prompt, stream, chat = rng.choice(prompts), rng.random() < 0.5, rng.random() < 0.3
                stats["requests"] += 1
                try:
                    text = await _ask(clients[tenant], model_id, prompt, settings.max_tokens, stream, chat)
                except PermissionDeniedError as exc:
                    refused["403"] += 1
                    if tenant == STABLE:
                        failures.append(f"stable tenant refused: {exc}")
                    continue
                except Exception as exc:  # anything else is a failure: status, broken stream, timeout
                    failures.append(f"{tenant} {'stream' if stream else 'call'}: {type(exc).__name__}: {exc}")
                    continue
                stats["completed"] += 1
                stats["streamed"] += stream
                if tenant == STABLE:
                    stats["checked"] += 1
                    if text != reference[prompt]:
                        failures.append(f"stable answer differs for {prompt!r}: {text!r} != {reference[prompt]!r}")

        async def push_loop(deadline: float) -> None:
            loop = asyncio.get_running_loop()
            while time.monotonic() < deadline:
                await asyncio.sleep(settings.push_every)
                tenant = rng.choice(churn)
                try:
                    if has_mask[tenant] and rng.random() < 0.3:
                        await loop.run_in_executor(pusher, _timed_change, server.url, token_file, tenant, None)
                        stats["drops"] += 1
                        has_mask[tenant] = False
                    else:
                        path = random_mask(tenant)
                        push_ms.append(await loop.run_in_executor(pusher, _timed_change, server.url, token_file,
                                                                  tenant, path))
                        stats["pushes"] += 1
                        has_mask[tenant] = True
                except RuntimeError as exc:
                    failures.append(f"mask change for {tenant}: {exc}")

        async def hostile_loop(deadline: float) -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                while time.monotonic() < deadline:
                    await asyncio.sleep(settings.hostile_every)
                    method, path, headers, body = hostile_request(rng, keys, admin_token, HOSTILE, hostile_mask)
                    stats["hostile"] += 1
                    try:
                        answer = await http.request(method, path, headers=headers, content=body)
                    except httpx.HTTPError as exc:
                        failures.append(f"hostile {method} {path[:80]}: {type(exc).__name__}: {exc}")
                        continue
                    if answer.status_code >= 500:
                        failures.append(f"hostile {method} {path[:80]} {headers}: {answer.status_code} "
                                        f"{answer.text[:200]}")

        async def soak() -> None:
            deadline = time.monotonic() + settings.seconds
            await asyncio.gather(push_loop(deadline), hostile_loop(deadline),
                                 *(client_loop(deadline) for _ in range(settings.concurrency)))

        log(f"load for {settings.seconds:.0f} s …")
        started = time.perf_counter()
        # Mask changes come from a process of their own, as an operator's would: timed there, they do not wait for
        # this process's event loop, which drives the load.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pusher:
            pusher.submit(int).result()  # started before the clock runs
            asyncio.run(soak())
        seconds = time.perf_counter() - started
        metrics = server.metrics()
        match = re.search(r"^depn_first_token_wait_max_seconds (\S+)$", metrics, re.M)
        rss_end = rss_mib(server.proc.pid)
        faults = Faults(server, admin, work / "store", keys, churn, prompts[0], settings.max_tokens, reference_under,
                        random_mask, rng)
        for i in range(settings.kills + settings.disk_faults):
            log(f"fault {i + 1} of {settings.kills + settings.disk_faults} …")
            faults.kill_during_change() if i < settings.kills else faults.disk_refuses_writes()
        try:
            healthy = server.complete(keys[STABLE], prompts[0], settings.max_tokens) == reference[prompts[0]]
        except OSError:
            healthy = False
    finally:
        server.stop()
    q = statistics.quantiles(push_ms, n=100) if len(push_ms) > 1 else [push_ms[0] if push_ms else 0.0] * 99
    return SoakReport(settings=settings, seconds=seconds, requests=stats["requests"], completed=stats["completed"],
                      streamed=stats["streamed"], refused=dict(refused), failures=len(failures),
                      failure_examples=failures[:10], checked=stats["checked"], prompts_changed=changed,
                      hostile=stats["hostile"], pushes=stats["pushes"], drops=stats["drops"], push_p50_ms=q[49],
                      push_p99_ms=q[98],
                      longest_wait_s=float(match.group(1)) if match else float("nan"), rss_start_mib=rss_start,
                      rss_end_mib=rss_end, faults=faults.report, healthy_at_end=healthy)


def _timed_change(server: str, token_file: Path, tenant: str, mask_file: Path | None) -> float:
    """Push `mask_file` as the tenant's mask (None: drop it); milliseconds from sending it to the server's answer,
    which comes once the mask is bound in every worker and stored."""
    admin = AdminClient(server, token_file)
    started = time.perf_counter()
    try:
        if mask_file is None:
            admin.drop(tenant, MASK_ID)
        else:
            admin.push(tenant, MASK_ID, mask_file)
    except AdminError as exc:  # as plain text: it crosses the process boundary
        raise RuntimeError(str(exc)) from None
    return (time.perf_counter() - started) * 1000


async def _ask(client, model_id: str, prompt: str, max_tokens: int, stream: bool, chat: bool) -> str:
    """Greedy text for `prompt`, by completions or chat, streamed or not."""
    common = {"model": model_id, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if chat:
        answer = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        if not stream:
            return answer.choices[0].message.content
        return "".join([c.choices[0].delta.content or "" async for c in answer if c.choices])
    answer = await client.completions.create(prompt=prompt, **common)
    if not stream:
        return answer.choices[0].text
    return "".join([c.choices[0].text async for c in answer if c.choices])
