"""Masks and evaluations that several studies need are computed once per results folder.

Keys name the model (fingerprint), the method and the records, so a rebuilt test-bed never reuses stale entries.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import torch

from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.evaluation.report import StateResult
from depn_serve.fileio import atomic_write_bytes, atomic_write_text
from depn_serve.fingerprint import model_fingerprint
from depn_serve.records import PrivateRecord
from depn_serve.study.common import STUDY_EVAL, Bed, Selection, evaluate, select


def _key(bed: Bed, *parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
    return f"{model_fingerprint(bed.model_dir).short}-{digest}"


def cached_selection(bed: Bed, method: str, targets: Sequence[PrivateRecord], cache_dir: Path,
                     z: int | None = None, seed: int = 0) -> Selection:
    key = _key(bed, method, str(z), str(seed), *sorted(r.id for r in targets))
    path = Path(cache_dir) / "masks" / f"{method}-{key}.pt"
    if path.exists():
        saved = torch.load(path)
        return Selection(method, saved["off"], saved["seconds"], saved["info"])
    chosen = select(bed, method, targets, cache_dir, z, seed=seed)
    buf = io.BytesIO()
    torch.save({"off": chosen.off, "seconds": chosen.seconds, "info": chosen.info}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return chosen


def cached_evaluation(bed: Bed, name: str, off: torch.Tensor | None, target: str | None, cache_dir: Path,
                      settings: EvalSettings = STUDY_EVAL) -> StateResult:
    mask_key = "none" if off is None else hashlib.sha256(off.numpy().tobytes()).hexdigest()
    key = _key(bed, mask_key, str(target), settings.model_dump_json())
    path = Path(cache_dir) / "states" / f"{key}.json"
    if path.exists():
        state = StateResult.model_validate_json(path.read_text(encoding="utf-8"))
        return state.model_copy(update={"name": name})
    state = evaluate(bed, name, off, target, settings=settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, state.model_dump_json())
    return state
