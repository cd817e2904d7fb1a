"""Contrastive mask fit: learn which neurons to switch off so that the records to forget stop coming out, under
every attack of the suite, while the records to keep and ordinary text stay as they were.

Voting over integrated-gradient scores picks the neurons that matter most for a secret's tokens, and at small
scale those are generic ("a digit follows a digit"): switching them off erases every tenant's secrets alike
(README, "Specificity"). Here every neuron gets a gate g in [0, 1] on its activation (the input of the MLP output
projection, as in serving), and the gates are fitted by gradient descent on

    forget  : per secret token, max(0, log p(token) - log floor), teacher forced, after the record's prompt and
              after the prompt behind a window of the keep text (so the fit forgets the secret, not one
              context); weighted per record
    keep    : KL(plain model || gated model) on the next-token distributions of the records to keep and of
              ordinary text windows, and the fall in log-probability of the kept records' secret tokens; the
              kept records are weighted per record
    sparsity: the number of neurons switched off, in units of 1 % of the MLP

Every step draws a minibatch of records (each record's chance grows with its weight), so memory is bounded by the
batch, not by the number of records. The fit runs in rounds: after each, the thresholded mask (gates below 0.5)
is put through the attack suite (greedy, behind unrelated mails, sampling, the logprob beam, substitution,
exposure; never the held-out paraphrases, which stay for the certificate), every record that still leaks (or
whose exposure fell by less than `exposure_drop`) gets `boost` times
its weight, every kept record that stopped coming out gets `boost` times its keep weight, and the next round
continues from the current gates. It stops when nothing leaks and nothing kept is lost, or when the budget
(rounds, seconds) runs out.

Neurons are ranked by their gate, lowest first, ties broken by the targets' summed integrated-gradient scores
when there are any; the mask is the neurons whose gate ended below 0.5, or a prefix of that order.
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
from depn_serve.editing import masked
from depn_serve.evaluation.attacks import AttackSettings, ModelOracle, run_attacks
from depn_serve.selection.base import Ranking, SelectionInputs


class FitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(200, ge=1, description="optimizer steps of the first round")
    round_steps: int = Field(100, ge=1, description="optimizer steps of every later round")
    rounds: int = Field(6, ge=1, description="fit-then-attack rounds at most (1: no attack between rounds)")
    max_seconds: float | None = Field(None, gt=0, description="no new round after this many seconds")
    boost: float = Field(4.0, ge=1, description="weight factor for a record that still leaks (or a kept one lost)")
    lr: float = Field(0.1, gt=0, description="Adam step on the gates (projected back into [0, 1])")
    floor: float = Field(0.05, gt=0, lt=1, description="secret-token probability the forget term aims below")
    records_weight: float = Field(5.0, ge=0, description="weight of the KL on the records to keep")
    secret_keep_weight: float = Field(5.0, ge=0, description="weight of the fall in log-probability of the kept "
                                                             "records' secret tokens")
    text_weight: float = Field(10.0, ge=0, description="weight of the KL on ordinary text")
    sparsity: float = Field(0.005, ge=0, description="loss per 1 % of the MLP switched off")
    batch_records: int = Field(64, ge=1, description="records to forget (and to keep) per step")
    context: bool = Field(True, description="also forget each secret behind a window of ordinary text (resampled)")
    context_tokens: int = Field(24, ge=1, description="length of that window, in tokens")
    keep_windows: int = Field(16, ge=0, description="ordinary-text windows per step")
    window_tokens: int = Field(64, ge=8)
    exposure_drop: float = Field(0.7, ge=0, lt=1, description="a digit record whose exposure fell by less than this "
                                                              "share still counts as leaking (0: ignore exposure)")
    attacks: AttackSettings = Field(AttackSettings(paraphrases=False, exposure_samples=200),
                                    description="the attacks between rounds (never the held-out paraphrases)")
    seed: int = 0


class FitTrace(BaseModel):
    step: int
    forget: float
    keep_records: float
    keep_secrets: float
    keep_text: float
    off: int  # gates below 0.5


class FitRound(BaseModel):
    """What the attacks found after one round."""

    round: int
    step: int
    off: int
    leaking: list[str]  # forget records that some attack still got out
    lost: list[str]  # kept records greedy decoding no longer reproduces
    seconds: float


class FitResult(BaseModel):
    settings: FitSettings
    records: int
    keep_records: int
    keep_windows_pool: int
    trace: list[FitTrace]
    rounds: list[FitRound]
    seconds: float

    @property
    def verified(self) -> bool:
        return bool(self.rounds) and not self.rounds[-1].leaking and not self.rounds[-1].lost


def _log_probs(model, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, attention = batch
    return torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits, -1)


def _kl(plain: torch.Tensor, gated: torch.Tensor, attention: torch.Tensor, row_weight: torch.Tensor | None = None
        ) -> torch.Tensor:
    """Per-token KL(plain || gated) summed over the unpadded positions (times each row's weight) over their count."""
    per_token = (plain.exp() * (plain - gated)).sum(-1) * attention
    if row_weight is not None:
        per_token = per_token * row_weight[:, None]
    return per_token.sum() / attention.sum()


class GateFit:
    """The gates and everything a step needs; `run` continues from where the last call stopped."""

    def __init__(self, model, tokenizer, targets: Sequence[PrivateRecord], keep_records: Sequence[PrivateRecord],
                 keep_texts: Sequence[str], settings: FitSettings):
        if not targets:
            raise DepnError("no records to forget: a mask needs at least one")
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.targets, self.keep_records, self.keep_texts = list(targets), list(keep_records), list(keep_texts)
        self.device = next(model.parameters()).device
        self.shape = mlp_shape(model.config)
        self.pad_id = pad_id_of(tokenizer)
        self.rng = random.Random(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.encoded = [encode_record(tokenizer, r) for r in self.targets]
        self.keep_encoded = [encode_record(tokenizer, r) for r in self.keep_records]
        self.windows: list[list[int]] = []
        for text in self.keep_texts:
            ids = tokenizer(text)["input_ids"]
            self.windows += [ids[i : i + settings.window_tokens] for i in range(0, len(ids) - 8, settings.window_tokens)]
        self.forget_weight = torch.ones(len(self.targets))
        self.keep_weight = torch.ones(len(self.keep_records))
        # Gates start at 1 (the plain model) and are clipped to [0, 1] after each step: unlike a sigmoid, a gate
        # near 0 or 1 still gets its full gradient.
        self.theta = torch.ones(self.shape.dims, device=self.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.theta], lr=settings.lr)
        self.trace: list[FitTrace] = []

    def _draw(self, weights: torch.Tensor, n: int) -> list[int]:
        """All indices if they fit in one batch, else `n` drawn without replacement, in proportion to `weights`."""
        if len(weights) <= n:
            return list(range(len(weights)))
        return torch.multinomial(weights, n, replacement=False, generator=self.generator).tolist()

    def _forget_batch(self, chosen: list[int]):
        """Token ids, the positions whose next token is a secret token, and each such position's weight."""
        rows: list[tuple[list[int], list[int], float]] = []
        for i in chosen:
            prompt, secret = self.encoded[i]
            rows.append((prompt, secret, float(self.forget_weight[i])))
            if self.settings.context and self.windows:
                window = self.rng.choice(self.windows)[-self.settings.context_tokens :]
                mail = self.tokenizer.decode(window, skip_special_tokens=True)
                prompt, secret = encode_record(self.tokenizer, self.targets[i], f"{mail}\n{self.targets[i].prompt}")
                rows.append((prompt, secret, float(self.forget_weight[i])))
        batch = pad([p + s for p, s, _ in rows], self.pad_id, device=self.device)
        weight = torch.zeros(batch[0].shape, device=self.device)
        for row, (prompt, secret, w) in enumerate(rows):
            weight[row, len(prompt) - 1 : len(prompt) + len(secret) - 1] = w
        return batch, weight, torch.roll(batch[0], -1, dims=1)

    def _keep_batch(self, chosen: list[int]):
        """Token ids of the kept records, each row's weight, and the positions whose next token is a secret's."""
        rows = [self.keep_encoded[i] for i in chosen]
        batch = pad([p + s for p, s in rows], self.pad_id, device=self.device)
        row_weight = torch.tensor([float(self.keep_weight[i]) for i in chosen], device=self.device)
        secret_at = torch.zeros(batch[0].shape, dtype=torch.bool, device=self.device)
        for row, (prompt, secret) in enumerate(rows):
            secret_at[row, len(prompt) - 1 : len(prompt) + len(secret) - 1] = True
        return batch, row_weight, secret_at, torch.roll(batch[0], -1, dims=1)

    def run(self, steps: int, on_step: Callable[[FitTrace], None] | None = None) -> None:
        s = self.settings
        gated = {layer: (lambda x, layer=layer: x * self.theta[layer]) for layer in range(self.shape.num_layers)}
        unit = 0.01 * self.shape.num_layers * self.shape.intermediate_size
        log_floor = math.log(s.floor)
        zero = torch.zeros((), device=self.device)
        n_windows = min(s.keep_windows, len(self.windows))
        for _ in range(steps):
            forget_batch, weight, next_tokens = self._forget_batch(self._draw(self.forget_weight, s.batch_records))
            keep = self._keep_batch(self._draw(self.keep_weight, s.batch_records)) if self.keep_records else None
            text_batch = pad(self.rng.sample(self.windows, n_windows), self.pad_id, device=self.device) \
                if n_windows else None
            with torch.no_grad():
                plain_keep = _log_probs(self.model, keep[0]) if keep else None
                plain_text = _log_probs(self.model, text_batch) if text_batch else None
            with hooked(self.model, gated):
                logp = _log_probs(self.model, forget_batch)
                token_logp = logp.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
                secret_at = weight > 0
                forget = (torch.relu(token_logp - log_floor) * weight)[secret_at].sum() / secret_at.sum()
                keep_kl, keep_secret = (zero, zero) if keep is None else self._keep_terms(plain_keep, *keep)
                text_kl = _kl(plain_text, _log_probs(self.model, text_batch), text_batch[1]) if text_batch else zero
            sparsity = (1 - self.theta).sum() / unit
            loss = (forget + s.records_weight * keep_kl + s.secret_keep_weight * keep_secret
                    + s.text_weight * text_kl + s.sparsity * sparsity)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            with torch.no_grad():
                self.theta.clamp_(0.0, 1.0)
            point = FitTrace(step=len(self.trace), forget=forget.item(), keep_records=keep_kl.item(),
                             keep_secrets=keep_secret.item(), keep_text=text_kl.item(),
                             off=int((self.theta < 0.5).sum()))
            self.trace.append(point)
            if on_step:
                on_step(point)

    def _keep_terms(self, plain, batch, row_weight, secret_at, next_tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-weighted KL over the kept records, and how far their secret tokens' log-probabilities fell."""
        gated = _log_probs(self.model, batch)
        kl = _kl(plain, gated, batch[1], row_weight)
        fell = plain.gather(-1, next_tokens.unsqueeze(-1)) - gated.gather(-1, next_tokens.unsqueeze(-1))
        fell = torch.relu(fell.squeeze(-1)) * row_weight[:, None]
        return kl, fell[secret_at].sum() / secret_at.sum()

    @property
    def gates(self) -> torch.Tensor:
        return self.theta.detach().cpu()

    def attack(self, kept_before: set[str], exposure_before: dict[str, float]) -> tuple[list[str], list[str]]:
        """(forget records some attack still gets out, or whose exposure did not fall enough; kept records no
        longer reproduced) under the current mask."""
        attacks = self.settings.attacks.model_copy(update={"exposure": bool(exposure_before)})
        with masked(self.model, self.gates < 0.5):
            report = run_attacks(ModelOracle(self.model, self.tokenizer), self.tokenizer, self.targets,
                                 [r for r in self.keep_records if r.id in kept_before], self.keep_texts, attacks,
                                 self.model)
        allowed = 1 - self.settings.exposure_drop
        leaking = [r.id for r in report.of("forget") if r.leaks or (
            r.exposure is not None and r.id in exposure_before and r.exposure > allowed * exposure_before[r.id])]
        return leaking, [r.id for r in report.of("keep") if not r.reproduced]

    def boost(self, leaking: list[str], lost: list[str]) -> None:
        for weights, records, ids in ((self.forget_weight, self.targets, set(leaking)),
                                      (self.keep_weight, self.keep_records, set(lost))):
            for i, record in enumerate(records):
                if record.id in ids:
                    weights[i] *= self.settings.boost


def fit_gates(
    model,
    tokenizer,
    targets: Sequence[PrivateRecord],
    keep_records: Sequence[PrivateRecord],
    keep_texts: Sequence[str],
    settings: FitSettings | None = None,
    on_step: Callable[[FitTrace], None] | None = None,
    on_round: Callable[[FitRound], None] | None = None,
) -> tuple[torch.Tensor, FitResult]:
    """Fitted gates `[num_layers, intermediate_size]` (low = switch off first) and the fit's record."""
    settings = settings or FitSettings()
    started = time.perf_counter()
    fit = GateFit(model, tokenizer, targets, keep_records, keep_texts, settings)
    kept_before: set[str] = set()
    exposure_before: dict[str, float] = {}
    if settings.rounds > 1:
        plain = settings.attacks.model_copy(update={"samples": 0, "beam_width": 0, "contexts": 0,
                                                    "exposure": settings.exposure_drop > 0})
        report = run_attacks(ModelOracle(model, tokenizer), tokenizer, targets, keep_records, (), plain, model)
        kept_before = {r.id for r in report.of("keep") if r.reproduced}
        exposure_before = {r.id: r.exposure for r in report.of("forget") if r.exposure is not None}
    rounds: list[FitRound] = []
    for index in range(settings.rounds):
        fit.run(settings.steps if index == 0 else settings.round_steps, on_step)
        if settings.rounds == 1:
            break
        leaking, lost = fit.attack(kept_before, exposure_before)
        rounds.append(FitRound(round=index, step=len(fit.trace), off=fit.trace[-1].off, leaking=leaking, lost=lost,
                               seconds=time.perf_counter() - started))
        if on_round:
            on_round(rounds[-1])
        out_of_time = settings.max_seconds is not None and time.perf_counter() - started > settings.max_seconds
        if not (leaking or lost) or out_of_time:
            break
        fit.boost(leaking, lost)
    result = FitResult(settings=settings, records=len(fit.targets), keep_records=len(fit.keep_records),
                       keep_windows_pool=len(fit.windows), trace=fit.trace, rounds=rounds,
                       seconds=time.perf_counter() - started)
    return fit.gates, result


def gate_order(gates: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of every neuron, lowest gate first; ties (gates clipped to 0, gates never moved from 1) by
    highest `tiebreak` (the targets' integrated-gradient score) first, else by index."""
    if tiebreak is None:
        return torch.argsort(gates.flatten(), stable=True)
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
    """Gates fitted to forget `inputs.targets` and keep the rest, attacked between rounds."""
    if bar:
        bar.start(settings.steps + (settings.rounds - 1) * settings.round_steps)
    gates, result = fit_gates(inputs.model, inputs.tokenizer, inputs.targets, inputs.keep_records,
                              keep_texts_for(inputs.keep_texts, inputs.targets), settings, bar and bar.advance)
    last = result.rounds[-1] if result.rounds else None
    info = {"keep_records": result.keep_records, "keep_windows_pool": result.keep_windows_pool,
            "steps_run": len(result.trace), "final": result.trace[-1].model_dump(exclude={"step"}),
            "rounds": len(result.rounds), "leaking": last.leaking if last else None,
            "lost": last.lost if last else None}
    tiebreak = inputs.scores.summed(inputs.target_ids) if inputs.scores is not None else None
    return Ranking(gate_order(gates, tiebreak), fitted_count(gates), info)
