"""`depn bench detect`: the batched detector (`depn_serve.detection.ig.detect`) against the straightforward
integrated-gradients loop it replaces, on the same records, in one process: time and scores side by side.

The straightforward loop (`naive_scores`) is the textbook one: for every secret token, every layer and every step,
one full forward pass of batch 1 over the whole input (prompt plus the preceding secret tokens, no KV cache shared)
with that layer's activation scaled by alpha_k = k/m at the predicting position, then one backward pass of the target
token's probability. It computes the very same quantity as `detect`, so the scores must agree up to float32
accumulation order; `compare` measures both and the difference.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import BaseModel

from depn_serve.core.arch import hooked, load_model, mlp_shape
from depn_serve.core.records import PrivateRecord, encode_record, load_records
from depn_serve.detection.ig import DetectSettings, detect

RTOL = 1e-4
"""Relative tolerance of the score comparison (float32, a different accumulation order)."""
ATOL_OF_SCALE = 1e-6
"""Absolute tolerance, as a fraction of the largest |score| of the records compared."""


def _alpha(k: int, steps: int) -> float:
    """Left Riemann sum from the zero baseline (the same rule as `detect`)."""
    return k / steps


def _scale(activation: torch.Tensor, pos: int, alpha: float) -> torch.Tensor:
    """The activation with the predicting position scaled by alpha, every other position untouched."""
    scaled = activation.clone()
    scaled[0, pos] = scaled[0, pos] * alpha
    return scaled


def naive_scores(model, tokenizer, record: PrivateRecord, steps: int) -> torch.Tensor:
    """Float32 scores `[num_layers, intermediate_size]` of one record, one forward/backward per token x layer x
    step (the reference that `detect` must equal)."""
    shape = mlp_shape(model.config)
    device = next(model.parameters()).device
    prompt_ids, secret_ids = encode_record(tokenizer, record)
    full = prompt_ids + secret_ids
    scores = torch.zeros(shape.num_layers, shape.intermediate_size)
    for j, target in enumerate(secret_ids):
        pos = len(prompt_ids) + j - 1  # the position whose output predicts secret token j
        input_ids = torch.tensor([full[: pos + 1]], device=device)
        for layer in range(shape.num_layers):
            grad_sum = torch.zeros(shape.intermediate_size, device=device)
            activation = None
            for k in range(steps):
                kept: dict[str, torch.Tensor] = {}

                def scale(x: torch.Tensor, k: int = k) -> torch.Tensor:
                    kept["activation"] = x.detach()[0, pos].clone()
                    scaled = _scale(x.detach(), pos, _alpha(k, steps)).requires_grad_(True)
                    kept["scaled"] = scaled
                    return scaled

                with hooked(model, {layer: scale}), torch.enable_grad():
                    logits = model(input_ids=input_ids).logits[0, pos]
                    prob = torch.softmax(logits.float(), dim=-1)[target]
                    (grad,) = torch.autograd.grad(prob, kept["scaled"])
                grad_sum += grad[0, pos].float()
                activation = kept["activation"].float()
            scores[layer] += (activation * grad_sum / steps).cpu()
    return scores


class DetectorComparison(BaseModel):
    records: int
    secret_tokens: int
    layers: int
    steps: int
    naive_seconds: float
    batched_seconds: float
    speedup: float
    max_abs_diff: float
    max_rel_diff: float  # max |naive - batched| / max |score|
    rtol: float
    atol: float  # ATOL_OF_SCALE x max |score|
    allclose: bool
    device: str
    torch_version: str
    threads: int

    def markdown_header(self) -> str:
        return ("| records | secret tokens | layers | steps | naive (s) | batched (s) | speedup | max abs diff "
                "| max rel diff |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def markdown_row(self) -> str:
        return (f"| {self.records} | {self.secret_tokens} | {self.layers} | {self.steps} | "
                f"{self.naive_seconds:.2f} | {self.batched_seconds:.3f} | {self.speedup:.1f}× | "
                f"{self.max_abs_diff:.2e} | {self.max_rel_diff:.2e} |")


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def compare(model_dir: Path, records_path: Path, n_records: int, steps: int, device: str = "cpu") -> DetectorComparison:
    """Time `detect` and `naive_scores` on the first `n_records` records (model loaded once, float32) and compare."""
    model, tokenizer = load_model(Path(model_dir), device, torch.float32)
    records = load_records(Path(records_path))[:n_records]
    settings = DetectSettings(steps=steps)
    list(detect(model, tokenizer, records[:1], settings))  # warm-up, untimed

    _sync(device)
    start = time.perf_counter()
    naive = [naive_scores(model, tokenizer, record, steps) for record in records]
    _sync(device)
    naive_seconds = time.perf_counter() - start

    _sync(device)
    start = time.perf_counter()
    batched = [score for _, score in detect(model, tokenizer, records, settings)]
    _sync(device)
    batched_seconds = time.perf_counter() - start

    scale = max(float(s.abs().max()) for s in batched)
    atol = ATOL_OF_SCALE * scale
    max_abs = max(float((a - b).abs().max()) for a, b in zip(naive, batched))
    return DetectorComparison(
        records=len(records),
        secret_tokens=sum(len(encode_record(tokenizer, r)[1]) for r in records),
        layers=mlp_shape(model.config).num_layers,
        steps=steps,
        naive_seconds=naive_seconds,
        batched_seconds=batched_seconds,
        speedup=naive_seconds / batched_seconds,
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / scale if scale else 0.0,
        rtol=RTOL,
        atol=atol,
        allclose=all(torch.allclose(a, b, rtol=RTOL, atol=atol) for a, b in zip(naive, batched)),
        device=str(device),
        torch_version=torch.__version__,
        threads=torch.get_num_threads(),
    )
