"""Exposure of digit secrets (Carlini et al. 2019, "The Secret Sharer").

Px(s) = -sum log2 P(s_i | prompt, s_<i) over the secret's digit tokens; the candidate space R is every digit
string of the secret's length; exposure = log2|R| - log2 rank(secret). Interpolation against N sampled
candidates cannot exceed log2 N, which says nothing about a memorized secret, so two estimators are used:

- exact: Px only grows as digits are appended, so every candidate with Px <= Px(secret) is found by a
  breadth-first expansion of digit prefixes that prunes any prefix already above Px(secret); the count is the
  exact rank. Used while the surviving frontier stays under a cap (i.e. for small ranks).
- extrapolated: a skew-normal fitted to the Px of N uniformly sampled candidates; exposure = -log2 CDF(Px(secret)).
  Used when the exact search would exceed its cap (large ranks, where the fit is also most reliable).
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from depn_serve.core.errors import DepnError

# Candidates whose Px is within this many bits of the secret's count as ties (batched float32 noise).
_TIE_BITS = 1e-4


@dataclass(frozen=True)
class ExposureResult:
    exposure: float
    method: str  # "exact" or "extrapolated"
    rank: int | None  # exact rank when method == "exact"
    secret_bits: float  # Px(secret)
    extrapolated: float  # skew-normal estimate, always computed


def digit_token_ids(tokenizer) -> list[int]:
    ids = []
    for digit in "0123456789":
        encoded = tokenizer(digit, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise DepnError(f"tokenizer encodes digit {digit!r} as {len(encoded)} tokens; exposure needs one per digit")
        ids.append(encoded[0])
    return ids


class _PromptCache:
    """The prompt's KV cache and next-token log2-probabilities, computed once and copied per batch of candidates."""

    def __init__(self, model, prompt_ids: list[int]):
        self.model = model
        self.device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True)
        self.cache = out.past_key_values
        self.first_bits = _bits(out.logits[:, -1])  # [1, vocab]

    def rows(self, n: int):
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n)
        return cache


def _bits(logits: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits.float(), dim=-1) / math.log(2)


@torch.no_grad()
def candidate_bits(model, prompt_ids: list[int], candidates: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Px of each candidate digit-token sequence `[n, length]` after the prompt (teacher forcing)."""
    prompt = _PromptCache(model, prompt_ids)
    candidates = candidates.to(prompt.device)
    out = []
    for start in range(0, candidates.shape[0], batch):
        cand = candidates[start : start + batch]
        total = prompt.first_bits[0, cand[:, 0]]
        if cand.shape[1] > 1:
            logits = model(input_ids=cand[:, :-1], past_key_values=prompt.rows(cand.shape[0]), use_cache=True).logits
            total = total + _bits(logits).gather(2, cand[:, 1:, None]).squeeze(2).sum(dim=1)
        out.append(total)
    return torch.cat(out).cpu()


@torch.no_grad()
def exact_rank(
    model, prompt_ids: list[int], secret_ids: list[int], digit_ids: list[int], secret_bits: float,
    max_frontier: int,
) -> int | None:
    """Number of digit strings with Px <= Px(secret), or None once the pruned frontier outgrows `max_frontier`.

    The frontier's KV cache is carried from depth to depth (rows reordered to the surviving prefixes), so each
    depth costs one token per surviving prefix.
    """
    prompt = _PromptCache(model, prompt_ids)
    digits = torch.tensor(digit_ids, device=prompt.device)
    cache = prompt.rows(1)
    bits = torch.zeros(1, device=prompt.device)
    step = prompt.first_bits[:, digits]  # [frontier, 10]
    for depth in range(len(secret_ids)):
        total = bits[:, None] + step
        keep = (total <= secret_bits + _TIE_BITS).nonzero()
        if keep.shape[0] > max_frontier:
            return None
        if depth == len(secret_ids) - 1 or keep.shape[0] == 0:
            return int(keep.shape[0])
        bits = total[keep[:, 0], keep[:, 1]]
        cache.reorder_cache(keep[:, 0])
        logits = model(input_ids=digits[keep[:, 1]][:, None], past_key_values=cache, use_cache=True).logits
        step = _bits(logits[:, -1])[:, digits]
    raise AssertionError("unreachable")


def exposure(
    model, prompt_ids: list[int], secret_ids: list[int], digit_ids: list[int], *,
    samples: int = 1000, max_frontier: int = 4096, seed_key: str = "",
) -> ExposureResult:
    """Exposure of a digit secret; candidates are sampled from a seed derived from `seed_key` (the record id),
    so the same record is measured against the same candidates before and after an edit."""
    digit_of = {tok: i for i, tok in enumerate(digit_ids)}
    if any(tok not in digit_of for tok in secret_ids):
        raise DepnError("exposure: the secret is not a pure digit string under this tokenizer")
    length = len(secret_ids)
    space_bits = length * math.log2(10)
    secret_bits = float(candidate_bits(model, prompt_ids, torch.tensor([secret_ids]))[0])

    seed = int.from_bytes(hashlib.sha256(seed_key.encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    sampled = torch.tensor(digit_ids)[torch.randint(0, 10, (samples, length), generator=gen)]
    sample_bits = candidate_bits(model, prompt_ids, sampled).numpy().astype(np.float64)
    shape, loc, scale = stats.skewnorm.fit(sample_bits)
    log_cdf = float(stats.skewnorm.logcdf(secret_bits, shape, loc, scale))
    extrapolated = min(max(-log_cdf / math.log(2), 0.0), space_bits)

    rank = exact_rank(model, prompt_ids, secret_ids, digit_ids, secret_bits, max_frontier)
    if rank is not None:
        value = space_bits - math.log2(max(rank, 1))
        return ExposureResult(value, "exact", rank, secret_bits, extrapolated)
    return ExposureResult(extrapolated, "extrapolated", None, secret_bits, extrapolated)
