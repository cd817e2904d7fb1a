"""DEPN's selection: the records of one tenant vote for neurons; the most-voted neurons form the mask.

Each record keeps the neurons whose score reaches `threshold` x its own maximum and gives each one vote. Neurons
are ranked by votes, ties broken by the score summed over the tenant's records. Only running totals are kept,
so memory does not grow with the number of records. Needs only the SCORES file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from depn_serve.core.errors import DepnError
from depn_serve.core.console import Bar
from depn_serve.selection.base import Ranking, SelectionInputs, default_size

# DEPN's threshold; the mask size (1 % of the MLP) was chosen on the `ci` test-bed (README, "Choosing the vote
# aggregator's defaults").
DEFAULT_THRESHOLD = 0.1


class VoteSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(DEFAULT_THRESHOLD, gt=0, le=1,
                             description="a record votes for neurons scoring >= threshold x its maximum")


@dataclass
class VoteTally:
    votes: torch.Tensor  # int32 [num_layers, intermediate_size]
    summed: torch.Tensor  # float64 [num_layers, intermediate_size]
    records: int = 0
    voters: int = 0  # records with a positive maximum score


def tally_votes(scores: Iterable[torch.Tensor], threshold: float) -> VoteTally:
    if not 0.0 < threshold <= 1.0:
        raise DepnError(f"threshold: expected a fraction in (0, 1], found {threshold}")
    tally: VoteTally | None = None
    for score in scores:
        if tally is None:
            tally = VoteTally(torch.zeros(score.shape, dtype=torch.int32), torch.zeros(score.shape, dtype=torch.float64))
        tally.records += 1
        tally.summed += score
        peak = score.max()
        if peak > 0:
            tally.voters += 1
            tally.votes += (score >= threshold * peak).to(torch.int32)
    if tally is None:
        raise DepnError("no records to aggregate")
    return tally


def vote_order(tally: VoteTally) -> torch.Tensor:
    """Flat indices of every neuron with at least one vote, by (votes, summed score), best first."""
    votes = tally.votes.flatten().to(torch.float64)
    # Sort by the tie-breaker first, then stably by votes.
    order = torch.argsort(tally.summed.flatten(), descending=True, stable=True)
    order = order[torch.argsort(votes[order], descending=True, stable=True)]
    return order[votes[order] > 0]


def rank(inputs: SelectionInputs, settings: VoteSettings, bar: Bar | None = None) -> Ranking:
    tally = tally_votes((t for _, t in inputs.scores.iter_scores(inputs.target_ids)), settings.threshold)
    return Ranking(vote_order(tally), default_size(inputs.shape), {"voters": tally.voters})
