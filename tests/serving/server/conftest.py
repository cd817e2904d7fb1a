"""The server's tenant/mask state without an engine: a tenants file (acme needs its mask, globex may run unmasked),
certified masks for the tiny model, and `Workers`, which answers the state's engine calls as the worker extension
does."""

import asyncio
import os

import pytest
import torch
from prometheus_client import CollectorRegistry

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.serving.server.metrics import DepnMetrics
from depn_serve.serving.server.state import ServingState
from depn_serve.serving.server.store import MaskStore
from depn_serve.serving.server.tenants import TenantsConfig
from tests.helpers import certified

ADMIN_TOKEN = "t" * 20
FS_STEPS = ("replace", "fsync", "unlink", "open")


def at_step(k: int, action, setattr_=setattr) -> None:
    """Run `action()` just before the k-th file-system step (os.open, fsync, replace, unlink) from now on: a
    SIGKILL to crash there, or an OSError to fail there."""
    count = [0]
    for name in FS_STEPS:
        real = getattr(os, name)

        def step(*args, real=real, **kwargs):
            count[0] += 1
            if count[0] == k:
                action()
            return real(*args, **kwargs)

        setattr_(os, name, step)


class Workers:
    """Records binds like the worker extension; can be told to fail."""

    def __init__(self):
        self.bound: dict[str, tuple[str, bytes | None]] = {}
        self.fail = False
        self.status_calls = 0

    async def __call__(self, method: str, args: tuple) -> list:
        if method in ("depn_bind", "depn_bind_many"):
            if self.fail:
                raise RuntimeError("worker is gone")
            for tenant, version, packed in (args[0] if method == "depn_bind_many" else [args]):
                self.bound[tenant] = (version, packed)
            return [None]
        self.status_calls += 1
        await asyncio.sleep(0.01)  # an engine round trip: scrapes arriving meanwhile must wait for it, not add more
        return [{"slots": 4, "resident": [], "loads": 0, "evictions": 0, "overflows": 0, "untagged": 0, "stale": 0}]


@pytest.fixture
def world(tiny_model_dir, tmp_path):
    config = TenantsConfig()
    config.add_tenant("acme", ["acme-main"])
    config.add_tenant("globex", [], allow_unmasked=True)
    config.save(tmp_path / "tenants.yaml")
    shape = mlp_shape(read_config(tiny_model_dir))
    fp = model_fingerprint(tiny_model_dir)

    def mask(*neurons: int, certificate: str | None = "passed", tenant: str = "acme", made_for: str | None = None,
             **certificate_options) -> bytes:
        """A mask of `tenant`'s (certified as its isolation mask, so made for it, unless `certificate` is None)."""
        off = torch.zeros(shape.num_layers, shape.intermediate_size, dtype=torch.bool)
        off[0, list(neurons)] = True
        made = NeuronMask.create(tenant, fp, shape, off, MaskProvenance(method="test"), made_for=made_for)
        if certificate is None:
            return made.to_bytes()
        return certified(made, certificate == "passed", **certificate_options).to_bytes()

    def state(allow_unverified: bool = False, **options) -> ServingState:
        s = ServingState(tmp_path / "tenants.yaml", MaskStore(tmp_path / "store"), fp, shape, ADMIN_TOKEN,
                         DepnMetrics(CollectorRegistry()), allow_unverified, **options)
        s.prepare()
        return s

    return state, mask, tmp_path
