"""Isolation masks: for every tenant, a mask that forgets every other tenant's records and keeps its own, each
attacked and certified before it is written.

Two designs (README, "Isolation"):
- `fit`: one fit per tenant, forgetting all the other tenants' records at once (T fits over (T-1)/T of the
  records each: work grows as T x N);
- `union`: one "forget my records" fit per owner, and a tenant's mask is the union of the other owners' masks
  (T fits over N/T records each: work grows as N; the masks are the ones the server already unions).
Either way one model load serves every tenant, and every mask gets the same verification.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from rich.table import Table

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
from depn_serve.artifacts.verification import Criteria, Verification
from depn_serve.core.arch import load_model, mlp_shape
from depn_serve.core.console import Bar
from depn_serve.core.errors import DepnError
from depn_serve.core.fileio import atomic_write_text, file_sha256
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import load_records, read_texts
from depn_serve.core.selectors import MaskPolicy
from depn_serve.evaluation.attacks import AttackSettings
from depn_serve.evaluation.verify import verify_mask
from depn_serve.selection import select
from depn_serve.selection.base import SelectionInputs
from depn_serve.selection.fit import FitSettings

Design = Literal["fit", "union"]
DESIGNS: tuple[str, ...] = ("fit", "union")


class IsolationRow(BaseModel):
    tenant: str
    neurons: int
    share: float  # of all MLP neurons
    forget: int
    resisting: int  # forgotten records no attack got out
    kept_before: int  # own records greedy decoding reproduced before the mask
    kept: int  # ... and still reproduces with it
    lost: dict[str, int]  # own records no longer reproduced, per kind, most first
    perplexity_change: float  # relative
    exposure_drop: float | None
    passed: bool
    failures: list[str]
    fit_seconds: float
    verify_seconds: float


class IsolationReport(BaseModel):
    design: str
    model: str
    records: int
    tenants: list[IsolationRow]
    fit_seconds: float  # all fits (the union design's per-owner fits included)
    seconds: float

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.tenants)


def _row(tenant: str, mask: NeuronMask, v: Verification, fit_seconds: float) -> IsolationRow:
    forget, keep = v.forget(), v.keep()
    kept_before = [r for r in keep if r.reproduced_before]
    lost = Counter(r.kind for r in kept_before if not r.hits.get("greedy"))
    m = mask.manifest
    return IsolationRow(
        tenant=tenant, neurons=m.neuron_count, share=m.neuron_count / (m.num_layers * m.intermediate_size),
        forget=len(forget), resisting=sum(not r.leaks for r in forget), kept_before=len(kept_before),
        kept=len(kept_before) - lost.total(), lost=dict(lost.most_common()),
        perplexity_change=v.perplexity_after / v.perplexity_before - 1, exposure_drop=v.exposure_drop(),
        passed=v.passed, failures=v.failures, fit_seconds=fit_seconds, verify_seconds=v.seconds)


def isolate(
    model_dir: Path, records_path: Path, keep_text_path: Path, valid_path: Path, out_dir: Path,
    design: Design = "fit", tenants: Sequence[str] = (), fit: FitSettings | None = None,
    attacks: AttackSettings | None = None, criteria: Criteria | None = None, device: str = "cpu",
    bar: Bar | None = None, on_tenant: Callable[[IsolationRow], None] | None = None,
) -> IsolationReport:
    """Write `out_dir/<tenant>.safetensors` (certified) for each tenant and `out_dir/isolation.json`."""
    started = time.perf_counter()
    if design not in DESIGNS:
        raise DepnError(f"isolation design: expected one of {list(DESIGNS)}, found {design!r}")
    records = load_records(records_path)
    present = sorted({r.tenant for r in records})
    if len(present) < 2:
        raise DepnError(f"{records_path}: isolation needs records of at least two tenants, found {present}")
    unknown = sorted(set(tenants) - set(present))
    if unknown:
        raise DepnError(f"tenants {unknown} have no records in {records_path}; present: {present}")
    chosen = list(tenants) or present
    model, tokenizer = load_model(model_dir, device)
    fingerprint, shape = model_fingerprint(model_dir), mlp_shape(model.config)
    keep_texts, valid_texts = read_texts(keep_text_path), read_texts(valid_path)
    records_sha256 = file_sha256(records_path)
    fit = fit or FitSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def fitted(policy: MaskPolicy) -> tuple[torch.Tensor, dict, float]:
        forget, keep = policy.split(records, str(records_path))
        inputs = SelectionInputs(shape=shape, fingerprint=fingerprint, target_ids=[r.id for r in forget],
                                 targets=forget, keep_records=keep, keep_texts=keep_texts, model=model,
                                 tokenizer=tokenizer, records_sha256=records_sha256, policy=policy)
        selection = select(inputs, "fit", fit, bar=bar)
        return selection.off, selection.info, selection.seconds

    owner_masks: dict[str, tuple[torch.Tensor, dict, float]] = {}
    if design == "union":
        needed = [owner for owner in present if any(owner != tenant for tenant in chosen)]
        owner_masks = {owner: fitted(MaskPolicy.own_records(owner)) for owner in needed}
    rows: list[IsolationRow] = []
    for tenant in chosen:
        policy = MaskPolicy.isolation(tenant)
        if design == "fit":
            off, info, seconds = fitted(policy)
        else:
            others = [owner_masks[o] for o in present if o != tenant]
            off = torch.stack([o for o, _, _ in others]).any(0)
            info = {"union_of": [f"forget tenant={o}" for o in present if o != tenant]}
            seconds = sum(s for _, _, s in others)
        provenance = MaskProvenance(method="depn-fit-union" if design == "union" else "depn-fit", policy=policy,
                                    records_sha256=records_sha256, records=sum(r.tenant != tenant for r in records),
                                    aggregator={**fit.model_dump(mode="json"), **_plain(info),
                                                "seconds": round(seconds, 1)})
        mask = NeuronMask.create(tenant, fingerprint, shape, off, provenance)
        verification = verify_mask(model, tokenizer, mask, records, valid_texts, policy, attacks, criteria,
                                   records_sha256, str(records_path))
        mask.certified(verification).save(out_dir / f"{tenant}.safetensors")
        rows.append(_row(tenant, mask, verification, seconds))
        if on_tenant:
            on_tenant(rows[-1])
    fit_seconds = sum(s for _, _, s in owner_masks.values()) if design == "union" else sum(r.fit_seconds for r in rows)
    report = IsolationReport(design=design, model=str(model_dir), records=len(records), tenants=rows,
                             fit_seconds=fit_seconds, seconds=time.perf_counter() - started)
    atomic_write_text(out_dir / "isolation.json", report.model_dump_json(indent=2))
    return report


def _plain(info: dict) -> dict:
    """The fit's report with counts for its per-record lists (the certificate has the records)."""
    return {k: (len(v) if k in ("leaking", "lost") and isinstance(v, list) else v) for k, v in info.items()}


def _lost(lost: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in lost.items())


def render_isolation(report: IsolationReport, where: str) -> Table:
    table = Table(title=f"isolation masks ({report.design} design) in {where}")
    for column in ("tenant", "neurons", "% MLP", "others' records resisting", "own kept", "exposure",
                   "perplexity", "verification", "fit s", "verify s"):
        table.add_column(column)
    for row in report.tenants:
        table.add_row(
            row.tenant, str(row.neurons), f"{100 * row.share:.2f}", f"{row.resisting}/{row.forget}",
            f"{row.kept}/{row.kept_before}" + (f" (lost: {_lost(row.lost)})" if row.lost else ""),
            "n/a" if row.exposure_drop is None else f"-{100 * row.exposure_drop:.0f} %",
            f"{100 * row.perplexity_change:+.2f} %", "passed" if row.passed else "FAILED: " + "; ".join(row.failures),
            f"{row.fit_seconds:.0f}", f"{row.verify_seconds:.0f}")
    return table
