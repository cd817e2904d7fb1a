"""depn-serve's hooks into vLLM 0.32.x internals (all of them live in this package).

`install` (called by the plugin in every vLLM process) patches the worker, the model runner and the engine core;
`frontend` is used only by `depn serve`, in the API server process.
"""

from __future__ import annotations

WORKER_EXTENSION_CLS = "depn_serve_patches.vllm_0_32.worker.DepnWorkerExtension"

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    from . import engine, worker

    worker.install()
    engine.install()
    _installed = True


def frontend_hooks():
    from . import frontend as module

    return module
