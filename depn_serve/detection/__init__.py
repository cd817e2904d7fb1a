"""Privacy neuron detection: integrated gradients per record, written to a SCORES file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from depn_serve.arch import load_model, mlp_shape
from depn_serve.detection.ig import detect
from depn_serve.detection.scores import ScoresFile, ScoresManifest, write_scores
from depn_serve.fingerprint import model_fingerprint
from depn_serve.records import file_sha256, load_records

__all__ = ["detect", "detect_to_file", "ScoresFile", "ScoresManifest", "write_scores"]


def detect_to_file(
    model_dir: Path,
    records_path: Path,
    out: Path,
    *,
    tenant: str | None = None,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    batch_rows: int = 512,
    device: str = "cpu",
    on_start: Callable[[int], None] | None = None,
    on_record_done: Callable[[], None] | None = None,
) -> ScoresManifest:
    """Score every record (of `tenant`, or all) and write the SCORES file atomically."""
    records = load_records(records_path, tenant)
    model, tokenizer = load_model(model_dir, device)
    shape = mlp_shape(model.config)
    layer_list = list(range(shape.num_layers)) if layers is None else sorted(set(layers))
    if on_start:
        on_start(len(records))
    scores: dict[str, torch.Tensor] = {}
    for record, score in detect(
        model, tokenizer, records, steps=steps, layers=layer_list, batch_rows=batch_rows,
        on_record_done=on_record_done,
    ):
        scores[record.id] = score
    manifest = ScoresManifest(
        model_fingerprint=model_fingerprint(model_dir),
        architecture=shape.model_type,
        num_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        steps=steps,
        layers=layer_list,
        records_sha256=file_sha256(records_path),
        record_tenants={r.id: r.tenant for r in records},
    )
    write_scores(out, manifest, scores)
    return manifest
