"""Aggregator: the records of one tenant vote for neurons; the top-z neurons form the tenant's mask.

Each record keeps the neurons whose score reaches `threshold` x its own maximum and gives each one vote. Neurons
are ranked by votes, ties broken by the score summed over the tenant's records. Only running totals are kept,
so memory does not grow with the number of records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from depn_serve.arch import MlpShape
from depn_serve.detection.scores import ScoresFile
from depn_serve.masks import MaskProvenance, NeuronMask

# DEPN's threshold; the mask size was chosen on the `ci` test-bed (README, "Choosing the defaults").
DEFAULT_THRESHOLD = 0.1
DEFAULT_Z_FRACTION = 0.01


@dataclass
class VoteTally:
    votes: torch.Tensor  # int32 [num_layers, intermediate_size]
    summed: torch.Tensor  # float64 [num_layers, intermediate_size]
    records: int = 0
    voters: int = 0  # records with a positive maximum score


def default_top_z(num_layers: int, intermediate_size: int) -> int:
    """Default mask size: a fixed share of the model's MLP neurons."""
    return max(1, round(DEFAULT_Z_FRACTION * num_layers * intermediate_size))


def tally_votes(scores: Iterable[torch.Tensor], threshold: float) -> VoteTally:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: expected a fraction in (0, 1], found {threshold}")
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
        raise ValueError("no records to aggregate")
    return tally


def vote_order(tally: VoteTally) -> torch.Tensor:
    """Flat indices of every neuron with at least one vote, by (votes, summed score), best first."""
    votes = tally.votes.flatten().to(torch.float64)
    # Sort by the tie-breaker first, then stably by votes.
    order = torch.argsort(tally.summed.flatten(), descending=True, stable=True)
    order = order[torch.argsort(votes[order], descending=True, stable=True)]
    return order[votes[order] > 0]


def top_z(tally: VoteTally, z: int) -> torch.Tensor:
    """Bool `[num_layers, intermediate_size]`: the z most-voted neurons (never a neuron without votes)."""
    if z < 1:
        raise ValueError(f"top_z: expected a positive count, found {z}")
    off = torch.zeros(tally.votes.numel(), dtype=torch.bool)
    off[vote_order(tally)[:z]] = True
    return off.view(tally.votes.shape)


def random_selection(shape: tuple[int, int], count: int, seed: int = 0) -> torch.Tensor:
    """Bool mask of `count` neurons drawn uniformly over all layers: the paper's random-neuron baseline."""
    gen = torch.Generator().manual_seed(seed)
    off = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    off[torch.randperm(off.numel(), generator=gen)[:count]] = True
    return off.view(shape)


def tally_file(scores_path: Path, tenant: str, threshold: float = DEFAULT_THRESHOLD) -> tuple[VoteTally, ScoresFile]:
    """The votes of `tenant`'s records in a SCORES file (streamed record by record)."""
    scores = ScoresFile(scores_path)
    record_ids = scores.record_ids(tenant)
    if not record_ids:
        tenants = sorted(set(scores.manifest.record_tenants.values()))
        raise ValueError(f"{scores_path}: no scored records of tenant {tenant!r}; tenants present: {tenants}")
    return tally_votes((t for _, t in scores.iter_scores(record_ids)), threshold), scores


def check_scores_model(scores: ScoresFile, model_dir: Path) -> None:
    """Refuse a model other than the one the scores were computed on."""
    from depn_serve.fingerprint import model_fingerprint

    if model_fingerprint(model_dir) != scores.manifest.model_fingerprint:
        raise ValueError(f"{model_dir}: not the model {scores.path} was computed on (fingerprints differ)")


def mask_from(scores: ScoresFile, tenant: str, off: torch.Tensor, records: int, method: str,
              aggregator: dict) -> NeuronMask:
    m = scores.manifest
    provenance = MaskProvenance(method=method, records_sha256=m.records_sha256, records=records,
                                detector=m.detector_params(), aggregator=aggregator)
    shape = MlpShape(m.architecture, m.num_layers, m.intermediate_size)
    return NeuronMask.create(tenant, m.model_fingerprint, shape, off, provenance)


def aggregate_file(
    scores_path: Path, tenant: str, threshold: float = DEFAULT_THRESHOLD, z: int | None = None
) -> NeuronMask:
    """Build `tenant`'s mask from a SCORES file: the top-z neurons by votes."""
    tally, scores = tally_file(scores_path, tenant, threshold)
    m = scores.manifest
    z = default_top_z(m.num_layers, m.intermediate_size) if z is None else z
    return mask_from(scores, tenant, top_z(tally, z), tally.records, "depn-vote",
                     {"threshold": threshold, "top_z": z, "voters": tally.voters})
