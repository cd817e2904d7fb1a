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
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from depn_serve.aggregation import check_scores_model, mask_from, tally_file
from depn_serve.arch import adapter_for, load_model, mlp_shape
from depn_serve.masks import NeuronMask
from depn_serve.records import PrivateRecord, encode_record, load_records
from depn_serve.testbed.corpus import read_valid_texts


class FitSettings(BaseModel):
    steps: int = Field(200, ge=1)
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


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
    return ids.to(device), attention.to(device)


def _kl_to_plain(model, gates: list, batch: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Mean per-token KL(plain || gated) over a padded batch; the plain pass runs with the gates lifted."""
    if batch is None:
        return torch.zeros(())
    ids, attention = batch
    current, gates[0] = gates[0], None
    with torch.no_grad():
        plain = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits, -1)
    gates[0] = current
    gated = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits, -1)
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
        raise ValueError("no target records to fit a mask for")
    started = time.perf_counter()
    device = next(model.parameters()).device
    shape = mlp_shape(model.config)
    adapter = adapter_for(model.config.model_type)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(settings.seed)

    encoded = [encode_record(tokenizer, r) for r in targets]
    target_ids, target_attention = _pad([p + s for p, s in encoded], pad_id, device)
    # Positions whose next token is a secret token.
    secret_at = torch.zeros(target_ids.shape, dtype=torch.bool, device=device)
    for i, (prompt, secret) in enumerate(encoded):
        secret_at[i, len(prompt) - 1 : len(prompt) + len(secret) - 1] = True
    next_tokens = torch.roll(target_ids, -1, dims=1)

    keep_record_seqs = [sum(encode_record(tokenizer, r), []) for r in keep_records]
    windows: list[list[int]] = []
    for text in keep_texts:
        ids = tokenizer(text)["input_ids"]
        windows += [ids[i : i + settings.window_tokens] for i in range(0, len(ids) - 8, settings.window_tokens)]

    # Gates start at 1 (the plain model) and are clipped to [0, 1] after each step: unlike a sigmoid, a gate
    # near 0 or 1 still gets its full gradient.
    record_batch = _pad(keep_record_seqs, pad_id, device) if keep_record_seqs else None
    n_windows = min(settings.keep_windows, len(windows))
    theta = torch.ones((shape.num_layers, shape.intermediate_size), device=device, requires_grad=True)
    gates: list[torch.Tensor | None] = [None]

    def hook(layer: int):
        return lambda _m, args: (args[0] * gates[0][layer], *args[1:]) if gates[0] is not None else None

    handles = [adapter.out_proj(model, layer).register_forward_pre_hook(hook(layer))
               for layer in range(shape.num_layers)]
    optimizer = torch.optim.Adam([theta], lr=settings.lr)
    unit = 0.01 * shape.num_layers * shape.intermediate_size
    log_floor = math.log(settings.floor)
    trace: list[FitTrace] = []
    try:
        for step in range(settings.steps):
            gates[0] = theta
            logp = torch.log_softmax(model(input_ids=target_ids, attention_mask=target_attention).logits, -1)
            token_logp = logp.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)[secret_at]
            forget = torch.relu(token_logp - log_floor).mean()
            keep_records_kl = _kl_to_plain(model, gates, record_batch)
            keep_text_kl = _kl_to_plain(model, gates, _pad(rng.sample(windows, n_windows), pad_id, device)
                                        if n_windows else None)
            sparsity = (1 - gates[0]).sum() / unit
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
    finally:
        for handle in handles:
            handle.remove()
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


def fit_selection(
    model, tokenizer, targets: Sequence[PrivateRecord], keep_records: Sequence[PrivateRecord],
    texts: Sequence[str], tiebreak: torch.Tensor, settings: FitSettings | None = None, z: int | None = None,
    on_step: Callable[[FitTrace], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, FitResult]:
    """(off mask, gate order, fit record): the fitted mask, or the first `z` neurons of the gate order."""
    gates, result = fit_gates(model, tokenizer, targets, keep_records, keep_texts_for(texts, targets), settings,
                              on_step)
    order = gate_order(gates, tiebreak)
    off = torch.zeros(gates.numel(), dtype=torch.bool)
    off[order[: fitted_count(gates) if z is None else z]] = True
    return off.view(gates.shape), order, result


def fit_file(
    scores_path: Path, tenant: str, model_dir: Path, records_path: Path, keep_text_path: Path,
    settings: FitSettings | None = None, z: int | None = None, device: str = "cpu",
    on_step: Callable[[FitTrace], None] | None = None,
) -> tuple[NeuronMask, torch.Tensor, FitResult]:
    """`tenant`'s fitted mask (its own size, or the first `z` of the gate order), the order, and the fit record.

    Targets are the tenant's records in RECORDS, kept records all the others; ordinary text is KEEP_TEXT
    (e-mails separated by blank lines) minus any text that contains one of the targets' secrets.
    """
    settings = settings or FitSettings()
    tally, scores = tally_file(scores_path, tenant)
    check_scores_model(scores, model_dir)
    model, tokenizer = load_model(model_dir, device)
    records = load_records(records_path)
    targets = [r for r in records if r.tenant == tenant]
    keep = [r for r in records if r.tenant != tenant]
    off, order, result = fit_selection(model, tokenizer, targets, keep, read_valid_texts(keep_text_path),
                                       tally.summed, settings, z, on_step)
    aggregator = {**settings.model_dump(), "top_z": z, "keep_records": len(keep),
                  "keep_windows": result.keep_windows_pool, "fit_seconds": round(result.seconds, 1)}
    return mask_from(scores, tenant, off, len(targets), "depn-fit", aggregator), order, result
