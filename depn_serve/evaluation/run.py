"""Evaluate a model before and after a mask (and a random mask of the same size)."""

from __future__ import annotations

from pathlib import Path

from depn_serve.artifacts.mask import NeuronMask, first_n, random_order
from depn_serve.core.arch import load_model, mlp_shape
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records, read_texts
from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.evaluation.report import EvalReport, evaluate_state


def evaluate(
    model_dir: Path,
    records_path: Path,
    valid_path: Path,
    mask_path: Path | None = None,
    *,
    random_baseline: bool = True,
    seed: int = 0,
    settings: EvalSettings | None = None,
    device: str = "cpu",
    on_start=None,
    progress=None,
) -> EvalReport:
    """Evaluate the plain model, then (with a mask) the masked model and a random mask of the same size."""
    settings = settings or EvalSettings()
    records = load_records(records_path)
    valid_texts = read_texts(valid_path)
    model, tokenizer = load_model(model_dir, device)
    states: list[tuple[str, object]] = [("before", None)]
    target = None
    if mask_path is not None:
        mask = NeuronMask.load(mask_path)
        mask.check_model(model_fingerprint(model_dir), mlp_shape(model.config), source=mask_path)
        target = mask.manifest.tenant
        states.append(("after", mask.off))
        if random_baseline:
            dims = tuple(mask.off.shape)
            states.append(("random", first_n(random_order(dims, seed), int(mask.off.sum()), dims)))
    if on_start:
        on_start(len(states) * len(records))
    results = [
        evaluate_state(model, tokenizer, name, off, records, valid_texts, settings, target, progress)
        for name, off in states
    ]
    return EvalReport(
        model=str(model_dir), records_file=str(records_path), mask=None if mask_path is None else str(mask_path),
        target_tenant=target, settings=settings, states=results,
    )
