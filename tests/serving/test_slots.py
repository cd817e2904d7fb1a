"""Mask slots (no vLLM): LRU loading, what may be evicted, version reloads, fail-closed rows, TP shards."""

import pytest
import torch

from depn_serve.artifacts.mask import pack_bits
from depn_serve.serving.kernels import keep_rows
from depn_serve.serving.slots import DENY_SLOT, IDENTITY_SLOT, MaskSlots, held_back

LAYERS, WIDTH = 2, 12


def _off(*neurons: int) -> torch.Tensor:
    off = torch.zeros(LAYERS, WIDTH, dtype=torch.bool)
    off[:, list(neurons)] = True
    return off


def _keep(slots: MaskSlots, slot: int) -> torch.Tensor:
    """The slot's resident rows, expanded from bits as the masked layer does: `[layers, shard width]` 0/1."""
    index = torch.tensor([slot], dtype=torch.int32)
    return torch.cat([keep_rows(words, index, slots.width, torch.float32) for words in slots.words])


def _slots(num_slots=2, shard=(0, WIDTH)) -> MaskSlots:
    slots = MaskSlots(num_slots, LAYERS, WIDTH, shard, "cpu")
    for version, (tenant, neuron) in enumerate([("a", 0), ("b", 1), ("c", 2)], start=1):
        slots.bind(tenant, version, pack_bits(_off(neuron)).tobytes())
    return slots


def test_rows_hold_each_tenants_mask_and_identity_and_deny():
    slots = _slots()
    a, b, none = slots.assign(["a", "b", None], live=set)
    assert none == IDENTITY_SLOT
    assert torch.equal(_keep(slots, a), (~_off(0)).float())
    assert torch.equal(_keep(slots, b), (~_off(1)).float())
    assert _keep(slots, IDENTITY_SLOT).eq(1).all() and _keep(slots, DENY_SLOT).eq(0).all()


def test_a_server_gives_a_request_without_tenant_the_deny_row():
    slots = MaskSlots(2, LAYERS, WIDTH, (0, WIDTH), "cpu", deny_untagged=True)
    slots.bind("a", 1, pack_bits(_off(0)).tobytes())
    assert slots.assign([None, "a", None], live=set)[::2] == [DENY_SLOT, DENY_SLOT]
    assert slots.status()["untagged"] == 1  # counted per step that had such requests


def test_lru_evicts_a_slot_not_used_by_this_step_preferring_idle_tenants():
    slots = _slots()
    slots.assign(["a"], live=set)
    slots.assign(["b"], live=set)
    # "a" is least recently used but still has a live request; "b" is idle -> "b" goes.
    (c,) = slots.assign(["c"], live=lambda: {"a"})
    assert slots.status()["resident"] == {"a": 1, "c": 3}
    assert torch.equal(_keep(slots, c), (~_off(2)).float())
    assert slots.counters.evictions == 1 and slots.counters.loads == 3


def test_more_masks_in_one_step_than_slots_denies_rather_than_unmasks():
    slots = _slots()
    assigned = slots.assign(["a", "b", "c"], live=set)
    assert assigned[2] == DENY_SLOT and slots.counters.overflows == 1
    assert slots.status()["resident"] == {"a": 1, "b": 2}


def test_new_version_reloads_in_place():
    slots = _slots()
    (a,) = slots.assign(["a"], live=set)
    slots.bind("a", 9, pack_bits(_off(5, 6)).tobytes())
    assert slots.assign(["a"], live=set) == [a]
    assert torch.equal(_keep(slots, a), (~_off(5, 6)).float())
    assert slots.status()["resident"]["a"] == 9


def test_unknown_tenant_is_denied_and_unmasked_binding_is_identity():
    slots = _slots()
    slots.bind("open", 4, None)
    assert slots.assign(["nobody", "open"], live=set) == [DENY_SLOT, IDENTITY_SLOT]
    assert slots.counters.unknown == 1


def test_tensor_parallel_shard_holds_only_its_columns():
    slots = _slots(shard=(4, 8))
    slots.bind("s", 1, pack_bits(_off(3, 5)).tobytes())
    (s,) = slots.assign(["s"], live=set)
    assert slots.words.shape == (LAYERS, 4, 1)  # 4 neurons: one int32 word per row
    assert _keep(slots, s)[0].tolist() == [1, 0, 1, 1]  # columns 4..7: only neuron 5 is off


def test_bind_rejects_wrong_size():
    with pytest.raises(ValueError, match="packed bytes"):
        _slots().bind("a", 2, b"\x00" * 3)


def test_held_back_keeps_slots_then_drains_for_a_starving_tenant():
    # One slot, held by "a"; "b" has waited 0.5 s: a's new request goes ahead, b waits.
    waiting = [("b", 0.0), ("a", 0.4), (None, 0.4)]
    assert held_back({"a"}, waiting, slots=1, now=0.5, fair_after=1.0) == [0]
    # After 1 s b starves: nobody else starts (a drains), and b still has no slot.
    assert held_back({"a"}, waiting, slots=1, now=1.5, fair_after=1.0) == [0, 1]
    # a's requests in flight finished: the free slot is b's, even though a's request is also waiting.
    assert held_back(set(), [("a", 1.2), ("b", 0.0)], slots=1, now=1.6, fair_after=1.0) == [0]


def _flood(fair_after: float, slots=3, length=5, steps=400) -> dict[str, int]:
    """A discrete-time scheduler: 6 tenants that always have another request waiting (sent as soon as the previous
    one starts), each request running `length` steps. Each tenant's longest wait."""
    tenants = [f"t{i}" for i in range(6)]
    arrived = dict.fromkeys(tenants, 0)  # the tenant's waiting request
    running: dict[str, list[int]] = {}  # tenant -> steps left of each request in flight
    longest = dict.fromkeys(tenants, 0)
    for now in range(steps):
        running = {t: [n - 1 for n in left if n > 1] for t, left in running.items()}
        running = {t: left for t, left in running.items() if left}
        waiting = sorted(((t, arrived[t]) for t in tenants), key=lambda w: w[1])
        held = set(held_back(set(running), waiting, slots, now, fair_after))
        for position, (tenant, since) in enumerate(waiting):
            longest[tenant] = max(longest[tenant], now - since)
            if position not in held:
                running.setdefault(tenant, []).append(length)
                arrived[tenant] = now
    return longest


def test_no_tenant_waits_past_the_bound_under_a_flood():
    assert max(_flood(fair_after=float("inf")).values()) >= 399  # without the bound, three tenants never run
    longest = _flood(fair_after=4)
    assert max(longest.values()) <= 4 + 5 + 1, longest  # fair_after + one request's length (+ the step it starts)
