"""Random neurons, drawn uniformly over all layers: the paper's baseline for "any neurons would do"."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from depn_serve.artifacts.mask import random_order
from depn_serve.core.console import Bar
from depn_serve.selection.base import Ranking, SelectionInputs, default_size


class RandomSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0


def rank(inputs: SelectionInputs, settings: RandomSettings, bar: Bar | None = None) -> Ranking:
    return Ranking(random_order(inputs.shape.dims, settings.seed), default_size(inputs.shape))
