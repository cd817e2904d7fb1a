"""The SCORES file written by the detector and streamed by the selection methods.

safetensors with one float32 `[num_layers, intermediate_size]` tensor per record (keyed by record id) and a
manifest in the metadata under `depn_scores`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save as st_save

from depn_serve.core.arch import MlpShape
from depn_serve.core.errors import DepnError, one_line
from depn_serve.core.fileio import atomic_write_bytes
from depn_serve.core.fingerprint import ModelFingerprint, model_fingerprint

SCORES_KEY = "depn_scores"


class ScoresManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    model_fingerprint: ModelFingerprint
    architecture: str
    num_layers: int
    intermediate_size: int
    steps: int
    layers: list[int] = Field(description="attributed layers; the others score 0")
    target: Literal["token-probability"] = "token-probability"
    records_sha256: str
    record_tenants: dict[str, str] = Field(description="record id -> tenant, for every scored record")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    def detector_params(self) -> dict:
        return {"steps": self.steps, "layers": self.layers, "target": self.target}

    @property
    def shape(self) -> MlpShape:
        return MlpShape(self.architecture, self.num_layers, self.intermediate_size)


class ScoresError(DepnError):
    pass


def write_scores(path: Path, manifest: ScoresManifest, scores: Mapping[str, torch.Tensor]) -> None:
    missing = set(manifest.record_tenants) ^ set(scores)
    if missing:
        raise ScoresError(f"{path}: manifest and tensors disagree on records {sorted(missing)[:5]}")
    data = st_save(
        {rid: t.to(torch.float32).contiguous() for rid, t in scores.items()},
        metadata={SCORES_KEY: manifest.model_dump_json()},
    )
    atomic_write_bytes(Path(path), data)


class ScoresFile:
    """Reads the manifest eagerly and the per-record tensors one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ScoresError(f"{self.path}: no such scores file")
        try:
            with safe_open(self.path, framework="pt") as fh:
                raw = (fh.metadata() or {}).get(SCORES_KEY)
                keys = set(fh.keys())
        except Exception as exc:  # safetensors raises several types for bad files
            raise ScoresError(f"{self.path}: not a safetensors scores file ({exc})") from None
        if raw is None:
            raise ScoresError(f"{self.path}: field '{SCORES_KEY}': expected a scores manifest, found none")
        try:
            self.manifest = ScoresManifest.model_validate_json(raw)
        except ValidationError as exc:
            raise ScoresError(one_line(exc, f"{self.path}: manifest")) from None
        if keys != set(self.manifest.record_tenants):
            raise ScoresError(f"{self.path}: tensors and manifest list different records")

    def record_ids(self, tenant: str | None = None) -> list[str]:
        """Scored records (of `tenant`, or all); asking for a tenant with none is an error naming those present."""
        ids = [rid for rid, t in self.manifest.record_tenants.items() if tenant is None or t == tenant]
        if tenant is not None and not ids:
            tenants = sorted(set(self.manifest.record_tenants.values()))
            raise ScoresError(f"{self.path}: no scored records of tenant {tenant!r}; tenants present: {tenants}")
        return ids

    def check_model(self, model_dir: Path) -> None:
        """Refuse a model other than the one the scores were computed on."""
        if model_fingerprint(model_dir) != self.manifest.model_fingerprint:
            raise ScoresError(f"{model_dir}: not the model {self.path} was computed on (fingerprints differ)")

    def summed(self, record_ids: list[str]) -> torch.Tensor:
        """float64 sum of the records' scores (streamed): how much the records use each neuron together."""
        total = torch.zeros(self.manifest.num_layers, self.manifest.intermediate_size, dtype=torch.float64)
        for _, tensor in self.iter_scores(record_ids):
            total += tensor
        return total

    def iter_scores(self, record_ids: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        shape = (self.manifest.num_layers, self.manifest.intermediate_size)
        with safe_open(self.path, framework="pt") as fh:
            for rid in record_ids:
                tensor = fh.get_tensor(rid)
                if tuple(tensor.shape) != shape:
                    raise ScoresError(f"{self.path}: record {rid!r}: expected shape {shape}, found {tuple(tensor.shape)}")
                yield rid, tensor
