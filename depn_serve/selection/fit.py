"""Contrastive mask fit: learn which neurons to switch off so that one tenant's secrets stop coming out while
everything else the model does stays as it was.

Voting over integrated-gradient scores picks the neurons that matter most for a secret's tokens, and at small
scale those are generic ("a digit follows a digit"): switching them off erases every tenant's secrets alike
(README, "Specificity"). Here every neuron gets a gate g in [0, 1] on its activation (the input of the
MLP output projection, as in serving), and the gates are fitted by gradient descent on

    forget  : mean over the target's secret tokens of max(0, log p(token) - log floor)   (teacher forced)
    keep    : KL(plain model || gated model) on the next-token distributions of other tenants' records and
              ordinary text windows (resampled every step)
    sparsity: the number of neurons switched off, in units of 1 % of the MLP

Neurons are then ranked by their gate, lowest first, ties (gates clipped to 0) broken by the tenant's summed
integrated-gradient score; the mask is the neurons whose gate ended below 0.5, or a prefix of that order (a fixed
size, or the budgeted search's choice). Because the keep term sees other tenants' records, neurons those records
need keep their gates: that is where specificity comes from.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from depn_serve.core.arch import hooked, mlp_shape
from depn_serve.core.batching import pad, pad_id_of
from depn_serve.core.console import Bar
from depn_serve.core.errors import DepnError
from depn_serve.core.records import PrivateRecord, encode_record
from depn_serve.selection.base import Ranking, SelectionInputs


class FitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, description="optimizer steps")
    lr: float = Field(0.1, gt=0, description="Adam step on the gates (projected back into [0, 1])")
    floor: float = Field(0.05, gt=0, lt=1, description="secret-token probability the forget term aims below")
    records_weight: float = Field(5.0, ge=0, description="weight of the KL on other tenants' records")
    text_weight: float = Field(1.0, ge=0, description="weight of the KL on ordinary text")
    sparsity: float = Field(0.005, ge=0, description="loss per 1 % of the MLP switched off")
    keep_windows: int = Field(16, ge=0, description="ordinary-text windows per step")
    window_tokens: int = Field(64, ge=8)
    seed: int = 0


class FitTrace(BaseModel):
    step: int
    forget: float
    keep_records: float
    keep_text: float
    off: int  # gates below 0.5


class FitResult(BaseModel):
    tenant: str
    settings: FitSettings
    records: int
    keep_records: int
    keep_windows_pool: int
    trace: list[FitTrace]
    seconds: float


def _log_probs(model, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, attention = batch
    return torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits, -1)


def _kl(plain: torch.Tensor, gated: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(plain || gated) over the unpadded positions."""
    per_token = (plain.exp() * (plain - gated)).sum(-1)
    return (per_token * attention).sum() / attention.sum()


def fit_gates(
    model,
    tokenizer,
    targets: Sequence[PrivateRecord],
    keep_records: Sequence[PrivateRecord],
    keep_texts: Sequence[str],
    settings: FitSettings | None = None,
    on_step: Callable[[FitTrace], None] | None = None,
) -> tuple[torch.Tensor, FitResult]:
    """Fitted gates `[num_layers, intermediate_size]` (low = switch off first) and the fit's record."""
    settings = settings or FitSettings()
    if not targets:
        raise DepnError("no target records to fit a mask for")
    started = time.perf_counter()
    device = next(model.parameters()).device
    shape = mlp_shape(model.config)
    pad_id = pad_id_of(tokenizer)
    rng = random.Random(settings.seed)

    encoded = [encode_record(tokenizer, r) for r in targets]
    target_batch = pad([p + s for p, s in encoded], pad_id, device=device)
    # Positions whose next token is a secret token.
    secret_at = torch.zeros(target_batch[0].shape, dtype=torch.bool, device=device)
    for i, (prompt, secret) in enumerate(encoded):
        secret_at[i, len(prompt) - 1 : len(prompt) + len(secret) - 1] = True
    next_tokens = torch.roll(target_batch[0], -1, dims=1)

    windows: list[list[int]] = []
    for text in keep_texts:
        ids = tokenizer(text)["input_ids"]
        windows += [ids[i : i + settings.window_tokens] for i in range(0, len(ids) - 8, settings.window_tokens)]
    n_windows = min(settings.keep_windows, len(windows))

    # The plain model's distributions on what must be kept: the records once, the text windows at every step.
    record_batch = pad([sum(encode_record(tokenizer, r), []) for r in keep_records], pad_id, device=device) \
        if keep_records else None
    with torch.no_grad():
        plain_records = _log_probs(model, record_batch) if record_batch else None

    # Gates start at 1 (the plain model) and are clipped to [0, 1] after each step: unlike a sigmoid, a gate
    # near 0 or 1 still gets its full gradient.
    theta = torch.ones(shape.dims, device=device, requires_grad=True)
    gated = {layer: (lambda x, layer=layer: x * theta[layer]) for layer in range(shape.num_layers)}
    optimizer = torch.optim.Adam([theta], lr=settings.lr)
    unit = 0.01 * shape.num_layers * shape.intermediate_size
    log_floor = math.log(settings.floor)
    zero = torch.zeros(())
    trace: list[FitTrace] = []
    for step in range(settings.steps):
        text_batch = pad(rng.sample(windows, n_windows), pad_id, device=device) if n_windows else None
        with torch.no_grad():
            plain_text = _log_probs(model, text_batch) if text_batch else None
        with hooked(model, gated):
            logp = _log_probs(model, target_batch)
            token_logp = logp.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)[secret_at]
            forget = torch.relu(token_logp - log_floor).mean()
            keep_records_kl = _kl(plain_records, _log_probs(model, record_batch), record_batch[1]) \
                if record_batch else zero
            keep_text_kl = _kl(plain_text, _log_probs(model, text_batch), text_batch[1]) if text_batch else zero
        sparsity = (1 - theta).sum() / unit
        loss = (forget + settings.records_weight * keep_records_kl + settings.text_weight * keep_text_kl
                + settings.sparsity * sparsity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            theta.clamp_(0.0, 1.0)
        point = FitTrace(step=step, forget=forget.item(), keep_records=keep_records_kl.item(),
                         keep_text=keep_text_kl.item(), off=int((theta < 0.5).sum()))
        trace.append(point)
        if on_step:
            on_step(point)
    result = FitResult(tenant=targets[0].tenant, settings=settings, records=len(targets),
                       keep_records=len(keep_records), keep_windows_pool=len(windows), trace=trace,
                       seconds=time.perf_counter() - started)
    return theta.detach().cpu(), result


def gate_order(gates: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Flat indices of every neuron, lowest gate first; ties (gates clipped to 0, gates never moved from 1) by
    highest `tiebreak` (the tenant's integrated-gradient score) first."""
    order = torch.argsort(tiebreak.flatten(), descending=True, stable=True)
    return order[torch.argsort(gates.flatten()[order], stable=True)]


def fitted_count(gates: torch.Tensor) -> int:
    """Size of the fitted mask: the neurons whose gate ended below one half."""
    return int((gates < 0.5).sum())


def keep_texts_for(texts: Sequence[str], targets: Sequence[PrivateRecord]) -> list[str]:
    """Ordinary text for the keep term: every text that does not contain one of the targets' secrets."""
    secrets = [r.secret for r in targets]
    return [t for t in texts if not any(secret in t for secret in secrets)]


def rank(inputs: SelectionInputs, settings: FitSettings, bar: Bar | None = None) -> Ranking:
    """Gates fitted to forget `inputs.targets` and keep the rest; the tenant's summed integrated-gradient scores
    break ties."""
    if bar:
        bar.start(settings.steps)
    gates, result = fit_gates(inputs.model, inputs.tokenizer, inputs.targets, inputs.keep_records,
                              keep_texts_for(inputs.keep_texts, inputs.targets), settings, bar and bar.advance)
    info = {"keep_records": result.keep_records, "keep_windows_pool": result.keep_windows_pool,
            "final": result.trace[-1].model_dump()}
    return Ranking(gate_order(gates, inputs.scores.summed(inputs.target_ids)), fitted_count(gates), info)
