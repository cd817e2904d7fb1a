"""Knowledge-neurons-style selection (the baseline DEPN compares with): the neurons with the highest activation x
gradient at the unscaled point, no path integral."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from depn_serve.detection.baseline import activation_x_gradient
from depn_serve.core.console import Bar
from depn_serve.selection.base import Ranking, SelectionInputs, default_size, top_of


class KnSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def rank(inputs: SelectionInputs, settings: KnSettings, bar: Bar | None = None) -> Ranking:
    return Ranking(top_of(activation_x_gradient(inputs.model, inputs.tokenizer, inputs.targets)),
                   default_size(inputs.shape))
