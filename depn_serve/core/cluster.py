"""Where offline jobs run: in this process, or as tasks on a Ray cluster (`--ray ADDRESS`; `local` starts one here).

A command splits its work into jobs (a module-level function and a picklable argument each) and hands them to a
runner; both runners return the results in job order, and a job computes the same thing wherever it runs, so a
command's output does not depend on where its jobs ran. Jobs read their inputs from paths (on a cluster every node
must see them, e.g. a shared volume) and return their results to the caller, which writes the outputs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypeVar

from depn_serve.core.errors import DepnError

J = TypeVar("J")
R = TypeVar("R")

LOCAL = "local"


class Runner(Protocol):
    """Runs jobs; `workers` says how many at once (1: one after the other, here). `local`: the jobs run in this
    process, so a caller may skip sharding, report progress from inside a job and reuse this process's model."""

    workers: int
    local: bool

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], on_done: Callable[[R], None] | None = None) -> list[R]: ...


class InProcess:
    """The default: jobs one after the other in this process (they share its cached model)."""

    workers = 1
    local = True

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], on_done: Callable[[R], None] | None = None) -> list[R]:
        results = []
        for job in jobs:
            results.append(fn(job))
            if on_done:
                on_done(results[-1])
        return results


class RayCluster:
    """Jobs as Ray tasks, one CPU each (or one GPU each when they run on `cuda`)."""

    local = False

    def __init__(self, address: str, gpus: bool = False):
        try:
            import ray
        except ImportError:
            raise DepnError("--ray needs Ray: pip install 'depn-serve[ray]'") from None
        self._ray = ray
        self._gpus = gpus
        if ray.is_initialized():
            raise DepnError("--ray: this process is already connected to a Ray cluster")
        try:
            if address == LOCAL:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                "; a cluster with token authentication (the default of `ray start`) needs RAY_AUTH_MODE=token and "
                "its token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
            raise DepnError(f"--ray {address}: could not connect to the Ray cluster ({exc}){hint}") from None
        resources = ray.cluster_resources()
        self.workers = max(1, int(resources.get("GPU" if gpus else "CPU", 1)))

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], on_done: Callable[[R], None] | None = None) -> list[R]:
        ray = self._ray
        task = ray.remote(num_cpus=1, num_gpus=1 if self._gpus else 0, max_retries=1)(_one_thread_per_cpu(fn))
        refs = [task.remote(job) for job in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                results[index[done[0]]] = ray.get(done[0])
                if on_done:
                    on_done(results[index[done[0]]])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, DepnError):
                raise DepnError(str(cause).splitlines()[-1]) from None
            raise
        return results

    def close(self) -> None:
        self._ray.shutdown()


def _one_thread_per_cpu(fn: Callable[[J], R]) -> Callable[[J], R]:
    """A task holds one CPU: torch must not spread it over every core of the node (Ray sets OMP_NUM_THREADS, but a
    worker process may have imported torch before)."""

    @functools.wraps(fn)
    def run(job: J) -> R:
        import torch

        torch.set_num_threads(1)
        return fn(job)

    return run


@contextmanager
def runner(ray_address: str | None, device: str = "cpu") -> Iterator[Runner]:
    """The runner a command's `--ray` option asks for (None: this process)."""
    if not ray_address:
        yield InProcess()
        return
    cluster = RayCluster(ray_address, gpus=device.startswith("cuda"))
    try:
        yield cluster
    finally:
        cluster.close()


@functools.lru_cache(maxsize=1)
def _cached_model(model_dir: str, device: str, stamp: tuple[int, int]):
    from depn_serve.core.arch import load_model

    return load_model(Path(model_dir), device)


def shared_model(model_dir: Path, device: str = "cpu"):
    """(model, tokenizer), loaded once per process for every job on the same model (jobs must not change weights)."""
    config = Path(model_dir) / "config.json"
    stat = config.stat() if config.exists() else None
    return _cached_model(str(Path(model_dir).resolve()), device, (stat.st_mtime_ns, stat.st_size) if stat else (0, 0))
