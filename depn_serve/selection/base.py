"""What every selection method shares: its inputs, its answer (a ranking of neurons plus its own mask size), and
the chosen mask with the provenance it is saved with.

A method ranks neurons, most wanted first; a mask is always a prefix of that ranking (`first_n`): the method's
own size, a size the user asks for, or the budgeted search's choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask, first_n
from depn_serve.artifacts.scores import ScoresFile
from depn_serve.core.arch import MlpShape, load_model
from depn_serve.core.console import Bar
from depn_serve.core.errors import DepnError
from depn_serve.core.fingerprint import ModelFingerprint
from depn_serve.core.records import PrivateRecord, RecordsError, load_records, read_texts

# Default mask size of the methods without one of their own: DEPN's 1 % of the model's MLP neurons.
DEFAULT_SIZE_FRACTION = 0.01


def default_size(shape: MlpShape) -> int:
    return max(1, round(DEFAULT_SIZE_FRACTION * shape.num_layers * shape.intermediate_size))


@dataclass
class SelectionInputs:
    """Everything a method may read. Which parts it needs is in its registry entry (`Method.needs`)."""

    shape: MlpShape
    fingerprint: ModelFingerprint
    target_ids: list[str]  # the records to forget (their scores, for the score-based methods)
    targets: list[PrivateRecord] = field(default_factory=list)  # the same records in full (model-based methods)
    keep_records: list[PrivateRecord] = field(default_factory=list)  # records the mask must leave alone
    keep_texts: list[str] = field(default_factory=list)  # ordinary text the mask must leave alone
    scores: ScoresFile | None = None
    model: Any = None
    tokenizer: Any = None
    records_sha256: str | None = None

    def need(self, method: str, *parts: str) -> None:
        missing = [p for p in parts if getattr(self, p) is None or getattr(self, p) == []]
        if missing:
            raise DepnError(f"selection method {method!r} needs {', '.join(missing)}")


@dataclass(frozen=True)
class Ranking:
    order: torch.Tensor  # flat neuron indices, most wanted first
    size: int  # the method's own mask size
    info: dict[str, Any] = field(default_factory=dict)  # what the method reports, kept in the mask's provenance


RankFn = Callable[[SelectionInputs, BaseModel, Bar | None], Ranking]  # the bar shows long rankings' progress


@dataclass(frozen=True)
class Method:
    """One selection method: its settings model and its one implementation (peft keeps one per tuner)."""

    name: str
    description: str
    settings: type[BaseModel]
    rank: RankFn
    provenance: str  # the method name written into mask manifests
    needs: tuple[str, ...]  # SelectionInputs fields it reads


@dataclass(frozen=True)
class Selection:
    """A chosen mask: the prefix `off` of `order`, with what produced it."""

    method: Method
    settings: BaseModel
    order: torch.Tensor
    off: torch.Tensor
    info: dict[str, Any]
    seconds: float
    label: str  # provenance method name: the method's, or e.g. "depn-fit-budgeted"

    @property
    def neurons(self) -> int:
        return int(self.off.sum())

    def resized(self, n: int, label: str, **info: Any) -> Selection:
        """The first `n` neurons of the same order (what budgeted mode picks)."""
        return replace(self, off=first_n(self.order, n, tuple(self.off.shape)), label=label, info={**self.info, **info})

    def summary(self) -> str:
        """One line for the terminal: size, time and what the method reported."""
        details = ", ".join(f"{k} {_short(v)}" for k, v in self.info.items())
        return f"{self.label}: {self.neurons} neurons in {self.seconds:.0f} s ({details})"

    def to_mask(self, inputs: SelectionInputs, tenant: str) -> NeuronMask:
        provenance = MaskProvenance(
            method=self.label, records_sha256=inputs.records_sha256, records=len(inputs.target_ids),
            detector=inputs.scores.manifest.detector_params() if inputs.scores is not None else {},
            aggregator={**self.settings.model_dump(), **self.info, "seconds": round(self.seconds, 1)},
        )
        return NeuronMask.create(tenant, inputs.fingerprint, inputs.shape, self.off, provenance)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def inputs_from_files(scores_path: Path, tenant: str, model_dir: Path | None = None, records_path: Path | None = None,
                      keep_text_path: Path | None = None, device: str = "cpu") -> SelectionInputs:
    """One tenant's inputs from files: its scored records, and (when given) the model the scores came from, its
    records in full with every other tenant's as the ones to keep, and ordinary text to keep."""
    scores = ScoresFile(scores_path)
    inputs = SelectionInputs(shape=scores.manifest.shape, fingerprint=scores.manifest.model_fingerprint,
                             target_ids=scores.record_ids(tenant), scores=scores,
                             records_sha256=scores.manifest.records_sha256)
    if model_dir is not None:
        scores.check_model(model_dir)
        inputs.model, inputs.tokenizer = load_model(model_dir, device)
    if records_path is not None:
        records = load_records(records_path)
        inputs.targets = [r for r in records if r.tenant == tenant]
        inputs.keep_records = [r for r in records if r.tenant != tenant]
        if not inputs.targets:
            raise RecordsError(f"{records_path}: no records of tenant {tenant!r}")
    if keep_text_path is not None:
        inputs.keep_texts = read_texts(keep_text_path)
    return inputs


def top_of(values: torch.Tensor) -> torch.Tensor:
    """Flat indices by value, highest first (stable): the order of any method that scores neurons directly."""
    return torch.argsort(values.flatten(), descending=True, stable=True)

