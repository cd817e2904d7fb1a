"""Before/after evaluation of mask states, summarized per tenant, as JSON and as a readable table."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from statistics import fmean

import torch
from pydantic import BaseModel
from rich.table import Table

from depn_serve.editing import masked
from depn_serve.evaluation.metrics import EvalSettings, RecordResult, perplexity, record_results
from depn_serve.core.records import PrivateRecord


class GroupSummary(BaseModel):
    records: int
    extraction: float  # share of records whose secret greedy decoding reproduces
    mrr: float  # mean reciprocal rank of the secret's first token
    mean_secret_bits: float
    mean_exposure: float | None  # over digit records (phone, id_number)
    exposure_methods: dict[str, int]
    paraphrase_extraction: float | None = None  # robustness metrics: means over the records that have them
    paraphrase_exposure: float | None = None
    sampled_extraction: dict[str, float] | None = None  # temperature -> share of samples reproducing the secret


class StateResult(BaseModel):
    name: str  # "before", "after", "random", ...
    neurons: int
    valid_ppl: float
    groups: dict[str, GroupSummary]  # per tenant, plus "others" (all but the target) when a target is set
    records: list[RecordResult]


class EvalReport(BaseModel):
    model: str
    records_file: str
    mask: str | None
    target_tenant: str | None
    settings: EvalSettings
    states: list[StateResult]

    def state(self, name: str) -> StateResult:
        return next(s for s in self.states if s.name == name)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return fmean(values) if values else None


def summarize(results: Sequence[RecordResult]) -> GroupSummary:
    digits = [r.exposure for r in results if r.exposure is not None]
    sampled = [r.sampled_extraction for r in results if r.sampled_extraction]
    methods: dict[str, int] = {}
    for r in results:
        if r.exposure_method:
            methods[r.exposure_method] = methods.get(r.exposure_method, 0) + 1
    return GroupSummary(
        records=len(results),
        extraction=fmean(r.extracted for r in results),
        mrr=fmean(1.0 / r.first_token_rank for r in results),
        mean_secret_bits=fmean(r.secret_bits for r in results),
        mean_exposure=fmean(digits) if digits else None,
        exposure_methods=methods,
        paraphrase_extraction=_mean(r.paraphrase_extraction for r in results),
        paraphrase_exposure=_mean(r.paraphrase_exposure for r in results),
        sampled_extraction={t: fmean(s[t] for s in sampled) for t in sampled[0]} if sampled else None,
    )


def evaluate_state(
    model, tokenizer, name: str, off: torch.Tensor | None, records: Sequence[PrivateRecord],
    valid_texts: Sequence[str], settings: EvalSettings, target_tenant: str | None = None, progress=None,
    robust_ids: set[str] | None = None,
) -> StateResult:
    """All metrics for the model with the neurons in `off` switched off (None: the plain model); robustness
    metrics (when on) for `robust_ids` only, if given."""
    with masked(model, off) if off is not None else nullcontext():
        results = record_results(model, tokenizer, records, settings, progress, robust_ids)
        ppl = perplexity(model, tokenizer, valid_texts, settings.ppl_max_len, settings.batch_size)
    groups = {t: summarize([r for r in results if r.tenant == t]) for t in sorted({r.tenant for r in results})}
    if target_tenant is not None:
        others = [r for r in results if r.tenant != target_tenant]
        if others:
            groups["others"] = summarize(others)
    return StateResult(
        name=name, neurons=0 if off is None else int(off.sum()), valid_ppl=ppl, groups=groups, records=results
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if before == 0:
        return f"{after - before:+.2f}"
    return f"{after - before:+.2f} ({100 * (after - before) / abs(before):+.0f}%)"


def render_table(report: EvalReport) -> Table:
    """Rows: validation perplexity, then extraction / exposure / MRR per tenant group; columns: the states."""
    base = report.states[0]
    table = Table(title=f"DEPN evaluation — target tenant: {report.target_tenant or '-'}")
    table.add_column("metric")
    table.add_column(base.name, justify="right")
    for state in report.states[1:]:
        table.add_column(f"{state.name} ({state.neurons} neurons)", justify="right")
        table.add_column("change", justify="right")

    def row(label: str, get) -> None:
        cells = [label, _fmt(get(base))]
        for state in report.states[1:]:
            cells += [_fmt(get(state)), _delta(get(base), get(state))]
        table.add_row(*cells)

    row("validation perplexity", lambda s: s.valid_ppl)
    order = [g for g in base.groups if g != "others"]
    if report.target_tenant in order:
        order.remove(report.target_tenant)
        # "others" only adds information when it pools more than one tenant
        order = [report.target_tenant, *(["others"] if len(order) > 1 else []), *order]
    for group in order:
        label = f"{group} (target)" if group == report.target_tenant else group
        row(f"{label}: extraction", lambda s, g=group: s.groups[g].extraction)
        row(f"{label}: mean exposure", lambda s, g=group: s.groups[g].mean_exposure)
        row(f"{label}: MRR", lambda s, g=group: s.groups[g].mrr)
        if base.groups[group].paraphrase_extraction is not None:
            row(f"{label}: paraphrase extraction", lambda s, g=group: s.groups[g].paraphrase_extraction)
            row(f"{label}: paraphrase exposure", lambda s, g=group: s.groups[g].paraphrase_exposure)
        for temperature in base.groups[group].sampled_extraction or {}:
            row(f"{label}: sampled extraction, T={temperature}",
                lambda s, g=group, t=temperature: s.groups[g].sampled_extraction[t])
    return table
