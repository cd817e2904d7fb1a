"""Isolation masks: for every tenant, a mask that forgets every other tenant's records and keeps its own, each
attacked and certified before it is written.

Two designs (README, "Isolation"):
- `fit`: one fit per tenant, forgetting all the other tenants' records at once (T fits over (T-1)/T of the
  records each: work grows as T x N);
- `union`: one "forget my records" fit per owner, and a tenant's mask is the union of the other owners' masks
  (T fits over N/T records each: work grows as N; the masks are the ones the server already unions).
Either way every mask gets the same verification. Each fit and each certification is a job for a runner
(core.cluster): in this process, one model load serves them all; on a Ray cluster they run side by side, with the
same masks and certificates.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from rich.table import Table

from depn_serve.artifacts.mask import MaskProvenance, NeuronMask
from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.arch import mlp_shape, read_config
from depn_serve.core.cluster import InProcess, Runner, shared_model
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


def _row(mask: NeuronMask) -> IsolationRow:
    """A certified mask's line of the report."""
    m = mask.manifest
    v = m.verification
    forget, keep = v.forget(), v.keep()
    kept_before = [r for r in keep if r.reproduced_before]
    lost = Counter(r.kind for r in kept_before if not r.hits.get("greedy"))
    return IsolationRow(
        tenant=m.tenant, neurons=m.neuron_count, share=m.neuron_count / (m.num_layers * m.intermediate_size),
        forget=len(forget), resisting=sum(not r.leaks for r in forget), kept_before=len(kept_before),
        kept=len(kept_before) - lost.total(), lost=dict(lost.most_common()),
        perplexity_change=v.perplexity_after / v.perplexity_before - 1, exposure_drop=v.exposure_drop(),
        passed=v.passed, failures=v.failures, fit_seconds=m.provenance.aggregator["seconds"],
        verify_seconds=v.seconds)


@dataclass(frozen=True)
class _Inputs:
    """What every job of one isolation run reads (paths, so that a job can run on another node)."""

    model_dir: Path
    records_path: Path
    keep_text_path: Path
    valid_path: Path
    device: str
    fit: FitSettings
    attacks: AttackSettings | None
    criteria: Criteria | None
    bar: Bar | None  # in this process only: the fit's step bar


@dataclass(frozen=True)
class _Fitted:
    off: torch.Tensor
    info: dict
    seconds: float


@dataclass(frozen=True)
class _Job:
    """Fit `policy` (or take `fitted`, the union design's), then certify the tenant's mask."""

    inputs: _Inputs
    tenant: str
    policy: MaskPolicy
    design: str = "fit"
    fitted: _Fitted | None = None


def _fit(job: _Job) -> _Fitted:
    i = job.inputs
    model, tokenizer = shared_model(i.model_dir, i.device)
    records = load_records(i.records_path)
    forget, keep = job.policy.split(records, str(i.records_path))
    inputs = SelectionInputs(shape=mlp_shape(model.config), fingerprint=model_fingerprint(i.model_dir),
                             target_ids=[r.id for r in forget], targets=forget, keep_records=keep,
                             keep_texts=read_texts(i.keep_text_path), model=model, tokenizer=tokenizer,
                             records_sha256=file_sha256(i.records_path), policy=job.policy)
    selection = select(inputs, "fit", i.fit, bar=i.bar)
    return _Fitted(selection.off, selection.info, selection.seconds)


def _certified(job: _Job) -> NeuronMask:
    """The tenant's mask, attacked and certified (fitted first unless the job carries the fit)."""
    i = job.inputs
    fitted = job.fitted or _fit(job)
    model, tokenizer = shared_model(i.model_dir, i.device)
    records, records_sha256 = load_records(i.records_path), file_sha256(i.records_path)
    provenance = MaskProvenance(method="depn-fit-union" if job.design == "union" else "depn-fit", policy=job.policy,
                                records_sha256=records_sha256, records=sum(r.tenant != job.tenant for r in records),
                                aggregator={**i.fit.model_dump(mode="json"), **_plain(fitted.info),
                                            "seconds": round(fitted.seconds, 1)})
    mask = NeuronMask.create(job.tenant, model_fingerprint(i.model_dir), mlp_shape(model.config), fitted.off,
                             provenance)
    verification = verify_mask(model, tokenizer, mask, records, read_texts(i.valid_path), job.policy, i.attacks,
                               i.criteria, records_sha256, str(i.records_path))
    return mask.certified(verification)


def isolate(
    model_dir: Path, records_path: Path, keep_text_path: Path, valid_path: Path, out_dir: Path,
    design: Design = "fit", tenants: Sequence[str] = (), fit: FitSettings | None = None,
    attacks: AttackSettings | None = None, criteria: Criteria | None = None, device: str = "cpu",
    bar: Bar | None = None, on_tenant: Callable[[IsolationRow], None] | None = None, runner: Runner | None = None,
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
    mlp_shape(read_config(model_dir))  # an unsupported model fails here, before any job
    chosen = list(tenants) or present
    runner = runner or InProcess()
    inputs = _Inputs(Path(model_dir), Path(records_path), Path(keep_text_path), Path(valid_path), device,
                     fit or FitSettings(), attacks, criteria, bar if runner.local else None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if design == "union":
        needed = [owner for owner in present if any(owner != tenant for tenant in chosen)]
        fits = dict(zip(needed, runner.map(_fit, [_Job(inputs, o, MaskPolicy.own_records(o)) for o in needed])))
        jobs = [_Job(inputs, t, MaskPolicy.isolation(t), "union", _union({o: fits[o] for o in present if o != t}))
                for t in chosen]
    else:
        jobs = [_Job(inputs, t, MaskPolicy.isolation(t)) for t in chosen]

    def done(mask: NeuronMask) -> None:  # written as soon as certified: a long run that stops keeps what it made
        mask.save(out_dir / f"{mask.manifest.tenant}.safetensors")
        if on_tenant:
            on_tenant(_row(mask))

    rows = [_row(mask) for mask in runner.map(_certified, jobs, done)]
    fit_seconds = round(sum(f.seconds for f in fits.values()), 1) if design == "union" else sum(
        r.fit_seconds for r in rows)
    report = IsolationReport(design=design, model=str(model_dir), records=len(records), tenants=rows,
                             fit_seconds=fit_seconds, seconds=time.perf_counter() - started)
    atomic_write_text(out_dir / "isolation.json", report.model_dump_json(indent=2))
    return report


def _union(owners: dict[str, _Fitted]) -> _Fitted:
    """The union design's mask for a tenant: every other owner's fitted mask at once."""
    info = {"union_of": [f"forget tenant={o}" for o in owners]}
    return _Fitted(torch.stack([f.off for f in owners.values()]).any(0), info, sum(f.seconds for f in owners.values()))


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
