"""The architecture table: where the MLP intermediate activation lives in each supported HF architecture, which
architectures the server can mask, and the one way to intervene on that activation (`hooked`).

The activation that DEPN scores and that a mask multiplies is the input of the MLP's output projection
(`down_proj` in Llama-style models, `c_proj` in GPT-2). Everything that touches that tensor on the HF side
(detector, attribution baseline, mask fit, reference editing, fingerprint) goes through this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depn_serve.core.errors import DepnError


class ModelError(DepnError):
    """A model folder that cannot be used: missing files, or an architecture this project does not handle."""


class UnsupportedArchitectureError(ModelError):
    pass


@dataclass(frozen=True)
class ArchAdapter:
    model_type: str
    layers_attr: str  # dotted path from the CausalLM module to the list of decoder layers
    out_proj_attr: str  # dotted path from a decoder layer to the MLP output projection
    mlp_weight_pattern: str  # regex (checkpoint tensor names) of the MLP weights, for the fingerprint
    servable: bool  # `depn serve` can mask it (the vLLM patches handle its MLP)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _getattr_path(model, self.layers_attr)

    def out_proj(self, model: nn.Module, layer: int) -> nn.Module:
        return _getattr_path(self.layers(model)[layer], self.out_proj_attr)


_LLAMA_MLP = r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight$"

ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", "model.layers", "mlp.down_proj", _LLAMA_MLP, servable=True),
    "qwen2": ArchAdapter("qwen2", "model.layers", "mlp.down_proj", _LLAMA_MLP, servable=True),
    "mistral": ArchAdapter("mistral", "model.layers", "mlp.down_proj", _LLAMA_MLP, servable=True),
    "gpt2": ArchAdapter("gpt2", "transformer.h", "mlp.c_proj", r"h\.\d+\.mlp\.(c_fc|c_proj)\.weight$",
                        servable=False),
}
SERVABLE_MODEL_TYPES: tuple[str, ...] = tuple(name for name, a in ADAPTERS.items() if a.servable)


@dataclass(frozen=True)
class MlpShape:
    model_type: str
    num_layers: int
    intermediate_size: int

    @property
    def dims(self) -> tuple[int, int]:
        """`(num_layers, intermediate_size)`: the shape of every per-neuron tensor (scores, masks, gates)."""
        return (self.num_layers, self.intermediate_size)


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
        raise ModelError(f"{model_dir}: not a HF model directory (no config.json)")
    return json.loads(path.read_text())


def load_model(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a supported causal LM and its tokenizer for inference (eval mode, no parameter gradients)."""
    from transformers import AutoModelForCausalLM

    adapter_for(read_config(model_dir).get("model_type", ""))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(model_dir)


def load_tokenizer(model_dir: Path):
    """The model's tokenizer alone (what an API client needs to speak token ids)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


ActivationFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def hooked(model: nn.Module, fns: Mapping[int, ActivationFn]) -> Iterator[None]:
    """Within the block, layer l's MLP activation (the input of its output projection) is replaced by
    `fns[l](activation)`; layers without a function are untouched. The hooks are removed on exit, error or not."""
    adapter = adapter_for(model.config.model_type)
    handles = [
        adapter.out_proj(model, layer).register_forward_pre_hook(
            lambda _module, args, fn=fn: (fn(args[0]), *args[1:])
        )
        for layer, fn in fns.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
