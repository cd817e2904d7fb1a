"""What every study shares: the test-bed it runs on, the selection methods it compares, the evaluation of one
mask, and the result file (JSON next to its PNGs) that `depn report` renders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import torch
from pydantic import BaseModel, Field

from depn_serve.artifacts.scores import ScoresFile
from depn_serve.core.arch import MlpShape, load_model, mlp_shape
from depn_serve.core.errors import DepnError
from depn_serve.core.fileio import atomic_write_text
from depn_serve.core.fingerprint import ModelFingerprint, model_fingerprint
from depn_serve.core.records import PrivateRecord, load_records, read_texts
from depn_serve.core.selectors import MaskPolicy
from depn_serve.detection import detect_to_file
from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.evaluation.report import StateResult, evaluate_state
from depn_serve.selection import SelectionInputs

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
    _fingerprint: ModelFingerprint | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path, model_dir: Path | None = None) -> Bed:
        path = Path(path)
        model_dir = model_dir or path / "model"
        for need in (path / "records.jsonl", path / "valid.txt", path / "train.txt", model_dir):
            if not need.exists():
                raise DepnError(f"{path}: not a test-bed folder (missing {need.name}); build one with "
                                "`depn testbed build`")
        model, tokenizer = load_model(model_dir)
        return cls(path, model_dir, model, tokenizer, load_records(path / "records.jsonl"),
                   read_texts(path / "valid.txt"), read_texts(path / "train.txt"))

    @property
    def shape(self) -> MlpShape:
        return mlp_shape(self.model.config)

    @property
    def fingerprint(self) -> ModelFingerprint:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_dir)
        return self._fingerprint

    def tenants(self) -> list[str]:
        return sorted({r.tenant for r in self.records})

    def scores(self, cache_dir: Path) -> ScoresFile:
        """Integrated-gradient scores of every record, computed once per model and kept in `cache_dir`."""
        if self._scores is None:
            path = Path(cache_dir) / f"scores-{self.fingerprint.short}.safetensors"
            if not path.exists():
                detect_to_file(self.model_dir, self.path / "records.jsonl", path)
            self._scores = ScoresFile(path)
        return self._scores

    def inputs(self, targets: Sequence[PrivateRecord], cache_dir: Path) -> SelectionInputs:
        """Selection inputs for forgetting `targets`: every other record of the test-bed and its training mail
        are what the mask must keep."""
        target_ids = {r.id for r in targets}
        scores = self.scores(cache_dir)
        policy = MaskPolicy(tenant="+".join(sorted({r.tenant for r in targets})),
                            forget=(f"id={'|'.join(sorted(target_ids))}",))
        return SelectionInputs(
            shape=self.shape, fingerprint=self.fingerprint, target_ids=[r.id for r in targets], targets=list(targets),
            keep_records=[r for r in self.records if r.id not in target_ids], keep_texts=self.train_texts,
            scores=scores, model=self.model, tokenizer=self.tokenizer, records_sha256=scores.manifest.records_sha256,
            policy=policy,
        )


def evaluate(bed: Bed, name: str, off: torch.Tensor | None, target: str | None,
             settings: EvalSettings = STUDY_EVAL) -> StateResult:
    """Every record of the test-bed; the paraphrase metrics only for the target tenant's (they cost 3x)."""
    robust = {r.id for r in bed.records if r.tenant == target} if target else None
    return evaluate_state(bed.model, bed.tokenizer, name, off, bed.records, bed.valid, settings, target,
                          robust_ids=robust)


def mean_of(state: StateResult, ids: set[str], attr: str) -> float | None:
    values = [getattr(r, attr) for r in state.records if r.id in ids and getattr(r, attr) is not None]
    return fmean(float(v) for v in values) if values else None


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


# What a per-tenant edit should reach, for the targeted tenant and everyone else (README, "Efficacy").
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
