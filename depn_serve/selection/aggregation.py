"""One mask from files as one job, so that `depn aggregate` runs it here or (`--ray`) on a cluster node (say, the
one with the GPU): a single mask has nothing to split, but its fit or budget search is the heavy part."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.core.console import Bar
from depn_serve.core.records import read_texts
from depn_serve.core.selectors import MaskPolicy
from depn_serve.selection import inputs_from_files, select
from depn_serve.selection.budget import BudgetReport, BudgetSettings, SearchPoint, budgeted_selection


@dataclass(frozen=True)
class Aggregation:
    policy: MaskPolicy
    method: str
    settings: BaseModel
    scores_path: Path | None
    model_dir: Path | None = None
    records_path: Path | None = None
    keep_text_path: Path | None = None
    valid_path: Path | None = None  # the budget's perplexity text
    top_z: int | None = None
    budget: BudgetSettings | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class Aggregated:
    mask: NeuronMask
    summary: str  # what the method reported (before any budget search)
    report: BudgetReport | None


def aggregate(job: Aggregation, bar: Bar | None = None,
              on_point: Callable[[SearchPoint], None] | None = None) -> Aggregated:
    inputs = inputs_from_files(job.policy, job.scores_path, job.model_dir, job.records_path, job.keep_text_path,
                               job.device)
    chosen = select(inputs, job.method, job.settings, job.top_z, bar)
    summary, report = chosen.summary(), None
    if job.budget is not None:
        chosen, report = budgeted_selection(inputs, chosen, read_texts(job.valid_path), job.budget, on_point=on_point)
    return Aggregated(chosen.to_mask(inputs), summary, report)
