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
from depn_serve.core.arch import MlpShape, load_model, mlp_shape, read_config
from depn_serve.core.console import Bar
from depn_serve.core.errors import DepnError
from depn_serve.core.fileio import file_sha256
from depn_serve.core.fingerprint import ModelFingerprint, model_fingerprint
from depn_serve.core.records import PrivateRecord, load_records, read_texts
from depn_serve.core.selectors import MaskPolicy

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
    policy: MaskPolicy | None = None  # saved with the mask (default: forget the tenant's own records)

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

    def to_mask(self, inputs: SelectionInputs, tenant: str | None = None) -> NeuronMask:
        """The mask file's content; served to `tenant` (default: the policy's)."""
        if tenant is None:
            if inputs.policy is None:
                raise DepnError("a mask needs a tenant to be served to (no policy given)")
            tenant = inputs.policy.tenant
        provenance = MaskProvenance(
            method=self.label, policy=inputs.policy, records_sha256=inputs.records_sha256,
            records=len(inputs.target_ids),
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


def inputs_from_files(policy: MaskPolicy, scores_path: Path | None = None, model_dir: Path | None = None,
                      records_path: Path | None = None, keep_text_path: Path | None = None,
                      device: str = "cpu") -> SelectionInputs:
    """A policy's inputs from files: the scored records (when given), the model (the one the scores came from),
    the records to forget and to keep as the policy selects them, and ordinary text to keep.

    Without a records file only DEPN's own-records policy can be resolved (from the tenants in the scores file).
    """
    if scores_path is None and model_dir is None:
        raise DepnError("selection needs a scores file or a model")
    scores = ScoresFile(scores_path) if scores_path is not None else None
    if scores is not None:
        shape, fingerprint = scores.manifest.shape, scores.manifest.model_fingerprint
        records_sha256 = scores.manifest.records_sha256
    else:
        shape, fingerprint = mlp_shape(read_config(model_dir)), model_fingerprint(model_dir)
        records_sha256 = file_sha256(records_path) if records_path is not None else None
    inputs = SelectionInputs(shape=shape, fingerprint=fingerprint, target_ids=[], scores=scores,
                             records_sha256=records_sha256, policy=policy)
    if model_dir is not None:
        if scores is not None:
            scores.check_model(model_dir)
        inputs.model, inputs.tokenizer = load_model(model_dir, device)
    if records_path is not None:
        inputs.targets, inputs.keep_records = policy.split(load_records(records_path), str(records_path))
        inputs.target_ids = [r.id for r in inputs.targets]
        if scores is not None:
            unscored = sorted(set(inputs.target_ids) - set(scores.record_ids()))
            if unscored:
                raise DepnError(f"{scores_path}: records to forget were not scored: {unscored[:5]}"
                                f"{' ...' if len(unscored) > 5 else ''} (run `depn detect` on them)")
    elif policy == MaskPolicy.own_records(policy.tenant) and scores is not None:
        inputs.target_ids = scores.record_ids(policy.tenant)
    else:
        raise DepnError(f"the policy ({policy.describe()}) needs the records file (--records)")
    if keep_text_path is not None:
        inputs.keep_texts = read_texts(keep_text_path)
    return inputs


def top_of(values: torch.Tensor) -> torch.Tensor:
    """Flat indices by value, highest first (stable): the order of any method that scores neurons directly."""
    return torch.argsort(values.flatten(), descending=True, stable=True)

