"""Privacy neuron detection: integrated gradients per record, written to a SCORES file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from depn_serve.artifacts.scores import ScoresFile, ScoresManifest, write_scores
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.cluster import Runner, shared_model
from depn_serve.core.fileio import file_sha256
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import PrivateRecord, load_records
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
    runner: Runner | None = None,
) -> ScoresManifest:
    """Score every record (of `tenant`, or all) and write the SCORES file atomically. On a cluster `runner` the
    records are scored in shards of `settings.shard_records`, one job each; the scores are the same."""
    settings = settings or DetectSettings()
    records = load_records(records_path, tenant)
    shape = mlp_shape(read_config(model_dir))
    layer_list = list(range(shape.num_layers)) if settings.layers is None else sorted(set(settings.layers))
    if on_start:
        on_start(len(records))
    if runner is None or runner.local:  # one pass, streamed, progress per record
        model, tokenizer = shared_model(model_dir, device)
        scored = detect(model, tokenizer, records, settings, on_record_done)
        scores = {record.id: score for record, score in scored}
    else:
        step = settings.shard_records
        jobs = [_Shard(model_dir, device, settings, records[i:i + step]) for i in range(0, len(records), step)]
        done = (lambda shard: [on_record_done() for _ in shard]) if on_record_done else None
        scores = {r.id: s for job, shard in zip(jobs, runner.map(_score_shard, jobs, done))
                  for r, s in zip(job.records, shard)}
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


@dataclass(frozen=True)
class _Shard:
    model_dir: Path
    device: str
    settings: DetectSettings
    records: list[PrivateRecord]


def _score_shard(shard: _Shard) -> list[torch.Tensor]:
    """One job: the scores of a shard's records, in order."""
    model, tokenizer = shared_model(shard.model_dir, shard.device)
    return [score for _, score in detect(model, tokenizer, shard.records, shard.settings)]
