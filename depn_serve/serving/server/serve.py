"""`depn serve`: check everything that can be checked before vLLM starts, then run vLLM's OpenAI server with
depn-serve's hooks (tenant auth, admin routes, per-request masks) from the vLLM adapter in `depn_serve_patches`."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

from depn_serve.core.arch import SERVABLE_MODEL_TYPES, mlp_shape, read_config
from depn_serve.core.errors import DepnError
from depn_serve.core.fingerprint import ModelFingerprint, config_digest, model_fingerprint
from depn_serve.serving.server.api import read_admin_token, read_token
from depn_serve.serving.server.state import StateSpec

MANAGED_OPTIONS = ("--worker-extension-cls", "--additional-config", "--model")


class ServeError(DepnError):
    pass


def serve(
    model: Path,
    tenants: Path,
    mask_store: Path,
    admin_token_file: Path,
    max_mask_slots: int,
    metrics_max_tenants: int,
    vllm_argv: list[str],
    allow_unverified: bool = False,
    max_mask_wait: float = 1.0,
    masks_from: Path | None = None,
    criteria: dict | None = None,
    max_behind: float = 30.0,
    metrics_token_file: Path | None = None,
) -> None:
    import depn_serve_patches

    config = read_config(Path(model))
    if config.get("model_type") not in SERVABLE_MODEL_TYPES:
        raise ServeError(
            f"{model}: model_type {config.get('model_type')!r} cannot be served with masks; "
            f"supported: {', '.join(SERVABLE_MODEL_TYPES)}"
        )
    for option in MANAGED_OPTIONS:
        if any(arg == option or arg.startswith(option + "=") for arg in vllm_argv):
            raise ServeError(f"{option} is set by depn serve; remove it from the vLLM options")
    # Also enables the plugin for vLLM's processes; in a server every request has a tenant, so one without is denied.
    engine = depn_serve_patches.engine_kwargs(max_mask_slots, deny_untagged=True, mask_wait_s=max_mask_wait)
    hooks = depn_serve_patches.versioned().frontend_hooks()
    args = hooks.parse_args([
        *vllm_argv, "--model", str(model),
        "--worker-extension-cls", engine["worker_extension_cls"],
        "--additional-config", json.dumps(engine["additional_config"]),
    ])
    spec = StateSpec(
        tenants=Path(tenants), mask_store=Path(mask_store), fingerprint=_mask_fingerprint(Path(model), masks_from),
        shape=mlp_shape(config), admin_token=read_admin_token(admin_token_file),
        metrics_max_tenants=metrics_max_tenants, allow_unverified=allow_unverified, criteria=dict(criteria or {}),
        max_behind_s=max_behind,
        metrics_token=read_token(metrics_token_file, "metrics token") if metrics_token_file else None,
    )
    if spec.metrics_token == spec.admin_token:
        raise ServeError("--metrics-token-file holds the admin token: give Prometheus a token of its own")
    if allow_unverified:
        logging.getLogger("depn_serve.serving").warning(
            "depn-serve: --allow-unverified: masks without a passing verification certificate will be served")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "depn-serve" / "vllm"))
    # A store write past a file-size limit (`ulimit -f`, systemd's LimitFSIZE) then fails with EFBIG and the push
    # is refused with 507, like on a full disk, instead of SIGXFSZ killing the server.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hooks.run(args, spec)


def _mask_fingerprint(model: Path, masks_from: Path | None) -> ModelFingerprint:
    """The fingerprint masks must carry: the served checkpoint's, or, for a quantized copy, its source's (the mask
    multiplies the activation before the quantized `down_proj` reads it, so the same neurons mean the same)."""
    if masks_from is None:
        return model_fingerprint(model)
    served, source = read_config(model), read_config(Path(masks_from))
    served.pop("quantization_config", None)
    if config_digest(served) != config_digest(source):
        raise ServeError(f"--masks-from {masks_from}: its config.json differs from {model}'s apart from "
                         "quantization_config; masks carry over only to a quantized copy of the same model")
    return model_fingerprint(Path(masks_from))
