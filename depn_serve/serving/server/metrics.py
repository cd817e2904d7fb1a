"""Prometheus metrics, served on vLLM's own /metrics with a `depn_` prefix, to the metrics or the admin token only
(they name tenants; see `http.py`).

Tenant labels are bounded everywhere, the routing info's lists included: the first `max_tenant_labels` tenants (in
the order the server first sees them, which is the tenants file's order at start-up) get their own label value,
later ones share `_other`. With thousands of tenants, keep the limit at what your Prometheus can hold and read
per-tenant detail from `depn masks list`.
Worker-side figures (slots, loads, evictions) are fetched from the workers when /metrics is scraped.

With `--api-server-count N`, vLLM runs N API server processes and Prometheus' multiprocess mode: counters and the
push histogram are summed over the processes, gauges of the server's state take the value that shows trouble first
(the lowest store generation, the most tenants behind), and the collected figures (slots, first-token waits, tenants
in flight) are those of the process that answered the scrape.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from depn_serve.serving.request import mask_key

OTHER = "_other"


class DepnMetrics:
    def __init__(self, registry: CollectorRegistry, max_tenant_labels: int = 100, multiprocess: bool = False):
        """`multiprocess`: values go to prometheus_client's shared files, which vLLM's /metrics reads for every
        process; `registry` then holds only the collected figures, which `appended` gives to the HTTP layer."""
        self.max_tenant_labels = max_tenant_labels
        self._labels: set[str] = set()
        own, registry = registry, None if multiprocess else registry
        self._appended = own if multiprocess else None
        self.requests = Counter("depn_requests", "Requests admitted, per tenant", ["tenant"], registry=registry)
        self.generated_tokens = Counter(
            "depn_generated_tokens", "Tokens generated, per tenant", ["tenant"], registry=registry
        )
        self.masked_neurons = Gauge(
            "depn_masked_neurons", "Neurons switched off for the tenant (union of its masks)", ["tenant"],
            registry=registry, multiprocess_mode="mostrecent",
        )
        self.pushes = Counter("depn_mask_pushes", "Mask pushes, by outcome", ["outcome"], registry=registry)
        self.push_latency = Histogram(
            "depn_push_to_active_seconds", "From receiving a pushed mask to its being active in every worker",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=registry,
        )
        self.refused = Counter(
            "depn_requests_refused", "Requests refused before reaching the engine, by HTTP status", ["reason"],
            registry=registry,
        )
        self.limited = Counter(
            "depn_requests_limited", "Requests refused with 429 by a tenant limit, by limit", ["limit"],
            registry=registry,
        )
        self.unverified = Gauge(
            "depn_unverified_masks_in_use",
            "Masks in use without a passing verification certificate (only with --allow-unverified)",
            registry=registry, multiprocess_mode="max",
        )
        self.quarantined = Gauge(
            "depn_tenants_quarantined",
            "Tenants refused because a stored mask failed its checks at start-up (changed on disk, wrong model, "
            "no passing certificate); `depn masks list` says why",
            registry=registry, multiprocess_mode="max",
        )
        self.tenants_file = Gauge("depn_tenants_file", "The tenants file in force (1), by the start of its SHA-256",
                                  ["sha256"], registry=registry, multiprocess_mode="mostrecent")
        self.tenants_file_ok = Gauge(
            "depn_tenants_file_ok", "0 while a changed tenants file cannot be applied (tenant requests get 503)",
            registry=registry, multiprocess_mode="min")
        self.store_generation = Gauge(
            "depn_store_generation", "The mask store generation this server applied (equal across a converged fleet)",
            registry=registry, multiprocess_mode="min")
        self.behind = Gauge(
            "depn_tenants_behind_store", "Tenants served with their previous masks: the store's could not be applied",
            registry=registry, multiprocess_mode="max")
        self.refused_behind = Gauge(
            "depn_tenants_refused_behind", "Tenants behind the store for longer than the server allows: refused (503)",
            registry=registry, multiprocess_mode="max")
        for outcome in ("accepted", "rejected", "failed"):  # at 0 from the start, so rates and alerts see the first
            self.pushes.labels(outcome)
        for limit in ("in_flight", "n", "prompts", "tokens_per_minute"):
            self.limited.labels(limit)
        self.worker_status: dict = {}
        self.tenant_digests: dict[str, str] = {}  # tenant -> the mask hash it runs with, when the status was fetched
        self._waiting: dict[object, float] = {}  # requests in flight without a first token -> when they came
        self._tenant_of: dict[object, str] = {}  # requests in flight -> their tenant
        self.longest_wait = 0.0  # the longest any request waited for its first token, since start
        own.register(_WorkerCollector(self))
        own.register(_WaitCollector(self))

    def appended(self) -> bytes:
        """What /metrics must add to vLLM's answer: in multiprocess mode vLLM exposes only the shared files, not this
        process's collected figures (slots, waits, tenants in flight)."""
        return b"" if self._appended is None else generate_latest(self._appended)

    def tenants_file_in_force(self, digest: str, previous: str) -> None:
        if previous:
            self.tenants_file.labels(previous).set(0)  # multiprocess files keep a removed series: at 0 it is not 1
            self.tenants_file.remove(previous)
        self.tenants_file.labels(digest).set(1)

    def waiting(self, request: object, tenant: str | None = None) -> None:
        self._waiting[request] = time.monotonic()
        if tenant is not None:
            self._tenant_of[request] = tenant

    def started(self, request: object, first_token: bool = True) -> None:
        """The request's first token came (or, with `first_token=False`, it ended without one)."""
        since = self._waiting.pop(request, None)
        if since is not None and first_token:
            self.longest_wait = max(self.longest_wait, time.monotonic() - since)

    def finished(self, request: object) -> None:
        self.started(request, first_token=False)
        self._tenant_of.pop(request, None)

    def tenants_in_flight(self) -> tuple[set[str], set[str]]:
        """(tenants with requests generating, tenants with requests waiting for their first token)."""
        waiting = {self._tenant_of[r] for r in self._waiting if r in self._tenant_of}
        running = {t for r, t in self._tenant_of.items() if r not in self._waiting}
        return running, waiting

    def current_wait(self) -> float:
        now = time.monotonic()
        return max((now - since for since in self._waiting.values()), default=0.0)

    def tenant_label(self, tenant: str) -> str:
        if tenant in self._labels:
            return tenant
        if len(self._labels) < self.max_tenant_labels:
            self._labels.add(tenant)
            return tenant
        return OTHER


class _WorkerCollector:
    """Exposes the last status fetched from the workers (rank 0: every rank holds the same slots)."""

    def __init__(self, metrics: DepnMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        status = self.metrics.worker_status
        if not status:
            return
        yield GaugeMetricFamily("depn_mask_slots", "Mask slots on the device", value=status["slots"])
        yield GaugeMetricFamily("depn_mask_slots_resident", "Masks resident in a slot", value=len(status["resident"]))
        for name, doc in (
            ("loads", "Masks loaded into a slot"),
            ("evictions", "Resident masks evicted (LRU) to make room"),
            ("overflows", "Requests that found no free slot (should stay 0: the scheduler holds them back)"),
            ("untagged", "Steps in which a request without a tenant reached the model (deny row; should stay 0)"),
            ("stale", "Requests that named a mask this worker no longer holds (deny row; should stay 0)"),
        ):
            yield CounterMetricFamily(f"depn_mask_slot_{name}", doc, value=status[name])
        # For routers, in the form of vLLM's `vllm:lora_requests_info`: which tenants' masks this replica holds and
        # serves now, so a router can prefer the replica that already holds a tenant's mask.
        running, waiting = self.metrics.tenants_in_flight()
        resident = set(status["resident"])
        holding = {t for t, digest in self.metrics.tenant_digests.items() if mask_key(t, digest) in resident}
        info = GaugeMetricFamily(
            "depn_mask_requests_info", "Tenants whose masks are resident, running and waiting (value: time of scrape; "
            "tenants past --metrics-max-tenants show as _other)",
            labels=["resident_tenants", "running_tenants", "waiting_tenants", "max_mask_slots"])
        info.add_metric([self._labels(holding), self._labels(running), self._labels(waiting), str(status["slots"])],
                        time.time())
        yield info

    def _labels(self, tenants: set[str]) -> str:
        return ",".join(sorted({self.metrics.tenant_label(t) for t in tenants}))


class _WaitCollector:
    """How long requests wait for their first token: queued for a mask slot (and the prefill). The scheduler bounds
    the slot queue (`KeyQueues`); these show the bound holds."""

    def __init__(self, metrics: DepnMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        yield GaugeMetricFamily("depn_first_token_wait_seconds",
                                "The longest wait of a request in flight that has no token yet",
                                value=self.metrics.current_wait())
        yield GaugeMetricFamily("depn_first_token_wait_max_seconds",
                                "The longest any request waited for its first token since start",
                                value=self.metrics.longest_wait)
