"""depn-serve's vLLM plugin: the one place that touches vLLM internals, one sub-package per supported vLLM version.

vLLM loads `register` (entry point group `vllm.general_plugins`) in every process it starts. It does nothing
unless the environment variable `DEPN_SERVE=1` is set (by `depn serve`, or by `engine_kwargs` for offline
engines), so installing depn-serve never changes a plain vLLM deployment. Enabled on an unsupported vLLM, it stops
start-up with an error naming the versions it supports.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any

from depn_serve.core.errors import DepnError

ENABLE_ENV = "DEPN_SERVE"
SUPPORTED = {"0.32": "vllm_0_32"}
DEFAULT_MAX_MASK_SLOTS = 1024  # bits on the device: 59 MB at the Llama-3-8B shape
DEFAULT_MASK_WAIT_S = 1.0
CONFIG_KEY = "depn"  # in vLLM's additional_config, which every vLLM process sees (and the compile cache hashes)

logger = logging.getLogger("depn_serve")


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV) == "1"


def versioned() -> ModuleType:
    """The hooks for the installed vLLM, or a clear error."""
    import vllm

    release = ".".join(vllm.__version__.split(".")[:2])
    if release not in SUPPORTED:
        raise DepnError(
            f"depn-serve supports vLLM {', '.join(v + '.x' for v in SUPPORTED)}; this is vLLM {vllm.__version__}"
        )
    return importlib.import_module(f"{__name__}.{SUPPORTED[release]}")


def register() -> None:
    """vLLM plugin entry point."""
    if not enabled():
        return
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        # The hooks patch the V1 model runner (the one vLLM uses on CPU); select it on GPU too.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("depn-serve: selecting vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")
    versioned().install()


def engine_kwargs(max_mask_slots: int = DEFAULT_MAX_MASK_SLOTS, deny_untagged: bool = False,
                  mask_wait_s: float = DEFAULT_MASK_WAIT_S, bench: bool = False) -> dict[str, Any]:
    """Engine arguments that turn masks on (for `vllm.LLM`, `AsyncEngineArgs`); also enables the plugin.

    `deny_untagged` (servers): a request that reaches the model without a tenant runs with the deny row, not unmasked.
    `mask_wait_s`: how long a tenant may wait for a mask slot before the running tenants are drained for it.
    `bench`: the worker also answers the benchmarks' controls (masking switched off and on); never in a server.
    """
    if max_mask_slots < 1:
        raise DepnError(f"max_mask_slots must be at least 1, got {max_mask_slots}")
    if mask_wait_s < 0:
        raise DepnError(f"mask_wait_s must be at least 0, got {mask_wait_s}")
    os.environ[ENABLE_ENV] = "1"
    hooks = versioned()
    return {
        "worker_extension_cls": hooks.BENCH_WORKER_EXTENSION_CLS if bench else hooks.WORKER_EXTENSION_CLS,
        "additional_config": {CONFIG_KEY: {"max_mask_slots": max_mask_slots, "deny_untagged": deny_untagged,
                                           "mask_wait_s": mask_wait_s}},
    }


def _settings(vllm_config) -> dict[str, Any]:
    return (vllm_config.additional_config or {}).get(CONFIG_KEY, {})


def max_mask_slots(vllm_config) -> int | None:
    """The engine's mask slots, or None for an engine started without `engine_kwargs` (masks off)."""
    return _settings(vllm_config).get("max_mask_slots")


def deny_untagged(vllm_config) -> bool:
    return bool(_settings(vllm_config).get("deny_untagged", False))


def mask_wait_s(vllm_config) -> float:
    return float(_settings(vllm_config).get("mask_wait_s", DEFAULT_MASK_WAIT_S))
