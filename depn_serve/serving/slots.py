"""Resident mask slots: the device table the patched MLP reads, filled on demand with LRU eviction.

Modeled on vLLM's LoRA slots. Every tenant's mask (the union of its masks, keyed by its content hash) is kept
packed in host memory (1 bit per neuron); up to `num_slots` of them are resident on the device, also as bits
(`words[layer, slot]`, 32 neurons per int32, 1 = keep; see `serving.kernels`), expanded per token inside the
masked op. At 1 bit per neuron, 10,000 resident masks of a Llama-3-8B-shaped model take 0.57 GB, so the slot count
is set by memory and the LRU only works beyond it. Two extra rows are always resident: the identity (requests with
no mask) and an all-zero "deny" row used when something that should be impossible happens (an unknown tenant,
more distinct masks in one step than slots, or, in a server, a request that carries no tenant at all): the request
then produces garbage instead of unmasked output, and an error is logged and counted. Nothing here raises during a
step, because an exception inside a worker step kills vLLM's engine.

This module knows nothing about vLLM; the version-keyed hooks in `patches/` call `assign` once per step, and the
scheduler hook asks `held_back` which waiting requests must wait for a slot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from depn_serve.serving.kernels import DENY_ROW, IDENTITY_ROW, keep_words_from_packed, reserved_words, words_per_row

IDENTITY_SLOT = IDENTITY_ROW
DENY_SLOT = DENY_ROW
RESERVED_SLOTS = 2

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedMask:
    """A tenant's mask as the worker holds it between steps."""

    version: str  # the content hash of the bits: equal bits never reload a slot, whichever process bound them
    packed: np.ndarray | None  # [num_layers, ceil(intermediate / 8)] uint8; None = no neuron masked


@dataclass
class SlotCounters:
    loads: int = 0
    evictions: int = 0
    overflows: int = 0
    unknown: int = 0
    untagged: int = 0


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
        self._masks: dict[str, PackedMask] = {}
        self._resident: OrderedDict[str, tuple[int, str]] = OrderedDict()  # tenant -> (slot, version), LRU first
        self._free = list(range(num_slots + RESERVED_SLOTS - 1, RESERVED_SLOTS - 1, -1))

    # --- control plane (collective_rpc, between steps) -------------------------------------------------------------
    def bind(self, tenant: str, version: str, packed: bytes | None) -> None:
        """Set a tenant's mask; steps after this one use it, for requests already running too."""
        array = None
        if packed is not None:
            width = (self.intermediate_size + 7) // 8
            if len(packed) != self.num_layers * width:
                raise ValueError(
                    f"mask for tenant {tenant!r}: expected {self.num_layers}x{width} packed bytes, got {len(packed)}"
                )
            array = np.frombuffer(packed, dtype=np.uint8).reshape(self.num_layers, width).copy()
        self._masks[tenant] = PackedMask(version, array)

    def status(self) -> dict:
        return {
            "slots": self.num_slots,
            "resident": {tenant: version for tenant, (_, version) in self._resident.items()},
            "bound": {tenant: m.version for tenant, m in self._masks.items()},
            "loads": self.counters.loads,
            "evictions": self.counters.evictions,
            "overflows": self.counters.overflows,
            "unknown": self.counters.unknown,
            "untagged": self.counters.untagged,
        }

    # --- data plane (once per step, before the forward) ------------------------------------------------------------
    def assign(self, tenants: Sequence[str | None], live: Callable[[], set[str]]) -> list[int]:
        """The slot of each request (None = no mask), loading masks that are not resident.

        `live` gives the tenants of every request the worker still holds; their slots are evicted only if no other
        slot is free, and the slots this step uses are never evicted.
        """
        chosen: dict[str | None, int] = {}
        for tenant in tenants:
            if tenant not in chosen:
                chosen[tenant] = self._slot_for(tenant, chosen, live)
        return [chosen[tenant] for tenant in tenants]

    def _slot_for(self, tenant: str | None, step: dict[str | None, int], live: Callable[[], set[str]]) -> int:
        if tenant is None:
            if not self.deny_untagged:
                return IDENTITY_SLOT
            self.counters.untagged += 1
            logger.error("depn: a request with no tenant reached the model; its tokens use the deny row")
            return DENY_SLOT
        mask = self._masks.get(tenant)
        if mask is None:
            self.counters.unknown += 1
            logger.error("depn: tenant %r has no mask bound in this worker; its tokens use the deny row", tenant)
            return DENY_SLOT
        if mask.packed is None:
            return IDENTITY_SLOT
        if tenant in self._resident:
            slot, version = self._resident[tenant]
            self._resident.move_to_end(tenant)
            if version != mask.version:
                self._upload(slot, mask)
                self._resident[tenant] = (slot, mask.version)
            return slot
        slot = self._free.pop() if self._free else self._evict(set(step), live)
        if slot is None:
            self.counters.overflows += 1
            logger.error("depn: more distinct masks in one step than %d slots; tenant %r denied", self.num_slots, tenant)
            return DENY_SLOT
        self._upload(slot, mask)
        self._resident[tenant] = (slot, mask.version)
        self.counters.loads += 1
        return slot

    def _evict(self, in_step: set[str | None], live: Callable[[], set[str]]) -> int | None:
        candidates = [t for t in self._resident if t not in in_step]
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


def held_back(running: set[str], waiting: Sequence[tuple[str | None, float]], slots: int, now: float,
              fair_after: float) -> list[int]:
    """Positions in `waiting` ((tenant, arrival time), in queue order) of the requests that must wait so that at
    most `slots` distinct masks are in flight; `running`: the tenants with requests in flight.

    A running tenant's requests go ahead and new tenants take free slots in queue order, like vLLM's `max_loras` —
    until the first request held for want of a slot has waited `fair_after` seconds. Then the next slot is that
    tenant's: a free one at once, else nothing else starts while the running tenants drain. So no tenant waits longer
    than `fair_after` plus the time the requests in flight of one tenant take to finish.
    """
    tenants = set(running)
    starving = next((t for t, arrived in waiting if t is not None and t not in tenants and now - arrived > fair_after),
                    None)
    if starving is not None and len(tenants) < slots:
        tenants.add(starving)  # a free slot: it is the starving tenant's, whatever the queue order
        starving = None
    held = []
    for position, (tenant, _) in enumerate(waiting):
        if tenant is None:
            continue
        if starving is None and (tenant in tenants or len(tenants) < slots):
            tenants.add(tenant)
        else:  # no slot for it, or the running tenants drain until one frees for the starving tenant
            held.append(position)
    return held
