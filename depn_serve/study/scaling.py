"""Model size and training time: when memorization appears, and what it takes to erase it."""

from __future__ import annotations

import re
import time
from pathlib import Path

from depn_serve.core.errors import DepnError
from depn_serve.selection import select
from depn_serve.study.cache import cached_evaluation, cached_mask
from depn_serve.study.common import FAST_EVAL, Bed, StudyResult, StudyTable, group_change, ppl_change
from depn_serve.study.figures import plot_model_size, plot_training
from depn_serve.testbed import build_testbed, load_testbed_info


def parse_size(text: str) -> dict[str, int]:
    """'HIDDENxLAYERSxINTERMEDIATE' (heads = hidden / 64, at least 2)."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
    if not match:
        raise DepnError(f"model size {text!r}: expected HIDDENxLAYERSxINTERMEDIATE, e.g. 256x4x1024")
    hidden, layers, intermediate = (int(g) for g in match.groups())
    return {"hidden": hidden, "layers": layers, "intermediate": intermediate, "heads": max(2, hidden // 64)}


def model_size_study(sizes: list[str], profile: str, seed: int, out_dir: Path, method: str = "fit") -> StudyResult:
    """Same corpus and training budget, several model sizes: memorization, and the first tenant's edit."""
    started = time.perf_counter()
    rows, data = [], []
    for text in sizes:
        size = parse_size(text)
        path = Path(out_dir) / "beds" / f"{profile}-{seed}-{text}"
        if not (path / "testbed.json").exists():
            build_testbed(path, profile, seed, progress=False, model_size=size)
        info = load_testbed_info(path)
        bed = Bed.load(path)
        tenant = bed.tenants()[0]
        targets = [r for r in bed.records if r.tenant == tenant]
        ids = {r.id for r in targets}
        before = cached_evaluation(bed, "before", None, tenant, out_dir, FAST_EVAL)
        chosen = cached_mask(bed, method, targets, out_dir)
        after = cached_evaluation(bed, method, chosen.off, tenant, out_dir, FAST_EVAL)
        target = group_change(before, after, ids)
        others = group_change(before, after, {r.id for r in bed.records} - ids)
        neurons = int(chosen.off.sum())
        entry = {"size": text, "params": info.model.params, "memorization": info.memorization.overall,
                 "neurons": neurons, "share_pct": round(100 * neurons / chosen.off.numel(), 2),
                 "target": target, "others": others, "ppl_change_pct": ppl_change(before, after),
                 "tenant": tenant, "build_seconds": info.build_seconds}
        data.append(entry)
        rows.append([text, info.model.params, info.memorization.overall, round(target["exposure_before"], 2),
                     round(target["exposure_after"], 2), target["exposure_change_pct"], others["exposure_change_pct"],
                     neurons, entry["share_pct"], entry["ppl_change_pct"]])
    plot_model_size(data, Path(out_dir) / "model_size.png")
    findings = [f"{d['size']} ({d['params'] / 1e6:.1f} M params): memorized {100 * d['memorization']:.0f} %, "
                f"{d['tenant']}'s exposure {d['target']['exposure_change_pct']:+.1f} % with {d['neurons']} neurons"
                for d in data]
    return StudyResult(
        study="model_size", title="Model size",
        question="Do larger models memorize more, and do they need more (or fewer) neurons switched off?",
        testbed=f"profile {profile}, seed {seed}, sizes {', '.join(sizes)}",
        settings={"profile": profile, "seed": seed, "sizes": sizes, "method": method,
                  "exposure": FAST_EVAL.model_dump(include={"exposure_samples", "exposure_max_frontier"})},
        tables=[StudyTable(title="first tenant's edit at each size (exposure of digit secrets, bits)",
                           columns=["size (hidden x layers x intermediate)", "params", "memorized (greedy)",
                                    "exposure before", "after", "change %", "others' change %", "neurons",
                                    "% of MLP", "perplexity %"], rows=rows)],
        findings=findings, plots=["model_size.png"], data={"sizes": data},
        seconds=round(time.perf_counter() - started, 1),
    )


def training_study(bed_path: Path, tenant: str, out_dir: Path) -> StudyResult:
    """Every checkpoint of a test-bed built with `--checkpoints`: memorization and DEPN's neurons per layer."""
    started = time.perf_counter()
    bed_path = Path(bed_path)
    steps_total = load_testbed_info(bed_path).training.steps
    checkpoints = sorted((bed_path / "checkpoints").glob("step-*"))
    if not checkpoints:
        raise DepnError(f"{bed_path}: no checkpoints/; build the test-bed with `depn testbed build --checkpoints 5`")
    points = [(int(p.name.split("-")[1]), p) for p in checkpoints] + [(steps_total, bed_path / "model")]
    rows, data = [], []
    for step, model_dir in points:
        bed = Bed.load(bed_path, model_dir)
        state = cached_evaluation(bed, f"step {step}", None, tenant, out_dir, FAST_EVAL)
        targets = [r for r in bed.records if r.tenant == tenant]
        layers = select(bed.inputs(targets, out_dir), "vote").off.sum(1).tolist()
        group = state.groups[tenant]
        entry = {"step": step, "extraction": group.extraction, "exposure": group.mean_exposure,
                 "all_extraction": sum(r.extracted for r in state.records) / len(state.records),
                 "valid_ppl": state.valid_ppl, "vote_layers": layers}
        data.append(entry)
        rows.append([step, round(entry["all_extraction"], 2), round(group.extraction, 2),
                     None if group.mean_exposure is None else round(group.mean_exposure, 2),
                     round(state.valid_ppl, 2), *layers])
    plot_training(data, tenant, Path(out_dir) / "training.png")
    first = next((d["step"] for d in data if d["all_extraction"] >= 0.5), None)
    findings = [f"half of all records are extracted from step {first} of {steps_total}" if first is not None
                else "memorization never reaches half of the records"]
    findings += [f"step {d['step']}: {tenant}'s exposure {d['exposure']:.1f} bits, DEPN's neurons per layer "
                 f"{d['vote_layers']}" for d in data if d["exposure"] is not None]
    num_layers = len(data[0]["vote_layers"])
    return StudyResult(
        study="training", title="Training time",
        question="When does memorization appear, and how do the privacy neurons move across layers as it does?",
        testbed=str(bed_path), settings={"tenant": tenant, "checkpoints": [s for s, _ in points],
                                         "neurons": "DEPN vote top 1 % of the tenant's records"},
        tables=[StudyTable(title="per checkpoint",
                           columns=["step", "extraction (all)", f"extraction ({tenant})", f"exposure ({tenant})",
                                    "validation PPL", *[f"L{i}" for i in range(num_layers)]], rows=rows)],
        findings=findings, plots=["training.png"], data={"checkpoints": data},
        seconds=round(time.perf_counter() - started, 1),
    )
