"""Which selection protects a tenant best (methods and baselines), and how that changes with the edit's size."""

from __future__ import annotations

import random
import time
from pathlib import Path

from depn_serve.core.errors import DepnError
from depn_serve.selection import METHODS
from depn_serve.study.cache import cached_evaluation, cached_mask, selection_seconds
from depn_serve.study.common import (
    FAST_EVAL,
    Bed,
    StudyResult,
    StudyTable,
    group_change,
    ppl_change,
    target_verdicts,
)
from depn_serve.study.figures import plot_batch_size, plot_methods


def _fmt(value, digits: int = 2):
    return None if value is None else round(value, digits)


def methods_study(bed: Bed, tenant: str, out_dir: Path, methods: list[str] | None = None) -> StudyResult:
    """Every method at the fitted mask's size (DEPN's vote also at its default 1 %), on the same records."""
    started = time.perf_counter()
    methods = methods or list(METHODS)
    targets = [r for r in bed.records if r.tenant == tenant]
    if not targets:
        raise DepnError(f"tenant {tenant!r}: no records in {bed.path}; tenants: {bed.tenants()}")
    target_ids = {r.id for r in targets}
    other_ids = {r.id for r in bed.records} - target_ids
    before = cached_evaluation(bed, "before", None, tenant, out_dir)
    fitted = cached_mask(bed, "fit", targets, out_dir)
    size = int(fitted.off.sum())
    runs = [("fit", None)] + [(m, size) for m in methods if m != "fit"]
    if "vote" in methods:
        runs.append(("vote", None))  # DEPN's own default size
    rows, data = [], []
    for method, z in runs:
        chosen = fitted if method == "fit" else cached_mask(bed, method, targets, out_dir, z)
        # vote's order holds only neurons with a vote, so "the fit's size" may be more than it has
        label = method if z is None or method == "fit" else f"{method} ({'<= ' if method == 'vote' else ''}fit's size)"
        after = cached_evaluation(bed, label, chosen.off, tenant, out_dir)
        target, others = group_change(before, after, target_ids), group_change(before, after, other_ids)
        ppl = ppl_change(before, after)
        data.append({"method": method, "label": label, "neurons": int(chosen.off.sum()),
                     "seconds": round(selection_seconds(chosen), 1), "target": target, "others": others,
                     "ppl_before": before.valid_ppl, "ppl_after": after.valid_ppl, "ppl_change_pct": ppl,
                     "layers": chosen.off.sum(1).tolist(), "verdicts": target_verdicts(target, others, ppl)})
        rows.append([label, int(chosen.off.sum()), _fmt(target["extraction_after"]),
                     target["exposure_change_pct"], target["paraphrase_change_pct"],
                     _fmt(others["extraction_after"]), others["exposure_change_pct"], ppl, round(selection_seconds(chosen))])
    plot_methods(data, tenant, out_dir / "methods.png")
    best = data[0]
    findings = [f"before: {tenant} extraction {before.groups[tenant].extraction:.2f}, others "
                f"{before.groups['others'].extraction:.2f}, validation perplexity {before.valid_ppl:.2f}"]
    findings += [f"{d['label']} ({d['neurons']} neurons): {tenant} exposure {d['target']['exposure_change_pct']:+.1f} %"
                 f", others {d['others']['exposure_change_pct']:+.1f} %, perplexity {d['ppl_change_pct']:+.1f} %"
                 for d in data]
    findings += [f"{best['label']} vs the targets: " + "; ".join(best["verdicts"])]
    table = StudyTable(
        title=f"target tenant {tenant}: after the edit (changes relative to before)",
        columns=["method", "neurons", "target extraction", "target exposure %", "target paraphrase exposure %",
                 "others extraction", "others exposure %", "perplexity %", "selection s"],
        rows=rows,
    )
    return StudyResult(
        study="methods", title="Selection methods and baselines on the same records",
        question="Which neurons to switch off so that one tenant's secrets stop leaking and nothing else changes?",
        testbed=str(bed.path), settings={"tenant": tenant, "methods": {m: METHODS[m].description for m in methods},
                                         "fit_size": size},
        tables=[table], findings=findings, plots=["methods.png"], data={"before_ppl": before.valid_ppl, "runs": data},
        seconds=round(time.perf_counter() - started, 1),
    )


def batch_size_study(bed: Bed, sizes: list[int], out_dir: Path, method: str = "fit", seed: int = 0) -> StudyResult:
    """Masks built from N records (drawn from all tenants, as one edit): exposure drop and cost against N."""
    started = time.perf_counter()
    pool = list(bed.records)
    random.Random(seed).shuffle(pool)
    before = cached_evaluation(bed, "before", None, None, out_dir, FAST_EVAL)
    rows, data, notes = [], [], []
    for requested in sizes:
        n = min(requested, len(pool))
        if n < requested:
            notes.append(f"{requested} records requested, the test-bed has {len(pool)}: used {n}")
        targets = pool[:n]
        ids = {r.id for r in targets}
        chosen = cached_mask(bed, method, targets, out_dir, seed=seed)
        after = cached_evaluation(bed, f"{n} records", chosen.off, None, out_dir, FAST_EVAL)
        target = group_change(before, after, ids)
        rest = group_change(before, after, {r.id for r in bed.records} - ids) if n < len(pool) else {}
        ppl = ppl_change(before, after)
        data.append({"records": n, "neurons": int(chosen.off.sum()), "target": target, "others": rest,
                     "ppl_change_pct": ppl, "seconds": round(selection_seconds(chosen), 1)})
        rows.append([n, int(chosen.off.sum()), _fmt(target["extraction_before"]), _fmt(target["extraction_after"]),
                     target["exposure_change_pct"], rest.get("exposure_change_pct"), ppl])
    plot_batch_size(data, out_dir / "batch_size.png")
    findings = notes + [f"{d['records']} records: {d['neurons']} neurons, exposure "
                        f"{d['target']['exposure_change_pct']:+.1f} %, perplexity {d['ppl_change_pct']:+.1f} %"
                        for d in data]
    return StudyResult(
        study="batch_size", title="Edit batch size: records per mask",
        question="Does the edit weaken or cost more as one mask has to cover more records (DEPN's Table 3)?",
        testbed=str(bed.path), settings={"sizes": sizes, "method": method, "seed": seed},
        tables=[StudyTable(title=f"method {method}; records drawn from all tenants",
                           columns=["records", "neurons", "extraction before", "extraction after", "exposure %",
                                    "other records' exposure %", "perplexity %"],
                           rows=rows)],
        findings=findings, plots=["batch_size.png"], data={"runs": data},
        seconds=round(time.perf_counter() - started, 1),
    )
