"""Engine-core side for vLLM 0.32: a scheduler that never puts more distinct masks in flight than there are slots,
and a prefix-cache salt keyed by tenant and mask version."""

from __future__ import annotations

import time

from depn_serve_patches import mask_wait_s, max_mask_slots
from vllm.config.scheduler import SchedulerConfig
from vllm.v1.engine.core import EngineCore

from depn_serve.serving.request import MaskRequest, cache_salt, tenant_of
from depn_serve.serving.slots import held_back


def _tenant(request) -> str | None:
    params = request.sampling_params
    return tenant_of(params.extra_args) if params is not None else None


class MaskBudget:
    """Mixed into whichever scheduler vLLM picks (async or not): a waiting request whose mask would be one too
    many stays waiting (`held_back`: running tenants keep their slots, new tenants take free ones, and a tenant held
    longer than `mask_wait_s` gets the next slot that frees). Held requests go back to the front of the queue in
    their order.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.depn_slots = max_mask_slots(self.vllm_config)
        self.depn_wait = mask_wait_s(self.vllm_config)

    def schedule(self, *args, **kwargs):
        held = self._hold_excess_tenants() if self.depn_slots is not None else []
        try:
            return super().schedule(*args, **kwargs)
        finally:
            if held:
                self.waiting.prepend_requests(reversed(held))

    def _hold_excess_tenants(self) -> list:
        running = {_tenant(r) for r in self.running} | {_tenant(r) for r in self.kv_holding_waiting}
        running.discard(None)
        if len(running) + len(self.waiting) <= self.depn_slots:
            return []  # every waiting request fits, whatever its tenant: skip the scan
        waiting = list(self.waiting)
        positions = held_back(running, [(_tenant(r), r.arrival_time) for r in waiting], self.depn_slots,
                              time.time(), self.depn_wait)
        held = [waiting[i] for i in positions]
        if held:
            self.waiting.remove_requests(held)
        return held


_BUDGETED: dict[type, type] = {}


def install() -> None:
    """Give the scheduler a mask budget, and salt every request's prefix-cache key with its tenant and mask version
    before its blocks are hashed."""
    get_scheduler_cls = SchedulerConfig.get_scheduler_cls
    preprocess = EngineCore.preprocess_add_request

    def patched_get_scheduler_cls(self):
        base = get_scheduler_cls(self)
        if base not in _BUDGETED:
            _BUDGETED[base] = type(f"DepnMaskBudget{base.__name__}", (MaskBudget, base), {"__module__": __name__})
        return _BUDGETED[base]

    def patched_preprocess(self, request):
        if request.sampling_params is not None:
            request.cache_salt = cache_salt(MaskRequest.from_extra_args(request.sampling_params.extra_args),
                                            request.cache_salt)
        return preprocess(self, request)

    SchedulerConfig.get_scheduler_cls = patched_get_scheduler_cls
    EngineCore.preprocess_add_request = patched_preprocess
