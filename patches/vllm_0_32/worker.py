"""Worker side for vLLM 0.32: mask tables next to the model, one per-token slot index filled before each step.

After the weights are loaded, each decoder layer gets a subclass on one module, chosen by `kernels.select_backend`:
with Triton (CUDA) the MLP's SiluAndMul becomes the fused kernel that writes silu(gate) * up already masked by the
token's row of `words[layer]`; with torch (elsewhere), or where the activation is not SiluAndMul, `down_proj` masks
its input first. The tables and the index are allocated once and updated in place, so the same code is right in
eager mode, under torch.compile and inside CUDA graphs. Before each step, after vLLM has ordered the batch, the
per-request slots are expanded to per-token indices on the host and copied to the device without a sync, through
the same kind of buffer vLLM uses for its own inputs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from depn_serve_patches import deny_untagged, max_mask_slots
from vllm.logger import init_logger
from vllm.lora.layers import RowParallelLinearWithLoRA
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.model_executor.models.utils import PPMissingLayer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from depn_serve.core.arch import SERVABLE_MODEL_TYPES
from depn_serve.serving.kernels import (Backend, keep_table, mask_bits_, mask_triton, select_backend,
                                        silu_and_mul_masked_triton)
from depn_serve.serving.request import MaskRequest
from depn_serve.serving.slots import MaskSlots

logger = init_logger(__name__)

NOT_A_TENANT = ("", None)  # requests without sampling params (pooling) get the deny row


class WorkerMasks:
    """The worker's tables and index buffer; created once the model is loaded."""

    def __init__(self, runner: GPUModelRunner, num_slots: int, deny: bool):
        hf = runner.model_config.hf_config
        if hf.model_type not in SERVABLE_MODEL_TYPES:
            raise RuntimeError(
                f"depn-serve: model type {hf.model_type!r} is not supported; "
                f"per-tenant masks work with {', '.join(SERVABLE_MODEL_TYPES)}"
            )
        mlps = _mlps(runner.get_model(), hf.num_hidden_layers)
        first = next(iter(mlps.values())).down_proj
        width = getattr(first, "base_layer", first).input_size_per_partition
        start = first.tp_rank * width
        self.slots = MaskSlots(
            num_slots, hf.num_hidden_layers, hf.intermediate_size, (start, start + width), runner.device,
            deny_untagged=deny,
        )
        self.index = runner._make_buffer(runner.max_num_tokens, dtype=torch.int32)
        self.backend = backend = select_backend(runner.device)
        table = keep_table(runner.model_config.dtype, runner.device) if backend == "torch" else None
        self._layers: list[tuple[torch.nn.Module, type]] = []
        self._eager = runner.model_config.enforce_eager
        self._pairing: dict[int, int] | None = None  # steps seen per token count while `pair_steps` records
        self._step: tuple[int, bool] | None = None
        self._steps: list[tuple[int, bool, float]] = []
        for layer, mlp in mlps.items():
            fused = backend == "triton" and type(mlp.act_fn) is SiluAndMul
            module = mlp.act_fn if fused else mlp.down_proj
            self._layers.append((module, type(module)))
            module.__class__ = _masked_class(type(module), backend)
            module.register_buffer("depn_words", self.slots.words[layer], persistent=False)
            module.register_buffer("depn_index", self.index.gpu, persistent=False)
            module.register_buffer("depn_table", table, persistent=False)
        logger.info(
            "depn-serve: masking %d layers (intermediate shard %d:%d) in %s with %s, %d mask slots",
            len(mlps), start, start + width, self._layers[0][1].__name__, backend, num_slots,
        )

    def set_masking(self, on: bool) -> None:
        """Switch the masked modules back to vLLM's own class and again. Eager engines only: a compiled graph keeps
        the forward it was traced with."""
        if not self._eager:
            raise RuntimeError("depn-serve: masking can be switched only in an eager engine (enforce_eager=True)")
        for module, base in self._layers:
            module.__class__ = _masked_class(base, self.backend) if on else base

    def pair_steps(self, on: bool) -> list[tuple[int, bool, float]]:
        """Start, or stop and return, timed steps with masking switched per step (`depn bench ratio`): the steps of
        each token count go masked, plain, plain, masked, ..., so each two in a row of a count are one pair on the
        same batch shape, in either order. Returns the (tokens, masked, seconds) of each step since the last call,
        which keeps the order going if recording goes on; eager engines only."""
        self.set_masking(True)
        steps, self._steps, self._step = self._steps, [], None
        self._pairing = (self._pairing or {}) if on else None
        return steps

    def status(self) -> dict:
        """The slots' status, and where this worker applies the masks (the backend, the vLLM class it wraps)."""
        return {**self.slots.status(), "backend": self.backend, "masked_module": self._layers[0][1].__name__}

    @property
    def recording(self) -> bool:
        return self._pairing is not None

    def timed(self, seconds: float) -> None:
        if self._step is not None:
            self._steps.append((*self._step, seconds))
            self._step = None

    def live(self, runner: GPUModelRunner) -> set[str]:
        """The mask keys of every request this worker holds."""
        return {self.slots.key(*_mask_of(s)) for s in runner.requests.values() if _mask_of(s)[0]} - {None}

    def fill(self, runner: GPUModelRunner, num_scheduled_tokens: np.ndarray) -> None:
        requests = runner.requests
        req_ids = runner.input_batch.req_ids[: runner.input_batch.num_reqs]
        slots = self.slots.assign([_mask_of(requests[r]) for r in req_ids], lambda: self.live(runner))
        n = int(num_scheduled_tokens.sum())
        self.index.np[:n] = np.repeat(np.asarray(slots, dtype=np.int32), num_scheduled_tokens)
        self.index.copy_to_gpu(n)
        if self.recording:
            seen = self._pairing[n] = self._pairing.get(n, 0) + 1
            masked = seen % 4 in (0, 1)
            self.set_masking(masked)
            self._step = (n, masked)


def _mask_of(state) -> tuple[str | None, str | None]:
    """(tenant, the mask version it was admitted with, or None for its tenant's current one) of a request."""
    params = state.sampling_params
    if params is None:
        return NOT_A_TENANT
    request = MaskRequest.from_extra_args(params.extra_args)
    return (None, None) if request is None else (request.tenant, request.digest)


def _mlps(model: torch.nn.Module, num_layers: int) -> dict[int, torch.nn.Module]:
    """Each decoder layer's MLP on this pipeline rank, checked to have the `down_proj` the mask goes before."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) != num_layers:
        raise RuntimeError(f"depn-serve: cannot find the {num_layers} decoder layers in {type(model).__name__}")
    mlps: dict[int, torch.nn.Module] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, PPMissingLayer):
            continue
        mlp = getattr(layer, "mlp", None)
        down = getattr(mlp, "down_proj", None)
        # With LoRA enabled vLLM wraps the layer; masking the wrapper's input masks what both the base weights and
        # the adapter read, as in a model with the adapter merged.
        base = down.base_layer if isinstance(down, RowParallelLinearWithLoRA) else down
        if not isinstance(base, RowParallelLinear):
            raise RuntimeError(f"depn-serve: layer {index} has no RowParallelLinear mlp.down_proj")
        # A quantized down_proj quantizes its input itself (weight-only schemes keep it dense), so the mask multiplies
        # the activation before that. Where vLLM would instead fuse the input quantization into SiluAndMul (FP8
        # 128-block and NVFP4 checkpoints on CUDA), this turns the fusion off for the layer, as vLLM's LoRA does.
        down.requires_unquantized_input = True
        mlps[index] = mlp
    if not mlps:
        raise RuntimeError("depn-serve: no decoder layer on this pipeline rank")
    return mlps


_MASKED: dict[tuple[type, Backend], type] = {}


def _masked_class(cls: type, backend: Backend) -> type:
    """A subclass of the module's own class that applies each token's row of the resident bits: SiluAndMul's
    becomes the fused Triton kernel; down_proj's masks its input first (Triton's mask alone, or torch's in-place
    AND on the activation, which the MLP does not read again)."""
    if (cls, backend) not in _MASKED:
        if issubclass(cls, SiluAndMul):
            def forward(self, x):
                return silu_and_mul_masked_triton(x, self.depn_words, self.depn_index)
        elif backend == "triton":
            def forward(self, input_):
                return cls.forward(self, mask_triton(input_, self.depn_words, self.depn_index))
        else:
            def forward(self, input_):
                mask_bits_(input_, self.depn_words, self.depn_index, self.depn_table)
                return cls.forward(self, input_)

        name = f"DepnMasked{cls.__name__}"
        _MASKED[cls, backend] = type(name, (cls,), {"forward": forward, "__module__": __name__})
    return _MASKED[cls, backend]


def install() -> None:
    """Patch the V1 worker and model runner (inert in engines started without masks)."""
    load_model = Worker.load_model
    prepare_inputs = GPUModelRunner._prepare_inputs
    execute_model = GPUModelRunner.execute_model

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

    def patched_execute_model(self, *args, **kwargs):
        masks = getattr(self, "_depn", None)
        if masks is None or not masks.recording:
            return execute_model(self, *args, **kwargs)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        result = execute_model(self, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize(self.device)
        masks.timed(time.perf_counter() - start)
        return result

    Worker.load_model = patched_load_model
    GPUModelRunner._prepare_inputs = patched_prepare_inputs
    GPUModelRunner.execute_model = patched_execute_model


class DepnWorkerExtension:
    """Methods the server calls in every worker through `collective_rpc` (errors here do not kill the engine)."""

    def depn_bind(self, tenant: str, version: str, packed: bytes | None) -> None:
        masks = self.model_runner._depn
        masks.slots.bind(tenant, version, packed, lambda: masks.live(self.model_runner))

    def depn_bind_many(self, binds: list[tuple[str, str, bytes | None]]) -> None:
        """Every tenant at start-up in one call (thousands of tenants would otherwise be thousands of calls)."""
        for tenant, version, packed in binds:
            self.depn_bind(tenant, version, packed)

    def depn_status(self) -> dict:
        return self.model_runner._depn.status()


class DepnBenchWorkerExtension(DepnWorkerExtension):
    """The benchmarks' controls on top (`engine_kwargs(bench=True)`): they switch masking off, so a served engine,
    whose operator routes reach `collective_rpc`, never has them."""

    def depn_set_masking(self, on: bool) -> None:
        self.model_runner._depn.set_masking(on)

    def depn_pair_steps(self, on: bool) -> list[tuple[int, bool, float]]:
        return self.model_runner._depn.pair_steps(on)
