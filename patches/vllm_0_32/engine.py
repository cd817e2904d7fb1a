"""Engine-core side for vLLM 0.32: a scheduler that never puts more distinct masks in flight than there are slots,
and a prefix-cache salt keyed by tenant and mask version."""

from __future__ import annotations

import time
from collections.abc import Iterable

from depn_serve_patches import mask_wait_s, max_mask_slots
from vllm.config.scheduler import SchedulerConfig
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.engine.core import EngineCore

from depn_serve.serving.queues import KeyQueues
from depn_serve.serving.request import MaskRequest, cache_salt, slot_key


def _key(request) -> str | None:
    params = request.sampling_params
    return slot_key(params.extra_args) if params is not None else None


def _keys(requests: Iterable) -> set[str]:
    keys = {_key(r) for r in requests}
    keys.discard(None)
    return keys


class MaskBudget:
    """Mixed into whichever scheduler vLLM picks (async or not): a new request waits in its mask's queue
    (`KeyQueues`) instead of vLLM's waiting queue, and each step hands vLLM only as many as it can start, from masks
    that hold a slot or may take a free one (running masks keep their slots, new ones take free slots, and a mask
    held longer than `mask_wait_s` gets the next slot that frees). So at most `depn_slots` masks are in flight, and a
    step costs O(masks + running + a batch) however many requests are queued. vLLM still registers every request
    (`self.requests`, connectors, stats) and counts queued ones as waiting.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.depn_slots = max_mask_slots(self.vllm_config)
        self.depn_wait = mask_wait_s(self.vllm_config)
        self.depn_queues: KeyQueues = KeyQueues()

    def _enqueue_waiting_request(self, request) -> None:
        """A new request (or a streaming session's next input) goes to its mask's queue instead of vLLM's; one that
        holds KV blocks stays in `kv_holding_waiting`, where its mask keeps its slot."""
        super()._enqueue_waiting_request(request)
        if self.depn_slots is None or self._holds_kv_blocks(request):
            return
        if isinstance(self.waiting, FCFSRequestQueue) and self.waiting and self.waiting[-1] is request:
            self.waiting.pop()  # where vLLM just appended it: O(1)
        else:
            self.waiting.remove_request(request)
        self.depn_queues.add(_key(request), request.request_id, request, request.arrival_time)

    def schedule(self, *args, **kwargs):
        if self.depn_queues:
            self._feed()
        return super().schedule(*args, **kwargs)

    def _feed(self) -> None:
        """Hand vLLM the queued requests it can start this step. `self.waiting` holds only requests handed over
        earlier that have not started, and preempted ones (at most a batch): their masks hold slots too."""
        held = _keys(self.running) | _keys(self.kv_holding_waiting) | _keys(self.waiting)
        capacity = self.max_num_active_reqs - len(self.running) - len(self.waiting) - len(self.kv_holding_waiting)
        fed = self.depn_queues.feed(held, capacity, self.depn_slots, time.time(), self.depn_wait)
        if fed.drain:
            self._take_back()
        for request in fed.requests:
            self.waiting.add_request(request)

    def _take_back(self) -> None:
        """A mask starves and no slot is free: requests with a mask that have not started go back to the front of
        their queues, in order, so that only running requests hold slots until one frees for the starving mask."""
        back = [(key, r) for r in self.waiting if (key := _key(r)) is not None]
        if back:
            self.waiting.remove_requests([r for _, r in back])
            self.depn_queues.requeue([(key, r.request_id, r, r.arrival_time) for key, r in back])

    def _free_request(self, request, *args, **kwargs):
        """Finished or aborted (a client disconnect) while still queued: it leaves the queue too."""
        self.depn_queues.discard(request.request_id)
        return super()._free_request(request, *args, **kwargs)

    def get_request_counts(self) -> tuple[int, int]:
        """Queued requests are waiting too, so the engine never idles while any is queued (`has_requests`,
        `get_num_unfinished_requests`) and stats and load balancers see them."""
        running, waiting = super().get_request_counts()
        return running, waiting + len(self.depn_queues)


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
