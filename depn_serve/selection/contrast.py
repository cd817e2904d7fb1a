"""Contrasted integrated-gradient scores: the target's records minus the records to keep, each record normalized
by its own maximum so that every record weighs the same. Tried for specificity (README, "Specificity"): it removes
the generic neurons' advantage but finds no neuron that the secret alone needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict

from depn_serve.artifacts.scores import ScoresFile
from depn_serve.core.console import Bar
from depn_serve.selection.base import Ranking, SelectionInputs, default_size, top_of


class ContrastSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def normalized_mean(scores: ScoresFile, record_ids: Sequence[str], dims: tuple[int, int]) -> torch.Tensor:
    if not record_ids:
        return torch.zeros(dims)
    tensors = [t / t.max() if t.max() > 0 else t for _, t in scores.iter_scores(list(record_ids))]
    return torch.stack(tensors).mean(0)


def rank(inputs: SelectionInputs, settings: ContrastSettings, bar: Bar | None = None) -> Ranking:
    dims = inputs.shape.dims
    keep_ids = [r.id for r in inputs.keep_records]
    contrast = normalized_mean(inputs.scores, inputs.target_ids, dims) - normalized_mean(inputs.scores, keep_ids, dims)
    return Ranking(top_of(contrast), default_size(inputs.shape))
