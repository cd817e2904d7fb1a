"""Worker side for vLLM 0.32: mask tables next to the model, one per-token slot index filled before each step.

After the weights are loaded, every decoder layer's `down_proj` gets a subclass whose forward first multiplies its
input (the SiluAndMul output) by the token's row of `words[layer]`, read from the resident bits
(`kernels.apply_mask`: a Triton kernel on CUDA, torch elsewhere). Both tensors are allocated once and updated in
place, so the same code is right in eager mode, under torch.compile and inside CUDA graphs. Before each step, after
vLLM has ordered the batch, the per-request slots are expanded to per-token indices on the host and copied to the
device without a sync, through the same kind of buffer vLLM uses for its own inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from depn_serve_patches import deny_untagged, max_mask_slots
from vllm.logger import init_logger
from vllm.lora.layers import RowParallelLinearWithLoRA
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from depn_serve.core.arch import SERVABLE_MODEL_TYPES
from depn_serve.serving.kernels import apply_mask
from depn_serve.serving.request import tenant_of
from depn_serve.serving.slots import MaskSlots

logger = init_logger(__name__)

NOT_A_TENANT = ""  # requests without sampling params (pooling) get the deny row


class WorkerMasks:
    """The worker's tables and index buffer; created once the model is loaded."""

    def __init__(self, runner: GPUModelRunner, num_slots: int, deny: bool):
        hf = runner.model_config.hf_config
        if hf.model_type not in SERVABLE_MODEL_TYPES:
            raise RuntimeError(
                f"depn-serve: model type {hf.model_type!r} is not supported; "
                f"per-tenant masks work with {', '.join(SERVABLE_MODEL_TYPES)}"
            )
        downs = _down_projs(runner.get_model(), hf.num_hidden_layers)
        first = next(iter(downs.values()))
        width = getattr(first, "base_layer", first).input_size_per_partition
        start = first.tp_rank * width
        self.slots = MaskSlots(
            num_slots, hf.num_hidden_layers, hf.intermediate_size, (start, start + width), runner.device,
            deny_untagged=deny,
        )
        self.index = runner._make_buffer(runner.max_num_tokens, dtype=torch.int32)
        self._layers = [(down, type(down)) for down in downs.values()]
        self._eager = runner.model_config.enforce_eager
        for layer, down in downs.items():
            down.__class__ = _masked_class(type(down))
            down.register_buffer("depn_words", self.slots.words[layer], persistent=False)
            down.register_buffer("depn_index", self.index.gpu, persistent=False)
        logger.info(
            "depn-serve: masking %d layers (intermediate shard %d:%d), %d mask slots",
            len(downs), start, start + width, num_slots,
        )

    def set_masking(self, on: bool) -> None:
        """Switch the masked layers back to vLLM's own class and again (`depn bench ratio`: masked and plain steps on
        one engine). Eager engines only: a compiled graph keeps the forward it was traced with."""
        if not self._eager:
            raise RuntimeError("depn-serve: masking can be switched only in an eager engine (enforce_eager=True)")
        for down, base in self._layers:
            down.__class__ = _masked_class(base) if on else base

    def fill(self, runner: GPUModelRunner, num_scheduled_tokens: np.ndarray) -> None:
        requests = runner.requests
        req_ids = runner.input_batch.req_ids[: runner.input_batch.num_reqs]
        tenants = [_tenant(requests[r]) for r in req_ids]
        slots = self.slots.assign(tenants, lambda: {_tenant(s) for s in requests.values()})
        n = int(num_scheduled_tokens.sum())
        self.index.np[:n] = np.repeat(np.asarray(slots, dtype=np.int32), num_scheduled_tokens)
        self.index.copy_to_gpu(n)


def _tenant(state) -> str | None:
    params = state.sampling_params
    return NOT_A_TENANT if params is None else tenant_of(params.extra_args)


def _down_projs(model: torch.nn.Module, num_layers: int) -> dict[int, RowParallelLinear]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) != num_layers:
        raise RuntimeError(f"depn-serve: cannot find the {num_layers} decoder layers in {type(model).__name__}")
    downs: dict[int, RowParallelLinear | RowParallelLinearWithLoRA] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, PPMissingLayer):
            continue
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        # With LoRA enabled vLLM wraps the layer; masking the wrapper's input masks what both the base weights and
        # the adapter read, as in a model with the adapter merged.
        base = down.base_layer if isinstance(down, RowParallelLinearWithLoRA) else down
        if not isinstance(base, RowParallelLinear):
            raise RuntimeError(f"depn-serve: layer {index} has no RowParallelLinear mlp.down_proj")
        # A quantized down_proj quantizes its input itself (weight-only schemes keep it dense), so the mask multiplies
        # the activation before that. Where vLLM would instead fuse the input quantization into SiluAndMul (FP8
        # 128-block and NVFP4 checkpoints on CUDA), this turns the fusion off for the layer, as vLLM's LoRA does.
        down.requires_unquantized_input = True
        downs[index] = down
    if not downs:
        raise RuntimeError("depn-serve: no decoder layer on this pipeline rank")
    return downs


_MASKED: dict[type, type] = {}


def _masked_class(cls: type) -> type:
    """A subclass of the layer's own class whose forward multiplies its input by the token's mask row, expanded
    from the resident bits."""
    if cls not in _MASKED:

        def forward(self, input_):
            return cls.forward(self, apply_mask(input_, self.depn_words, self.depn_index))

        _MASKED[cls] = type(f"DepnMasked{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _MASKED[cls]


def install() -> None:
    """Patch the V1 worker and model runner (inert in engines started without masks)."""
    load_model = Worker.load_model
    prepare_inputs = GPUModelRunner._prepare_inputs

    def patched_load_model(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        num_slots = max_mask_slots(self.vllm_config)
        if num_slots is None:
            return
        if not isinstance(self.model_runner, GPUModelRunner):
            raise RuntimeError(
                f"depn-serve hooks vLLM's V1 model runner, but this worker runs {type(self.model_runner).__name__}"
                " (Model Runner V2 is forced by a feature you enabled, or VLLM_USE_V2_MODEL_RUNNER=1)"
            )
        self.model_runner._depn = WorkerMasks(self.model_runner, num_slots, deny_untagged(self.vllm_config))

    def patched_prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        masks = getattr(self, "_depn", None)
        if masks is not None:
            masks.fill(self, num_scheduled_tokens)
        return result

    Worker.load_model = patched_load_model
    GPUModelRunner._prepare_inputs = patched_prepare_inputs


class DepnWorkerExtension:
    """Methods the server calls in every worker through `collective_rpc` (errors here do not kill the engine)."""

    def depn_bind(self, tenant: str, version: str, packed: bytes | None) -> None:
        self.model_runner._depn.slots.bind(tenant, version, packed)

    def depn_bind_many(self, binds: list[tuple[str, str, bytes | None]]) -> None:
        """Every tenant at start-up in one call (thousands of tenants would otherwise be thousands of calls)."""
        for tenant, version, packed in binds:
            self.model_runner._depn.slots.bind(tenant, version, packed)

    def depn_status(self) -> dict:
        return self.model_runner._depn.slots.status()

    def depn_set_masking(self, on: bool) -> None:
        self.model_runner._depn.set_masking(on)
