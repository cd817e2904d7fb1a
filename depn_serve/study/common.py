"""What every study shares: the test-bed it runs on, the selection methods it compares, the evaluation of one
mask, and the result file (JSON next to its PNGs) that `depn report` renders."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import torch
from pydantic import BaseModel, Field

from depn_serve.aggregation import DEFAULT_THRESHOLD, default_top_z, random_selection, tally_votes, top_z
from depn_serve.arch import load_model, mlp_shape
from depn_serve.detection import ScoresFile, detect_to_file
from depn_serve.detection.baseline import activation_x_gradient
from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.evaluation.report import StateResult, evaluate_state
from depn_serve.fileio import atomic_write_text
from depn_serve.fingerprint import model_fingerprint
from depn_serve.fitting import FitSettings, fit_selection
from depn_serve.records import PrivateRecord, load_records
from depn_serve.testbed.corpus import read_valid_texts

# The methods a study can compare; the first is the default everywhere (README, "Specificity").
METHODS: dict[str, str] = {
    "fit": "gates fitted to forget the target's secrets and keep other records and text (depn-serve's default)",
    "vote": "DEPN: integrated gradients, records vote, top-z by votes",
    "contrast": "integrated gradients normalized per record, target mean minus other tenants' mean, top-z",
    "kn": "knowledge-neurons-style: activation x gradient at the unscaled point, top-z",
    "random": "neurons drawn uniformly over all layers",
}

# Studies evaluate many masks, so they measure exposure more cheaply than `depn eval` (1,000 candidates, frontier
# 4,096): the exact rank up to 256 surviving prefixes, else the skew-normal fit to 200 candidates. FAST_EVAL: the
# training prompt only; STUDY_EVAL: also the held-out paraphrases (sampling is left to `depn eval --robustness`).
FAST_EVAL = EvalSettings(exposure_samples=200, exposure_max_frontier=256)
STUDY_EVAL = EvalSettings(exposure_samples=200, exposure_max_frontier=256, robustness=True, sample_temperatures=())


class StudyTable(BaseModel):
    title: str
    columns: list[str]
    rows: list[list[str | float | int | None]]


class StudyResult(BaseModel):
    """One study's results file: `RESULTS_DIR/<study>.json`, its figures beside it."""

    study: str
    title: str
    question: str
    testbed: str
    settings: dict
    tables: list[StudyTable]
    findings: list[str] = Field(description="sentences computed from the numbers above")
    plots: list[str] = Field(description="PNG file names in the same folder")
    data: dict
    seconds: float


def write_study(out_dir: Path, result: StudyResult) -> Path:
    path = Path(out_dir) / f"{result.study}.json"
    atomic_write_text(path, result.model_dump_json(indent=2) + "\n")
    return path


def pct(before: float | None, after: float | None) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return round(100 * (after - before) / abs(before), 1)


@dataclass
class Bed:
    """A test-bed (or any model folder with records.jsonl, valid.txt, train.txt beside it), loaded once."""

    path: Path
    model_dir: Path
    model: object
    tokenizer: object
    records: list[PrivateRecord]
    valid: list[str]
    train_texts: list[str]
    _scores: ScoresFile | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path, model_dir: Path | None = None) -> Bed:
        path = Path(path)
        model_dir = model_dir or path / "model"
        for need in (path / "records.jsonl", path / "valid.txt", path / "train.txt", model_dir):
            if not need.exists():
                raise ValueError(f"{path}: not a test-bed folder (missing {need.name}); build one with "
                                 "`depn testbed build`")
        model, tokenizer = load_model(model_dir)
        return cls(path, model_dir, model, tokenizer, load_records(path / "records.jsonl"),
                   read_valid_texts(path / "valid.txt"), read_valid_texts(path / "train.txt"))

    @property
    def shape(self) -> tuple[int, int]:
        s = mlp_shape(self.model.config)
        return (s.num_layers, s.intermediate_size)

    def tenants(self) -> list[str]:
        return sorted({r.tenant for r in self.records})

    def scores(self, cache_dir: Path) -> ScoresFile:
        """Integrated-gradient scores of every record, computed once per model and kept in `cache_dir`."""
        if self._scores is None:
            path = Path(cache_dir) / f"scores-{model_fingerprint(self.model_dir).short}.safetensors"
            if not path.exists():
                detect_to_file(self.model_dir, self.path / "records.jsonl", path)
            self._scores = ScoresFile(path)
        return self._scores

    def ig_sum(self, cache_dir: Path, records: Sequence[PrivateRecord]) -> torch.Tensor:
        scores = self.scores(cache_dir)
        return sum(t for _, t in scores.iter_scores([r.id for r in records]))


@dataclass
class Selection:
    method: str
    off: torch.Tensor
    seconds: float
    info: dict


def select(
    bed: Bed, method: str, targets: Sequence[PrivateRecord], cache_dir: Path, z: int | None = None,
    fit_settings: FitSettings | None = None, seed: int = 0, on_step: Callable | None = None,
) -> Selection:
    """The mask `method` picks for `targets` (the other records of the test-bed are the ones to keep)."""
    started = time.perf_counter()
    target_ids = {r.id for r in targets}
    others = [r for r in bed.records if r.id not in target_ids]
    default_z = default_top_z(*bed.shape)
    info: dict = {}
    if method == "fit":
        off, _, result = fit_selection(bed.model, bed.tokenizer, targets, others, bed.train_texts,
                                       bed.ig_sum(cache_dir, targets), fit_settings, z, on_step)
        info = {"final": result.trace[-1].model_dump(), "keep_windows": result.keep_windows_pool}
    elif method == "vote":
        scores = bed.scores(cache_dir)
        tally = tally_votes((t for _, t in scores.iter_scores([r.id for r in targets])), DEFAULT_THRESHOLD)
        off = top_z(tally, z or default_z)
    elif method == "contrast":
        off = _top(_normalized_mean(bed, cache_dir, targets) - _normalized_mean(bed, cache_dir, others), z or default_z)
    elif method == "kn":
        off = _top(activation_x_gradient(bed.model, bed.tokenizer, targets), z or default_z)
    elif method == "random":
        off = random_selection(bed.shape, z or default_z, seed)
    else:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, found {method!r}")
    return Selection(method, off, time.perf_counter() - started, info)


def _normalized_mean(bed: Bed, cache_dir: Path, records: Sequence[PrivateRecord]) -> torch.Tensor:
    if not records:
        return torch.zeros(bed.shape)
    scores = bed.scores(cache_dir)
    tensors = [t / t.max() if t.max() > 0 else t for _, t in scores.iter_scores([r.id for r in records])]
    return torch.stack(tensors).mean(0)


def _top(values: torch.Tensor, z: int) -> torch.Tensor:
    off = torch.zeros(values.numel(), dtype=torch.bool)
    off[torch.argsort(values.flatten(), descending=True, stable=True)[:z]] = True
    return off.view(values.shape)


def evaluate(bed: Bed, name: str, off: torch.Tensor | None, target: str | None,
             settings: EvalSettings = STUDY_EVAL) -> StateResult:
    """Every record of the test-bed; the paraphrase metrics only for the target tenant's (they cost 3x)."""
    robust = {r.id for r in bed.records if r.tenant == target} if target else None
    return evaluate_state(bed.model, bed.tokenizer, name, off, bed.records, bed.valid, settings, target,
                          robust_ids=robust)


def mean_of(state: StateResult, ids: set[str], attr: str) -> float | None:
    values = [getattr(r, attr) for r in state.records if r.id in ids and getattr(r, attr) is not None]
    return fmean(float(v) for v in values) if values else None


def layer_counts(off: torch.Tensor) -> list[int]:
    return off.sum(dim=1).tolist()


def group_change(before: StateResult, after: StateResult, ids: set[str]) -> dict:
    """Extraction, exposure and paraphrase exposure of the records `ids`, before and after, with changes in %."""
    row: dict = {"records": len(ids)}
    for attr, name in (("extracted", "extraction"), ("exposure", "exposure"), ("paraphrase_exposure", "paraphrase")):
        b, a = mean_of(before, ids, attr), mean_of(after, ids, attr)
        row[f"{name}_before"], row[f"{name}_after"] = b, a
        if name != "extraction":
            row[f"{name}_change_pct"] = pct(b, a)
    return row


def ppl_change(before: StateResult, after: StateResult) -> float | None:
    return pct(before.valid_ppl, after.valid_ppl)


# The targets for the targeted tenant and everyone else (README, "Efficacy").
TARGETS = {
    "target greedy extraction": "0 %",
    "target mean exposure": "-70 % or more",
    "target paraphrase exposure": "-50 % or more",
    "validation perplexity": "+1 % or less",
    "other tenants' mean exposure": "within +-5 %",
}


def target_verdicts(target: dict, others: dict, ppl_pct: float | None) -> list[str]:
    """One sentence per target: reached, or missed by how much."""
    def verdict(name: str, value: float | None, ok: bool, unit: str = "%") -> str:
        shown = "n/a" if value is None else f"{value:+.1f} {unit}"
        return f"{name}: {shown} (target {TARGETS[name]}) - {'reached' if ok else 'missed'}"

    extraction = target["extraction_after"]
    out = [f"target greedy extraction: {100 * extraction:.0f} % of records (target 0 %) - "
           f"{'reached' if extraction == 0 else 'missed'}"]
    out.append(verdict("target mean exposure", target["exposure_change_pct"],
                       (target["exposure_change_pct"] or 0) <= -70))
    out.append(verdict("target paraphrase exposure", target["paraphrase_change_pct"],
                       (target["paraphrase_change_pct"] or 0) <= -50))
    out.append(verdict("validation perplexity", ppl_pct, ppl_pct is not None and ppl_pct <= 1))
    change = others.get("exposure_change_pct")
    out.append(verdict("other tenants' mean exposure", change, change is not None and abs(change) <= 5))
    return out
