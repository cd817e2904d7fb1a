"""Resident mask slots: the device table the patched MLP reads, filled on demand with LRU eviction.

Modeled on vLLM's LoRA slots. Every tenant's mask (the union of its masks, under the version it was bound with: its
content hash in a server) is kept packed in host memory (1 bit per neuron); a request names the version it was
admitted with, and runs with that mask even if its tenant is bound to another since: the previous mask is kept
while requests admitted with it run (and for `RETAIN_S` after, for a request admitted just before the change by
another API server process); a request naming a version the worker does not hold gets the deny row (counted as
`stale`), never another mask. Up to `num_slots` masks are resident on the device, also as bits
(`words[layer, slot]`, 32 neurons per int32, 1 = keep; see `serving.kernels`), expanded per token inside the
masked op. At 1 bit per neuron, 10,000 resident masks of a Llama-3-8B-shaped model take 0.57 GB, so the slot count
is set by memory and the LRU only works beyond it. Two extra rows are always resident: the identity (requests with
no mask) and an all-zero "deny" row used when something that should be impossible happens (an unknown tenant,
more distinct masks in one step than slots, or, in a server, a request that carries no tenant at all): the request
then produces garbage instead of unmasked output, and an error is logged and counted. Nothing here raises during a
step, because an exception inside a worker step kills vLLM's engine.

This module knows nothing about vLLM; the version-keyed hooks in `patches/` call `assign` once per step (the
scheduler hook keeps requests waiting for a slot in `queues.KeyQueues`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from depn_serve.serving.kernels import DENY_ROW, IDENTITY_ROW, keep_words_from_packed, reserved_words, words_per_row
from depn_serve.serving.request import mask_key

IDENTITY_SLOT = IDENTITY_ROW
DENY_SLOT = DENY_ROW
RESERVED_SLOTS = 2
RETAIN_S = 60.0  # how long a mask replaced for its tenant is kept for requests admitted with it

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedMask:
    """A tenant's mask as the worker holds it between steps."""

    version: str  # the content hash of the bits in a server: equal bits never reload a slot, whichever process
    packed: np.ndarray | None  # [num_layers, ceil(intermediate / 8)] uint8; None = no neuron masked


@dataclass
class SlotCounters:
    loads: int = 0
    evictions: int = 0
    overflows: int = 0
    unknown: int = 0
    untagged: int = 0
    stale: int = 0


class MaskSlots:
    """`words` is `[num_layers, num_slots + 2, ceil(shard_width / 32)]` int32: this rank's shard
    `[shard_start, shard_stop)` of the intermediate dimension, so tensor-parallel ranks each hold only the columns
    their `down_proj` shard reads."""

    def __init__(
        self,
        num_slots: int,
        num_layers: int,
        intermediate_size: int,
        shard: tuple[int, int],
        device: torch.device | str,
        deny_untagged: bool = False,
    ):
        """`deny_untagged`: a request with no tenant gets the deny row (servers, where every request has one) instead
        of the identity (offline engines, where no tenant means no mask)."""
        if num_slots < 1:
            raise ValueError(f"max_mask_slots must be at least 1, got {num_slots}")
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.intermediate_size = intermediate_size
        self.shard = shard
        self.device = torch.device(device)
        self.deny_untagged = deny_untagged
        self.width = shard[1] - shard[0]
        with torch.inference_mode(False):
            self.words = torch.zeros(num_layers, num_slots + RESERVED_SLOTS, words_per_row(self.width),
                                     dtype=torch.int32, device=self.device)
            self.words[:, :RESERVED_SLOTS] = torch.from_numpy(reserved_words(self.width)).to(self.device)
        self.counters = SlotCounters()
        self._masks: dict[str, PackedMask] = {}  # mask key (`mask_key(tenant, version)`) -> mask
        self._current: dict[str, str] = {}  # tenant -> the key new requests of it run with
        self._retired: dict[str, float] = {}  # key -> when it stopped being its tenant's current mask
        self._resident: OrderedDict[str, tuple[int, PackedMask]] = OrderedDict()  # key -> (slot, mask), LRU first
        self._free = list(range(num_slots + RESERVED_SLOTS - 1, RESERVED_SLOTS - 1, -1))
        self._warned: set[str] = set()

    # --- control plane (collective_rpc, between steps) -------------------------------------------------------------
    def bind(self, tenant: str, version: str, packed: bytes | None, live: Callable[[], set[str]] = set) -> None:
        """Set a tenant's mask for the requests admitted from now on; requests admitted with its previous one keep
        theirs. `live` gives the mask keys of the requests the worker holds, whose masks are kept."""
        array = None
        if packed is not None:
            width = (self.intermediate_size + 7) // 8
            if len(packed) != self.num_layers * width:
                raise ValueError(
                    f"mask for tenant {tenant!r}: expected {self.num_layers}x{width} packed bytes, got {len(packed)}"
                )
            array = np.frombuffer(packed, dtype=np.uint8).reshape(self.num_layers, width).copy()
        key, previous = mask_key(tenant, version), self._current.get(tenant)
        known = self._masks.get(key)
        same = known is not None and (known.packed is None) == (array is None) and (
            array is None or np.array_equal(known.packed, array))
        if not same:
            self._masks[key] = PackedMask(version, array)
        self._current[tenant] = key
        self._retired.pop(key, None)
        if previous is not None and previous != key:
            self._retired[previous] = time.monotonic()
        self._forget_retired(live)

    def _forget_retired(self, live: Callable[[], set[str]]) -> None:
        """Drop the masks replaced more than `RETAIN_S` ago that no request holds any more."""
        now = time.monotonic()
        expired = [key for key, since in self._retired.items() if now - since > RETAIN_S]
        if not expired:
            return
        in_use = live()
        for key in expired:
            if key not in in_use:
                del self._retired[key]
                self._masks.pop(key, None)
                if key in self._resident:
                    self._free.append(self._resident.pop(key)[0])

    def status(self) -> dict:
        return {
            "slots": self.num_slots,
            "resident": sorted(self._resident),
            "bound": {tenant: self._masks[key].version for tenant, key in self._current.items()},
            "retained": len(self._retired),
            "loads": self.counters.loads,
            "evictions": self.counters.evictions,
            "overflows": self.counters.overflows,
            "unknown": self.counters.unknown,
            "untagged": self.counters.untagged,
            "stale": self.counters.stale,
        }

    # --- data plane (once per step, before the forward) ------------------------------------------------------------
    def assign(self, requests: Sequence[tuple[str | None, str | None]], live: Callable[[], set[str]]) -> list[int]:
        """The slot of each request, given as (tenant or None, the mask version it was admitted with or None for
        its tenant's current one), loading masks that are not resident.

        `live` gives the mask keys of every request the worker still holds; their slots are evicted only if no
        other slot is free, and the slots this step uses are never evicted.
        """
        chosen: dict[tuple[str | None, str | None], int] = {}
        by_key: dict[str, int] = {}
        for request in requests:
            if request not in chosen:
                chosen[request] = self._slot_for(*request, by_key, live)
        return [chosen[request] for request in requests]

    def key(self, tenant: str, version: str | None) -> str | None:
        """The key of the mask a request of `tenant` admitted with `version` (None: the tenant's current) runs with."""
        return self._current.get(tenant) if version is None else mask_key(tenant, version)

    def _slot_for(self, tenant: str | None, version: str | None, step: dict[str, int],
                  live: Callable[[], set[str]]) -> int:
        if tenant is None:
            if not self.deny_untagged:
                return IDENTITY_SLOT
            self.counters.untagged += 1
            logger.error("depn: a request with no tenant reached the model; its tokens use the deny row")
            return DENY_SLOT
        key = self.key(tenant, version)
        mask = self._masks.get(key) if key is not None else None
        if mask is None:
            if version is None or tenant not in self._current:
                self.counters.unknown += 1
                logger.error("depn: tenant %r has no mask bound in this worker; its tokens use the deny row", tenant)
            else:
                self.counters.stale += 1
                if key not in self._warned:
                    self._warned.add(key)
                    logger.error("depn: a request of tenant %r was admitted with a mask this worker does not hold "
                                 "(%s); its tokens use the deny row", tenant, version)
            return DENY_SLOT
        if mask.packed is None:
            return IDENTITY_SLOT
        if key in step:
            return step[key]
        if key in self._resident:
            slot, loaded = self._resident[key]
            self._resident.move_to_end(key)
            if loaded is not mask:
                self._upload(slot, mask)
                self._resident[key] = (slot, mask)
            step[key] = slot
            return slot
        slot = self._free.pop() if self._free else self._evict(set(step), live)
        if slot is None:
            self.counters.overflows += 1
            logger.error("depn: more distinct masks in one step than %d slots; tenant %r denied", self.num_slots, tenant)
            return DENY_SLOT
        self._upload(slot, mask)
        self._resident[key] = (slot, mask)
        self.counters.loads += 1
        step[key] = slot
        return slot

    def _evict(self, in_step: set[str], live: Callable[[], set[str]]) -> int | None:
        candidates = [k for k in self._resident if k not in in_step]
        if not candidates:
            return None
        still_used = live()
        victim = next((t for t in candidates if t not in still_used), candidates[0])
        slot, _ = self._resident.pop(victim)
        self.counters.evictions += 1
        return slot

    def _upload(self, slot: int, mask: PackedMask) -> None:
        rows = torch.from_numpy(keep_words_from_packed(mask.packed, self.intermediate_size, self.shard))
        if self.device.type == "cuda":
            rows = rows.pin_memory()  # the caching host allocator keeps it alive until the copy has run
        self.words[:, slot].copy_(rows, non_blocking=True)
