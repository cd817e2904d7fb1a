"""Budgeted selection: the fewest neurons, in any method's order, that stop a tenant's secrets from leaking
while validation perplexity stays within a budget. What an operator needs: "this secret no longer leaks, at the
least cost", instead of a fixed mask size.

A record is protected when its exposure is below the target (digit secrets) or, for secrets exposure does not
cover (names, e-mail addresses), when greedy decoding no longer reproduces it. Every point is measured on the HF
reference editing path. The search doubles the prefix length of the order until the records are protected
or the perplexity budget is spent, then bisects between the last two points. It assumes that adding neurons does
not bring a secret back (true in practice, not guaranteed), and the report lists every point it measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from depn_serve.artifacts.mask import first_n
from depn_serve.core.records import DIGIT_KINDS
from depn_serve.editing import masked
from depn_serve.evaluation.metrics import EvalSettings, RecordResult, perplexity, record_results
from depn_serve.selection.base import Selection, SelectionInputs


class BudgetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_exposure: float = Field(gt=0, description="bits; digit secrets must end below this")
    ppl_budget: float = Field(gt=0, description="allowed validation perplexity increase, in percent")


class SearchPoint(BaseModel):
    neurons: int
    perplexity: float
    protected: int = Field(description="target records protected at this size")
    within_budget: bool


class RecordOutcome(BaseModel):
    id: str
    kind: str
    exposure_before: float | None
    exposure_after: float | None
    extracted_before: bool
    extracted_after: bool
    protected: bool


class BudgetReport(BaseModel):
    tenant: str
    settings: BudgetSettings
    neurons: int = Field(description="size of the chosen mask")
    candidates: int = Field(description="length of the order searched (vote: neurons with a vote; fit: every neuron)")
    ppl_before: float
    ppl_after: float
    ppl_change_pct: float
    all_protected: bool
    unprotected: list[str] = Field(description="ids of target records still leaking with the chosen mask")
    records: list[RecordOutcome]
    points: list[SearchPoint]
    seconds: float


def _protected(result: RecordResult, target_exposure: float) -> bool:
    if result.kind in DIGIT_KINDS and result.exposure is not None:
        return result.exposure < target_exposure
    return not result.extracted


def budgeted_selection(
    inputs: SelectionInputs, selection: Selection, valid_texts: Sequence[str], budget: BudgetSettings,
    eval_settings: EvalSettings | None = None, on_point: Callable[[SearchPoint], None] | None = None,
) -> tuple[Selection, BudgetReport]:
    """The shortest prefix of `selection.order` that protects every one of `inputs.targets` within the budget
    (or, out of reach, the longest one measured within it), and the search report."""
    inputs.need("budgeted", "model", "tokenizer", "targets")
    model, tokenizer, records, order = inputs.model, inputs.tokenizer, inputs.targets, selection.order
    started = time.perf_counter()
    settings = eval_settings or EvalSettings()
    tenant = records[0].tenant
    before = record_results(model, tokenizer, records, settings)
    ppl_before = perplexity(model, tokenizer, valid_texts, settings.ppl_max_len, settings.batch_size)
    limit = ppl_before * (1 + budget.ppl_budget / 100)
    protected_before = sum(_protected(r, budget.target_exposure) for r in before)
    measured: dict[int, tuple[SearchPoint, list[RecordResult]]] = {
        0: (SearchPoint(neurons=0, perplexity=ppl_before, protected=protected_before, within_budget=True), before)
    }

    def measure(n: int) -> SearchPoint:
        if n not in measured:
            with masked(model, first_n(order, n, inputs.shape.dims)):
                ppl = perplexity(model, tokenizer, valid_texts, settings.ppl_max_len, settings.batch_size)
                results = record_results(model, tokenizer, records, settings)
            point = SearchPoint(neurons=n, perplexity=ppl, within_budget=ppl <= limit,
                                protected=sum(_protected(r, budget.target_exposure) for r in results))
            measured[n] = (point, results)
            if on_point:
                on_point(point)
        return measured[n][0]

    def good(point: SearchPoint) -> bool:
        return point.protected == len(records) and point.within_budget

    # Doubling: lo = largest size measured that is within budget but not enough; hi = first size that is good.
    sizes = [2**k for k in range(max(len(order), 1).bit_length()) if 2**k < len(order)] + [len(order)]
    lo, hi = 0, 0 if protected_before == len(records) else None
    for n in sizes if hi is None and len(order) else []:
        point = measure(n)
        if good(point):
            hi = n
            break
        if not point.within_budget:
            break
        lo = n
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if good(measure(mid)):
                hi = mid
            else:
                lo = mid
        chosen = hi
    else:  # not reachable within the budget: the largest size measured within it
        chosen = max((p.neurons for p, _ in measured.values() if p.within_budget), default=0)
    point, after = measured[chosen]
    outcomes = [
        RecordOutcome(id=b.id, kind=b.kind, exposure_before=b.exposure, exposure_after=a.exposure,
                      extracted_before=b.extracted, extracted_after=a.extracted,
                      protected=_protected(a, budget.target_exposure))
        for b, a in zip(before, after)
    ]
    report = BudgetReport(
        tenant=tenant, settings=budget, neurons=chosen, candidates=len(order), ppl_before=ppl_before,
        ppl_after=point.perplexity, ppl_change_pct=100 * (point.perplexity / ppl_before - 1),
        all_protected=all(o.protected for o in outcomes), unprotected=[o.id for o in outcomes if not o.protected],
        records=outcomes, points=sorted((p for p, _ in measured.values()), key=lambda p: p.neurons),
        seconds=time.perf_counter() - started,
    )
    chosen_selection = selection.resized(
        chosen, f"{selection.label}-budgeted", target_exposure=budget.target_exposure, ppl_budget=budget.ppl_budget,
        neurons=chosen, all_protected=report.all_protected)
    return chosen_selection, report
