"""Masks and evaluations that several studies need are computed once per results folder.

Masks are kept as ordinary mask files (`RESULTS/masks/*.safetensors`, the same artifact `depn aggregate` writes,
so any of them can be inspected, evaluated or served). Keys name the model (fingerprint), the method and the
records, so a rebuilt test-bed never reuses stale entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.core.fileio import atomic_write_text
from depn_serve.core.records import PrivateRecord
from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.evaluation.report import StateResult
from depn_serve.selection import method as selection_method
from depn_serve.selection import select
from depn_serve.study.common import STUDY_EVAL, Bed, evaluate


def _key(bed: Bed, *parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
    return f"{bed.fingerprint.short}-{digest}"


def cached_mask(bed: Bed, method: str, targets: Sequence[PrivateRecord], cache_dir: Path, size: int | None = None,
                seed: int = 0) -> NeuronMask:
    """The mask `method` picks to forget `targets` (its own size, or `size`), keeping every other record."""
    key = _key(bed, method, str(size), str(seed), *sorted(r.id for r in targets))
    path = Path(cache_dir) / "masks" / f"{method}-{key}.safetensors"
    if path.exists():
        return NeuronMask.load(path)
    settings_cls = selection_method(method).settings
    settings = settings_cls(**({"seed": seed} if "seed" in settings_cls.model_fields else {}))
    inputs = bed.inputs(targets, cache_dir)
    mask = select(inputs, method, settings, size).to_mask(inputs)
    mask.save(path)
    return mask


def selection_seconds(mask: NeuronMask) -> float:
    """How long the selection took (recorded in the mask's provenance)."""
    return float(mask.manifest.provenance.aggregator.get("seconds", 0.0))


def cached_evaluation(bed: Bed, name: str, off: torch.Tensor | None, target: str | None, cache_dir: Path,
                      settings: EvalSettings = STUDY_EVAL) -> StateResult:
    mask_key = "none" if off is None else hashlib.sha256(off.numpy().tobytes()).hexdigest()
    key = _key(bed, mask_key, str(target), settings.model_dump_json())
    path = Path(cache_dir) / "states" / f"{key}.json"
    if path.exists():
        state = StateResult.model_validate_json(path.read_text(encoding="utf-8"))
        return state.model_copy(update={"name": name})
    state = evaluate(bed, name, off, target, settings=settings)
    atomic_write_text(path, state.model_dump_json())
    return state
