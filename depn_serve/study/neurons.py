"""Where the privacy neurons are: per layer, per record kind, and how much records and tenants share them."""

from __future__ import annotations

import time
from itertools import combinations
from pathlib import Path
from statistics import fmean

import torch

from depn_serve.artifacts.mask import first_n
from depn_serve.selection.base import default_size, top_of
from depn_serve.study.cache import cached_mask
from depn_serve.study.common import Bed, StudyResult, StudyTable
from depn_serve.study.figures import plot_neuron_layers


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def neurons_study(bed: Bed, out_dir: Path, methods: tuple[str, ...] = ("fit", "vote")) -> StudyResult:
    """Per-record integrated-gradient top-k sets (k = 1 % of the MLP) by kind, and every tenant's masks."""
    started = time.perf_counter()
    layers = bed.shape.num_layers
    k = default_size(bed.shape)
    scores = bed.scores(out_dir)
    tops = {rid: first_n(top_of(t), k, bed.shape.dims) for rid, t in scores.iter_scores([r.id for r in bed.records])}
    kinds = sorted({r.kind for r in bed.records})
    per_kind = {kind: torch.stack([tops[r.id] for r in bed.records if r.kind == kind])
                .sum(0).sum(1).tolist() for kind in kinds}

    # Overlap of per-record top-k sets: same tenant and kind, same kind across tenants, different kinds.
    pairs: dict[str, list[float]] = {"same tenant, same kind": [], "other tenant, same kind": [],
                                     "different kind": []}
    for a, b in combinations(bed.records, 2):
        key = ("different kind" if a.kind != b.kind
               else "same tenant, same kind" if a.tenant == b.tenant else "other tenant, same kind")
        pairs[key].append(_jaccard(tops[a.id], tops[b.id]))
    overlap_rows = [[key, len(v), round(fmean(v), 3) if v else None] for key, v in pairs.items()]

    masks: dict[str, dict[str, torch.Tensor]] = {}
    for method in methods:
        masks[method] = {tenant: cached_mask(bed, method, [r for r in bed.records if r.tenant == tenant], out_dir).off
                         for tenant in bed.tenants()}
    layer_rows = [[f"{method}: {tenant}", int(off.sum()), *off.sum(1).tolist()]
                  for method, by_tenant in masks.items() for tenant, off in by_tenant.items()]
    layer_rows += [[f"IG top-{k} per record: {kind}", sum(counts), *counts] for kind, counts in per_kind.items()]
    tenant_rows = [[method, f"{a} / {b}", round(_jaccard(masks[method][a], masks[method][b]), 3)]
                   for method in masks for a, b in combinations(bed.tenants(), 2)]
    plot_neuron_layers({label: counts for label, _, *counts in layer_rows}, out_dir / "neurons.png")
    findings = [f"records' top-{k} sets overlap (Jaccard) {row[2]} for pairs with {row[0]}" for row in overlap_rows]
    findings += [f"{method} masks of {pair}: Jaccard {value}" for method, pair, value in tenant_rows]
    return StudyResult(
        study="neurons", title="Where the privacy neurons are",
        question="Which layers hold them, do kinds of secret differ, and do records and tenants share neurons?",
        testbed=str(bed.path), settings={"top_k_per_record": k, "methods": list(methods)},
        tables=[
            StudyTable(title="neurons per layer", columns=["selection", "total", *[f"L{i}" for i in range(layers)]],
                       rows=layer_rows),
            StudyTable(title=f"overlap of per-record top-{k} integrated-gradient sets",
                       columns=["record pairs", "pairs", "mean Jaccard"], rows=overlap_rows),
            StudyTable(title="overlap between tenants' masks", columns=["method", "tenants", "Jaccard"],
                       rows=tenant_rows),
        ],
        findings=findings, plots=["neurons.png"],
        data={"per_kind": per_kind, "overlap": {key: fmean(v) if v else None for key, v in pairs.items()}},
        seconds=round(time.perf_counter() - started, 1),
    )
