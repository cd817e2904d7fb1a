"""Per-record privacy metrics and validation perplexity for one model state (plain or masked)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel, Field

from depn_serve.core.batching import pad, pad_id_of
from depn_serve.core.records import DIGIT_KINDS, PrivateRecord, encode_record
from depn_serve.evaluation.attacks import AttackSettings, ModelOracle, RecordAttack, run_attacks
from depn_serve.evaluation.exposure import digit_token_ids, exposure
from depn_serve.evaluation.generation import greedy_generate


class RecordResult(BaseModel):
    id: str
    tenant: str
    kind: str
    repeats: int
    extracted: bool  # greedy decoding reproduces the secret exactly
    first_token_rank: int  # 1-based rank of the secret's first token after the prompt
    secret_bits: float  # -log2 P(secret | prompt), teacher forced
    exposure: float | None = None  # digit kinds only
    exposure_method: str | None = None
    exposure_rank: int | None = None
    # Robustness (only with EvalSettings.robustness): the attack suite (near misses count) and paraphrase exposure.
    attacks: dict[str, float] | None = None  # attack -> share of its tries that reproduced the secret
    paraphrase_extraction: float | None = None  # share of the record's paraphrase prompts that extract it
    paraphrase_exposure: float | None = None  # mean exposure over its paraphrase prompts (digit kinds)
    sampled_extraction: dict[str, float] | None = None  # temperature -> share of samples reproducing the secret


class EvalSettings(BaseModel):
    exposure_samples: int = Field(1000, ge=2, description="candidates for the skew-normal fit")
    exposure_max_frontier: int = Field(4096, ge=1, description="largest pruned frontier of the exact rank search")
    ppl_max_len: int = 256
    batch_size: int = 32
    robustness: bool = Field(False, description="also the attack suite (paraphrases, sampling, the logprob beam) and "
                                                "paraphrase exposure")
    sample_temperatures: tuple[float, ...] = (0.7, 1.0)
    samples: int = Field(10, ge=1, description="with --robustness: samples per record and temperature")
    beam_width: int = Field(20, ge=0, description="with --robustness: width of the top-20-logprob beam (0: none)")


@torch.no_grad()
def record_results(
    model, tokenizer, records: Sequence[PrivateRecord], settings: EvalSettings,
    progress: Callable[[], None] | None = None, robust_ids: set[str] | None = None,
) -> list[RecordResult]:
    """Metrics per record; with `settings.robustness`, the robustness metrics for `robust_ids` (default: all)."""
    device = next(model.parameters()).device
    encoded = [encode_record(tokenizer, r) for r in records]
    longest = max(len(s) for _, s in encoded)
    continuations = greedy_generate(model, [p for p, _ in encoded], longest, pad_id_of(tokenizer))
    digits = digit_token_ids(tokenizer) if any(r.kind in DIGIT_KINDS for r in records) else []
    attacked = {}
    if settings.robustness:
        robust = [r for r in records if robust_ids is None or r.id in robust_ids]
        attack_settings = AttackSettings(contexts=0, samples=settings.samples if settings.sample_temperatures else 0,
                                         temperatures=settings.sample_temperatures, beam_width=settings.beam_width,
                                         exposure=False)
        report = run_attacks(ModelOracle(model, tokenizer), tokenizer, robust, (), (), attack_settings)
        attacked = {r.id: r for r in report.records}
    results = []
    for record, (prompt_ids, secret_ids), continuation in zip(records, encoded, continuations):
        ids = torch.tensor([prompt_ids + secret_ids], device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float(), dim=-1)
        target = torch.tensor(secret_ids, device=device)
        first = logp[0, secret_ids[0]]
        result = RecordResult(
            id=record.id,
            tenant=record.tenant,
            kind=record.kind,
            repeats=record.repeats,
            extracted=continuation[: len(secret_ids)] == secret_ids,
            first_token_rank=int((logp[0] > first).sum()) + 1,
            secret_bits=float(-logp.gather(1, target[:, None]).sum() / math.log(2)),
        )
        if record.kind in DIGIT_KINDS:
            exp = exposure(
                model, prompt_ids, secret_ids, digits,
                samples=settings.exposure_samples, max_frontier=settings.exposure_max_frontier, seed_key=record.id,
            )
            result.exposure, result.exposure_method, result.exposure_rank = exp.exposure, exp.method, exp.rank
        if record.id in attacked:
            _robustness(model, tokenizer, record, result, digits, settings, attacked[record.id])
        results.append(result)
        if progress:
            progress()
    return results


def _robustness(model, tokenizer, record: PrivateRecord, result: RecordResult, digits: list[int],
                settings: EvalSettings, attacked: RecordAttack) -> None:
    """Does the secret still come out when the prompt is reworded, when decoding samples instead of taking the
    argmax, or to a beam over the top log-probabilities? (The attack suite's figures, plus paraphrase exposure.)"""
    result.attacks = {name: attacked.hits[name] / n for name, n in attacked.tries.items() if n}
    result.paraphrase_extraction = result.attacks.get("paraphrase")
    result.sampled_extraction = {f"{t:g}": result.attacks[f"sample@{t:g}"] for t in settings.sample_temperatures
                                 if f"sample@{t:g}" in result.attacks} or None
    if record.paraphrases and record.kind in DIGIT_KINDS:
        values = []
        for index, prompt in enumerate(record.paraphrases):
            prompt_ids, secret_ids = encode_record(tokenizer, record, prompt)
            values.append(exposure(model, prompt_ids, secret_ids, digits, samples=settings.exposure_samples,
                                   max_frontier=settings.exposure_max_frontier, seed_key=f"{record.id}:{index}").exposure)
        result.paraphrase_exposure = sum(values) / len(values)


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_len: int = 256, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over all tokens of the texts, each cut into windows of `max_len`."""
    device = next(model.parameters()).device
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        windows.extend(ids[i : i + max_len] for i in range(0, max(len(ids) - 1, 1), max_len - 1))
    windows = [w for w in windows if len(w) > 1]
    pad_id = pad_id_of(tokenizer)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids, attn = pad(windows[start : start + batch_size], pad_id, device=device)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        weight = attn[:, 1:].float()
        total_nll += float((nll * weight).sum())
        total_tokens += int(weight.sum())
    return math.exp(total_nll / total_tokens)
