"""Per-mask queues (no vLLM): slots kept by running keys, FCFS among new keys, the starvation bound, removal, order
kept when requests are taken back, and a step's work independent of how many requests are queued."""

import sys
import tracemalloc

from depn_serve.serving.queues import KeyQueues

INF = float("inf")


def _queues(*entries: tuple[str | None, float]) -> KeyQueues:
    """Requests named `<key>@<arrival>` (`-@...` without a key), queued in the order given."""
    queues = KeyQueues()
    for key, arrival in entries:
        name = f"{key or '-'}@{arrival:g}"
        queues.add(key, name, name, arrival)
    return queues


def test_running_keys_keep_their_slots_and_new_keys_wait():
    queues = _queues(("c", 0), ("a", 1), ("b", 2), (None, 3), ("a", 4))
    fed = queues.feed({"a", "b"}, capacity=10, slots=2, now=5, fair_after=INF)
    assert fed.requests == ["a@1", "b@2", "-@3", "a@4"] and not fed.drain
    assert len(queues) == 1  # c has no slot


def test_new_keys_take_free_slots_in_arrival_order():
    queues = _queues(("d", 3), ("c", 0), ("b", 1), ("a", 0.5), ("c", 2), ("b", 4))
    # One slot free next to a's: c, the oldest new key, takes it; b and d wait.
    assert queues.feed({"a"}, capacity=10, slots=2, now=5, fair_after=INF).requests == ["c@0", "a@0.5", "c@2"]
    # Then nothing runs any more: two free slots, for b (arrived at 1) and d (at 3), oldest first.
    assert queues.feed(set(), capacity=10, slots=2, now=6, fair_after=INF).requests == ["b@1", "d@3", "b@4"]
    assert len(queues) == 0


def test_capacity_bounds_a_step_and_the_rest_stays_queued():
    queues = _queues(*[("a", t) for t in range(5)])
    assert queues.feed(set(), capacity=2, slots=1, now=9, fair_after=INF).requests == ["a@0", "a@1"]
    assert queues.feed({"a"}, capacity=0, slots=1, now=9, fair_after=INF).requests == []
    assert len(queues) == 3


def test_a_starving_key_drains_the_running_keys_then_takes_the_next_slot():
    queues = _queues(("b", 0.0), ("a", 1.0), (None, 1.1))
    # One slot, held by a; b has waited 0.5 s: a's request goes ahead, b waits.
    fed = queues.feed({"a"}, capacity=10, slots=1, now=0.5, fair_after=1.0)
    assert fed.requests == ["a@1", "-@1.1"] and not fed.drain
    queues.add("a", "a@1.2", "a@1.2", 1.2)
    # After 1 s b starves and no slot is free: a drains (its new request waits too), only requests without a key go.
    queues.add(None, "-@1.3", "-@1.3", 1.3)
    fed = queues.feed({"a"}, capacity=10, slots=1, now=1.5, fair_after=1.0)
    assert fed.requests == ["-@1.3"] and fed.drain
    # a's requests in flight finished: the free slot is b's, and a's request waits for it.
    fed = queues.feed(set(), capacity=10, slots=1, now=1.6, fair_after=1.0)
    assert fed.requests == ["b@0"] and not fed.drain
    assert queues.feed({"b"}, capacity=10, slots=1, now=1.7, fair_after=1.0).requests == []


def test_requests_without_a_key_are_never_held():
    queues = _queues((None, 0), ("b", 1), (None, 2))
    fed = queues.feed({"a"}, capacity=10, slots=1, now=0, fair_after=INF)
    assert fed.requests == ["-@0", "-@2"]
    fed = queues.feed({"a"}, capacity=10, slots=1, now=9, fair_after=1.0)  # b starves: a drains
    assert fed.requests == [] and fed.drain and len(queues) == 1


def test_discard_forgets_only_that_request():
    queues = _queues(("a", 0), ("a", 1), ("b", 2))
    queues.discard("a@0")
    queues.discard("b@2")  # b's last request: b has nothing queued any more
    queues.discard("nobody")
    assert len(queues) == 1
    assert queues.feed(set(), capacity=10, slots=2, now=3, fair_after=INF).requests == ["a@1"]


def test_requests_taken_back_keep_their_turn():
    queues = _queues(("a", 0), ("b", 1), ("a", 2), ("a", 3), ("b", 4))
    taken = queues.feed(set(), capacity=3, slots=2, now=5, fair_after=INF).requests
    assert taken == ["a@0", "b@1", "a@2"]
    queues.add("a", "a@6", "a@6", 6)
    queues.requeue([(name[0], name, name, float(name[2:])) for name in taken])
    assert len(queues) == 6
    assert queues.feed(set(), capacity=10, slots=2, now=7, fair_after=INF).requests == [
        "a@0", "b@1", "a@2", "a@3", "b@4", "a@6"]


def _flood(fair_after: float, slots=3, length=5, steps=400) -> dict[str, int]:
    """A discrete-time engine: 6 keys that always have another request queued (sent as soon as the previous one
    starts), each request running `length` steps. Each key's longest wait."""
    keys = [f"t{i}" for i in range(6)]
    queues = KeyQueues()
    for key in keys:
        queues.add(key, f"{key}@0", key, 0)
    arrived = dict.fromkeys(keys, 0)  # the key's queued request
    running: dict[str, list[int]] = {}  # key -> steps left of each request in flight
    longest = dict.fromkeys(keys, 0)
    for now in range(steps):
        running = {k: [n - 1 for n in left if n > 1] for k, left in running.items()}
        running = {k: left for k, left in running.items() if left}
        for key in keys:
            longest[key] = max(longest[key], now - arrived[key])
        for key in queues.feed(set(running), len(keys), slots, now, fair_after).requests:
            assert key in running or len(running) < slots, "more keys in flight than slots"
            running.setdefault(key, []).append(length)
            arrived[key] = now
            queues.add(key, f"{key}@{now}", key, now)
    return longest


def test_no_key_waits_past_the_bound_under_a_flood():
    assert max(_flood(fair_after=INF).values()) >= 399  # without the bound, three keys never run
    longest = _flood(fair_after=4)
    assert max(longest.values()) <= 4 + 5 + 1, longest  # fair_after + one request's length (+ the step it starts)


class _Request:
    """A queued request whose comparisons and hashing run Python code, so a scan over the queue would be traced."""

    def __init__(self, n: int):
        self.n = n

    def __eq__(self, other):
        return isinstance(other, _Request) and other.n == self.n

    def __lt__(self, other):
        return self.n < other.n

    def __hash__(self):
        return self.n


def _one_step(flooded: int) -> tuple[list, int, int]:
    """One `feed` with `flooded` requests of one key queued next to 4 other keys: what it returns, the Python
    events (calls, lines, returns) it runs, and the most memory it allocates."""
    queues = KeyQueues()
    for n in range(flooded):
        queues.add("flood", f"f{n}", _Request(n), float(n))
    for n, key in enumerate(["a", "b", "c", "d"]):
        queues.add(key, key, _Request(-n), 2.5 + n)
    events = 0

    def trace(frame, event, arg):
        nonlocal events
        events += 1
        return trace

    tracemalloc.start()
    sys.settrace(trace)
    try:
        fed = queues.feed({"flood", "a"}, capacity=8, slots=3, now=5.0, fair_after=INF)
    finally:
        sys.settrace(None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return [r.n for r in fed.requests], events, peak


def test_a_step_does_not_depend_on_how_many_requests_are_queued():
    small, events_small, _ = _one_step(10)
    large, events_large, peak_large = _one_step(100_000)
    assert small == large == [0, 1, 2, 0, 3, -1, 4, 5]  # the flood, a, then b (the free slot), FCFS; c, d wait
    assert events_large == events_small, "feed scans the queue"
    assert peak_large < 16_384, f"feed allocated {peak_large} bytes: it copies the queue"
