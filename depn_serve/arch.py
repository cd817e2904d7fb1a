"""Where the MLP intermediate activation lives in each supported HF architecture.

The activation that DEPN scores and that a mask multiplies is the input of the MLP's output projection
(`down_proj` in Llama-style models, `c_proj` in GPT-2). Everything that touches that tensor on the HF side
(detector, reference editing, fingerprint) goes through this table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    layers_attr: str  # dotted path from the CausalLM module to the list of decoder layers
    out_proj_attr: str  # dotted path from a decoder layer to the MLP output projection
    mlp_weight_pattern: str  # regex (checkpoint tensor names) of the MLP weights, for the fingerprint

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _getattr_path(model, self.layers_attr)

    def out_proj(self, model: nn.Module, layer: int) -> nn.Module:
        return _getattr_path(self.layers(model)[layer], self.out_proj_attr)


_LLAMA_MLP = r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$"

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", "model.layers", "mlp.down_proj", _LLAMA_MLP),
    "qwen2": ArchAdapter("qwen2", "model.layers", "mlp.down_proj", _LLAMA_MLP),
    "mistral": ArchAdapter("mistral", "model.layers", "mlp.down_proj", _LLAMA_MLP),
    "gpt2": ArchAdapter("gpt2", "transformer.h", "mlp.c_proj", r"h\.\d+\.mlp\.(c_fc|c_proj)\.weight$"),
}


@dataclass(frozen=True)
class MlpShape:
    model_type: str
    num_layers: int
    intermediate_size: int


def adapter_for(model_type: str) -> ArchAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {sorted(ADAPTERS)}"
        ) from None


def mlp_shape(config) -> MlpShape:
    """Layer count and intermediate size of a HF config (object or dict)."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    model_type = cfg.get("model_type", "")
    adapter_for(model_type)
    if model_type == "gpt2":
        inner = cfg.get("n_inner") or 4 * cfg["n_embd"]
        return MlpShape(model_type, cfg["n_layer"], inner)
    return MlpShape(model_type, cfg["num_hidden_layers"], cfg["intermediate_size"])


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a HF model directory (no config.json)")
    return json.loads(path.read_text())


def load_model(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a supported causal LM and its tokenizer for inference (eval mode, no parameter gradients)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_for(read_config(model_dir).get("model_type", ""))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
