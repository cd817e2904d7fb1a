"""Per-tenant limits (the tenants file's `limits`): what one tenant may ask of a server, so that no tenant crowds out
the others. A request beyond a limit is refused with 429 (and `Retry-After` where waiting helps) before it reaches
the engine, counted per limit in `depn_requests_limited_total`. Each API server process counts its own.

- in flight: API requests of the tenant being answered at once (a stream counts until it ends);
- n: completions per prompt (or beam width) of one request;
- prompts: prompts in one completion request, or items in one scoring request;
- tokens per minute: prompt and generated tokens of the tenant's requests over the last 60 seconds (charged as
  they are generated, so a request in flight counts as far as it got).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager

from depn_serve.serving.server.errors import Refused
from depn_serve.serving.server.metrics import DepnMetrics
from depn_serve.serving.server.tenants import Limits

WINDOW_S = 60


class TenantLimiter:
    def __init__(self, metrics: DepnMetrics):
        self.metrics = metrics
        self._in_flight: Counter[str] = Counter()
        self._tokens: dict[str, deque[list[int]]] = {}  # tenant -> [second, tokens] of its last minute, oldest first

    @contextmanager
    def admitted(self, tenant: str, limits: Limits, n: int = 1, prompts: int = 1) -> Iterator[None]:
        """Hold one of the tenant's in-flight places for the request's lifetime, or refuse it (429)."""
        if limits.max_n is not None and n > limits.max_n:
            self._refuse("n", f"n = {n}: at most {limits.max_n} completions per prompt for this tenant")
        if limits.max_prompts is not None and prompts > limits.max_prompts:
            self._refuse("prompts", f"{prompts} prompts in one request: at most {limits.max_prompts} for this tenant")
        if limits.max_in_flight is not None and self._in_flight[tenant] >= limits.max_in_flight:
            self._refuse("in_flight", f"{limits.max_in_flight} requests of this tenant are in flight already", 1.0)
        if limits.tokens_per_minute is not None:
            used, oldest = self.used(tenant)
            if used >= limits.tokens_per_minute:
                wait = max(1.0, oldest + WINDOW_S - time.monotonic())
                self._refuse("tokens_per_minute", f"{used} tokens in the last minute: at most "
                             f"{limits.tokens_per_minute} for this tenant", wait)
        self._in_flight[tenant] += 1
        try:
            yield
        finally:
            self._in_flight[tenant] -= 1
            if not self._in_flight[tenant]:
                del self._in_flight[tenant]

    def charge(self, tenant: str, tokens: int) -> None:
        """Count `tokens` (prompt or generated) against the tenant's minute."""
        if tokens <= 0:
            return
        second = int(time.monotonic())
        buckets = self._tokens.setdefault(tenant, deque())
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += tokens
        else:
            buckets.append([second, tokens])

    def used(self, tenant: str) -> tuple[int, float]:
        """(tokens over the last minute, the monotonic second the oldest of them was counted)."""
        buckets = self._tokens.get(tenant)
        now = time.monotonic()
        while buckets and buckets[0][0] <= now - WINDOW_S:
            buckets.popleft()
        if not buckets:
            self._tokens.pop(tenant, None)
            return 0, now
        return sum(count for _, count in buckets), buckets[0][0]

    def _refuse(self, limit: str, message: str, retry_after: float | None = None) -> None:
        self.metrics.limited.labels(limit).inc()
        raise Refused(429, f"rate limited: {message}", retry_after=math.ceil(retry_after) if retry_after else None)
