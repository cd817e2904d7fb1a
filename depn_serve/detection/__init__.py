"""Privacy neuron detection: integrated gradients per record, written to a SCORES file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from depn_serve.artifacts.scores import ScoresFile, ScoresManifest, write_scores
from depn_serve.core.arch import load_model, mlp_shape
from depn_serve.core.fileio import file_sha256
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records
from depn_serve.detection.ig import DetectSettings, detect

__all__ = ["DetectSettings", "detect", "detect_to_file", "ScoresFile", "ScoresManifest", "write_scores"]


def detect_to_file(
    model_dir: Path,
    records_path: Path,
    out: Path,
    *,
    tenant: str | None = None,
    settings: DetectSettings | None = None,
    device: str = "cpu",
    on_start: Callable[[int], None] | None = None,
    on_record_done: Callable[[], None] | None = None,
) -> ScoresManifest:
    """Score every record (of `tenant`, or all) and write the SCORES file atomically."""
    settings = settings or DetectSettings()
    records = load_records(records_path, tenant)
    model, tokenizer = load_model(model_dir, device)
    shape = mlp_shape(model.config)
    layer_list = list(range(shape.num_layers)) if settings.layers is None else sorted(set(settings.layers))
    if on_start:
        on_start(len(records))
    scores = {record.id: score for record, score in detect(model, tokenizer, records, settings, on_record_done)}
    manifest = ScoresManifest(
        model_fingerprint=model_fingerprint(model_dir),
        architecture=shape.model_type,
        num_layers=shape.num_layers,
        intermediate_size=shape.intermediate_size,
        steps=settings.steps,
        layers=layer_list,
        records_sha256=file_sha256(records_path),
        record_tenants={r.id: r.tenant for r in records},
    )
    write_scores(out, manifest, scores)
    return manifest
