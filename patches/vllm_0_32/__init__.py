"""depn-serve's hooks into vLLM 0.32.x internals (all of them live in this package).

`install` (called by the plugin in every vLLM process) patches the worker, the model runner, the engine core and
vLLM's CPU LoRA ops;
`frontend` is used only by `depn serve`, in the API server process.
"""

from __future__ import annotations

import logging

WORKER_EXTENSION_CLS = "depn_serve_patches.vllm_0_32.worker.DepnWorkerExtension"
BENCH_WORKER_EXTENSION_CLS = "depn_serve_patches.vllm_0_32.worker.DepnBenchWorkerExtension"  # never in a server

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from . import engine, lora, worker

    _log_like_vllm()
    worker.install()
    engine.install()
    lora.install()
    _installed = True


def _log_like_vllm() -> None:
    """depn-serve's lines go through vLLM's logger, so they reach its handlers, format and level
    (`VLLM_LOGGING_LEVEL`, `--log-config-file`) in every process. Left to the root logger they were lost: once
    serving, it is at ERROR, so a quarantined tenant or an unverified push went unlogged."""
    ours = logging.getLogger("depn_serve")
    if not any(isinstance(h, _ToVllm) for h in ours.handlers):
        ours.addHandler(_ToVllm())
        ours.propagate = False
        ours.setLevel(logging.DEBUG)  # not the root's level: vLLM's decides, in `_ToVllm`


class _ToVllm(logging.Handler):
    """Hands each record to the `vllm` logger as it is configured when the record is emitted (vLLM sets its
    handlers up after the plugin is loaded)."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if vllm_logger.isEnabledFor(record.levelno):
            vllm_logger.handle(record)


def frontend_hooks():
    from . import frontend as module

    return module
