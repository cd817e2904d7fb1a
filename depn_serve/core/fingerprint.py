"""Model fingerprint: ties a mask to the exact weights its neurons were found in.

Computed from the checkpoint files (not from a loaded model), so the offline tools and the server, which loads
weights its own way, agree on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

from depn_serve.core.arch import ModelError, adapter_for, read_config

# Keys that describe how a checkpoint was saved, not what the model computes.
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"})


class ModelFingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config_sha256: str
    mlp_sha256: str

    @property
    def short(self) -> str:
        return hashlib.sha256((self.config_sha256 + self.mlp_sha256).encode()).hexdigest()[:16]


def config_digest(config: dict) -> str:
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model_dir: Path) -> ModelFingerprint:
    """sha256 of the model config plus a digest of every MLP weight tensor (raw bytes, by sorted name)."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    pattern = re.compile(adapter_for(config.get("model_type", "")).mlp_weight_pattern)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights to fingerprint")
    per_tensor: dict[str, str] = {}
    for file in files:
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                if pattern.search(name):
                    tensor = fh.get_tensor(name).contiguous()
                    raw = tensor.view(-1).view(torch.uint8).numpy().tobytes()
                    per_tensor[name] = f"{tensor.dtype}:{hashlib.sha256(raw).hexdigest()}"
    if not per_tensor:
        raise ModelError(f"{model_dir}: no MLP weights matching {pattern.pattern!r} in the safetensors files")
    digest = hashlib.sha256(json.dumps(per_tensor, sort_keys=True).encode()).hexdigest()
    return ModelFingerprint(config_sha256=config_digest(config), mlp_sha256=digest)
