"""Per-mask queues in front of the engine's waiting queue: new requests wait here, one FIFO per slot key (what a
request needs a device slot for, `request.slot_key`), and each step hands the engine only as many as it can start,
from keys that hold a slot or may take a free one. A step's work grows with the number of keys and of requests
handed over, never with the number queued, so one tenant's hundred thousand queued requests slow no one's steps.

The policy is vLLM's `max_loras` plus a bound: keys with requests in flight keep their slots and their queued
requests go ahead; new keys take free slots in arrival order, until the oldest request of a key without a slot has
waited `fair_after` seconds. Then the next slot is that key's: a free one at once, else nothing with a key is handed
over (not even for keys in flight) while the keys in flight drain. So no key waits longer than `fair_after` plus the
time one slot's requests in flight take. Requests with no key (None: no mask) need no slot and are never held.

This module knows nothing about vLLM; the scheduler hook in `patches/` feeds the engine from it.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Set
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R")
Key = str | None


@dataclass(frozen=True)
class Fed(Generic[R]):
    requests: list[R]  # to hand to the engine now, oldest first
    drain: bool  # a key starves and no slot is free: nothing with a key may start until a slot frees for it


class KeyQueues(Generic[R]):
    """Queued requests by key, each key's in arrival order, with an O(1) removal by request id."""

    def __init__(self) -> None:
        self._queues: dict[Key, OrderedDict[str, tuple[R, float]]] = {}  # only keys with queued requests
        self._key_of: dict[str, Key] = {}

    def __len__(self) -> int:
        return len(self._key_of)

    def add(self, key: Key, request_id: str, request: R, arrival: float) -> None:
        """Queue a request behind its key's others."""
        self._queues.setdefault(key, OrderedDict())[request_id] = (request, arrival)
        self._key_of[request_id] = key

    def requeue(self, entries: Iterable[tuple[Key, str, R, float]]) -> None:
        """Put requests that were handed over but did not start back in front of their keys' queues, in the order
        given, so they keep their turn."""
        for key, request_id, request, arrival in reversed(list(entries)):
            self.add(key, request_id, request, arrival)
            self._queues[key].move_to_end(request_id, last=False)

    def discard(self, request_id: str) -> None:
        """Forget a queued request (finished or aborted before it was handed over); others are left alone."""
        if request_id not in self._key_of:
            return
        key = self._key_of.pop(request_id)
        queue = self._queues[key]
        del queue[request_id]
        if not queue:
            del self._queues[key]

    def feed(self, held: Set[str], capacity: int, slots: int, now: float, fair_after: float) -> Fed[R]:
        """Take the requests to hand over now: at most `capacity`, oldest first across the keys that may run.

        `held`: the keys with requests in flight (they keep their slots). Costs O(keys + capacity log keys).
        """
        heads = [(self._head(queue), order, key) for order, (key, queue) in enumerate(self._queues.items())]
        granted = set(held)
        free = slots - len(granted)
        oldest = min((h for h in heads if h[2] is not None and h[2] not in granted), default=None)
        drain = False
        if oldest is not None and now - oldest[0] > fair_after:
            if free > 0:  # the free slot is the starving key's, whatever the arrival order
                granted.add(oldest[2])
                free -= 1
            else:
                drain = True
                heads = [h for h in heads if h[2] is None]
        heapq.heapify(heads)
        requests: list[R] = []
        while heads and len(requests) < capacity:
            _, order, key = heads[0]
            if key is not None and key not in granted:
                if free <= 0:
                    heapq.heappop(heads)  # no slot for this key this step
                    continue
                granted.add(key)
                free -= 1
            queue = self._queues[key]
            request_id, (request, _) = queue.popitem(last=False)
            del self._key_of[request_id]
            requests.append(request)
            if queue:
                heapq.heapreplace(heads, (self._head(queue), order, key))
            else:
                heapq.heappop(heads)
                del self._queues[key]
        return Fed(requests, drain)

    @staticmethod
    def _head(queue: OrderedDict[str, tuple[R, float]]) -> float:
        """The arrival time of a key's oldest queued request (O(1): an OrderedDict keeps its first entry)."""
        return next(iter(queue.values()))[1]
