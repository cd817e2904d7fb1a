"""Mask slots (no vLLM): LRU loading, what may be evicted, version reloads, fail-closed rows, TP shards."""

import pytest
import torch

from depn_serve.artifacts.mask import pack_bits
from depn_serve.serving.kernels import keep_rows
from depn_serve.serving.slots import DENY_SLOT, IDENTITY_SLOT, RETAIN_S, MaskSlots

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


def _at(*tenants):
    """Requests of these tenants (None: no tenant) with their tenant's current mask, as offline engines send them."""
    return [(t, None) for t in tenants]


def test_rows_hold_each_tenants_mask_and_identity_and_deny():
    slots = _slots()
    a, b, none = slots.assign(_at("a", "b", None), live=set)
    assert none == IDENTITY_SLOT
    assert torch.equal(_keep(slots, a), (~_off(0)).float())
    assert torch.equal(_keep(slots, b), (~_off(1)).float())
    assert _keep(slots, IDENTITY_SLOT).eq(1).all() and _keep(slots, DENY_SLOT).eq(0).all()


def test_a_server_gives_a_request_without_tenant_the_deny_row():
    slots = MaskSlots(2, LAYERS, WIDTH, (0, WIDTH), "cpu", deny_untagged=True)
    slots.bind("a", 1, pack_bits(_off(0)).tobytes())
    assert slots.assign(_at(None, "a", None), live=set)[::2] == [DENY_SLOT, DENY_SLOT]
    assert slots.status()["untagged"] == 1  # counted per step that had such requests


def test_lru_evicts_a_slot_not_used_by_this_step_preferring_idle_tenants():
    slots = _slots()
    slots.assign(_at("a"), live=set)
    slots.assign(_at("b"), live=set)
    # "a" is least recently used but still has a live request; "b" is idle -> "b" goes.
    (c,) = slots.assign(_at("c"), live=lambda: {"a/1"})
    assert slots.status()["resident"] == ["a/1", "c/3"]
    assert torch.equal(_keep(slots, c), (~_off(2)).float())
    assert slots.counters.evictions == 1 and slots.counters.loads == 3


def test_more_masks_in_one_step_than_slots_denies_rather_than_unmasks():
    slots = _slots()
    assigned = slots.assign(_at("a", "b", "c"), live=set)
    assert assigned[2] == DENY_SLOT and slots.counters.overflows == 1
    assert slots.status()["resident"] == ["a/1", "b/2"]


def test_new_version_reloads_in_place_for_offline_requests():
    slots = _slots()
    (a,) = slots.assign(_at("a"), live=set)
    slots.bind("a", 1, pack_bits(_off(5, 6)).tobytes())  # same version, other bits: reloaded where it lies
    assert slots.assign(_at("a"), live=set) == [a]
    assert torch.equal(_keep(slots, a), (~_off(5, 6)).float())
    slots.bind("a", 9, pack_bits(_off(7)).tobytes())
    (a9,) = slots.assign(_at("a"), live=set)
    assert torch.equal(_keep(slots, a9), (~_off(7)).float()) and slots.status()["bound"]["a"] == 9


def test_a_request_runs_with_the_mask_it_was_admitted_with(monkeypatch):
    """A server's requests name the mask version they were admitted (and prefix-cache salted) with: after their
    tenant is bound to a new mask they keep the old one, new requests get the new one, and the old one is dropped
    once no request holds it (after `RETAIN_S`). A version the worker never held gets the deny row, not a mask."""
    clock = [1000.0]
    monkeypatch.setattr("depn_serve.serving.slots.time.monotonic", lambda: clock[0])
    slots = _slots()
    old, = slots.assign([("a", "1")], live=set)
    slots.bind("a", "v2", pack_bits(_off(4)).tobytes())
    again, new = slots.assign([("a", "1"), ("a", "v2")], live=set)
    assert again == old and torch.equal(_keep(slots, old), (~_off(0)).float())
    assert new != old and torch.equal(_keep(slots, new), (~_off(4)).float())
    assert slots.status()["bound"]["a"] == "v2" and slots.status()["retained"] == 1

    slots.bind("b", "v3", pack_bits(_off(1)).tobytes())
    clock[0] += 2 * RETAIN_S  # any bind sweeps expired masks
    slots.bind("b", "v3", pack_bits(_off(1)).tobytes(), live=lambda: {"a/1"})
    assert slots.assign([("a", "1")], live=set) == [old]  # still held by a running request: kept
    slots.bind("b", "v3", pack_bits(_off(1)).tobytes(), live=set)
    assert slots.status()["retained"] == 0 and "a/1" not in slots.status()["resident"]
    assert slots.assign([("a", "1"), ("a", "nope")], live=set) == [DENY_SLOT, DENY_SLOT]
    assert slots.counters.stale == 2


def test_unknown_tenant_is_denied_and_unmasked_binding_is_identity():
    slots = _slots()
    slots.bind("open", 4, None)
    assert slots.assign(_at("nobody", "open"), live=set) == [DENY_SLOT, IDENTITY_SLOT]
    assert slots.counters.unknown == 1


def test_tensor_parallel_shard_holds_only_its_columns():
    slots = _slots(shard=(4, 8))
    slots.bind("s", 1, pack_bits(_off(3, 5)).tobytes())
    (s,) = slots.assign(_at("s"), live=set)
    assert slots.words.shape == (LAYERS, 4, 1)  # 4 neurons: one int32 word per row
    assert _keep(slots, s)[0].tolist() == [1, 0, 1, 1]  # columns 4..7: only neuron 5 is off


def test_bind_rejects_wrong_size():
    with pytest.raises(ValueError, match="packed bytes"):
        _slots().bind("a", 2, b"\x00" * 3)
