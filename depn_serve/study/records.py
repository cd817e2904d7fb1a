"""Per-record views of one tenant's edit: by carrier sentence, and by how often the record was seen in training."""

from __future__ import annotations

import re
import time
from pathlib import Path
from statistics import fmean

import torch

from depn_serve.core.errors import DepnError
from depn_serve.core.records import DIGIT_KINDS, PrivateRecord, encode_record
from depn_serve.editing import masked
from depn_serve.evaluation.exposure import digit_token_ids, exposure
from depn_serve.study.cache import cached_evaluation, cached_mask
from depn_serve.study.common import STUDY_EVAL, Bed, StudyResult, StudyTable, pct
from depn_serve.study.figures import plot_frequency, plot_prompts
from depn_serve.testbed.corpus import HELD_OUT_CARRIERS, MAX_REPEATS, TRAIN_CARRIERS


def _carrier(record: PrivateRecord) -> str:
    """The training carrier template a record's prompt was made from (or the prompt itself, for foreign records)."""
    for template in TRAIN_CARRIERS.get(record.kind, ()):
        pattern = "^" + re.escape(template).replace(re.escape("{owner}"), ".+") + "$"
        if re.match(pattern, record.prompt):
            return template
    return record.prompt


def prompts_study(bed: Bed, tenant: str, out_dir: Path, method: str = "fit") -> StudyResult:
    """Exposure before/after for each carrier sentence: the training carriers and the held-out paraphrases."""
    started = time.perf_counter()
    targets = [r for r in bed.records if r.tenant == tenant and r.kind in DIGIT_KINDS]
    if not targets:
        raise DepnError(f"tenant {tenant!r}: no digit records (phone, id_number) in {bed.path}")
    chosen = cached_mask(bed, method, [r for r in bed.records if r.tenant == tenant], out_dir)
    digits = digit_token_ids(bed.tokenizer)
    values: dict[tuple[str, str, bool], list[tuple[float, float]]] = {}  # (kind, carrier, held out) -> pairs

    def measure() -> list[list[float]]:
        out = []
        for record in targets:
            row = []
            for index, prompt in enumerate([record.prompt, *record.paraphrases]):
                prompt_ids, secret_ids = encode_record(bed.tokenizer, record, prompt)
                row.append(exposure(bed.model, prompt_ids, secret_ids, digits, samples=STUDY_EVAL.exposure_samples,
                                    max_frontier=STUDY_EVAL.exposure_max_frontier,
                                    seed_key=f"{record.id}:{index}").exposure)
            out.append(row)
        return out

    with torch.no_grad():
        before = measure()
        with masked(bed.model, chosen.off):
            after = measure()
    for record, b_row, a_row in zip(targets, before, after):
        carriers = [(_carrier(record), False)] + [
            (HELD_OUT_CARRIERS[record.kind][i] if i < len(HELD_OUT_CARRIERS.get(record.kind, ())) else p, True)
            for i, p in enumerate(record.paraphrases)
        ]
        for (carrier, held_out), b, a in zip(carriers, b_row, a_row):
            values.setdefault((record.kind, carrier, held_out), []).append((b, a))
    rows, data = [], []
    for (kind, carrier, held_out), pairs in sorted(values.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        b, a = fmean(p[0] for p in pairs), fmean(p[1] for p in pairs)
        data.append({"kind": kind, "carrier": carrier, "held_out": held_out, "records": len(pairs),
                     "exposure_before": b, "exposure_after": a, "change_pct": pct(b, a)})
        rows.append([kind, carrier, "held out" if held_out else "training", len(pairs), round(b, 2), round(a, 2),
                     pct(b, a)])
    plot_prompts(data, tenant, out_dir / "prompts.png")
    train = [d for d in data if not d["held_out"]]
    held = [d for d in data if d["held_out"]]
    findings = [
        f"training carriers: mean exposure {fmean(d['exposure_before'] for d in train):.1f} -> "
        f"{fmean(d['exposure_after'] for d in train):.1f} bits",
        f"held-out carriers: mean exposure {fmean(d['exposure_before'] for d in held):.1f} -> "
        f"{fmean(d['exposure_after'] for d in held):.1f} bits",
    ] if train and held else []
    return StudyResult(
        study="prompts", title="Exposure per carrier sentence",
        question="Does the edit hold when the secret is asked for in words the model was not trained on?",
        testbed=str(bed.path),
        settings={"tenant": tenant, "method": method, "neurons": int(chosen.off.sum()),
                  "exposure": STUDY_EVAL.model_dump(include={"exposure_samples", "exposure_max_frontier"})},
        tables=[StudyTable(title=f"{tenant}'s digit records (phone, ID number), mean exposure in bits",
                           columns=["kind", "carrier", "prompt", "records", "before", "after", "change %"],
                           rows=rows)],
        findings=findings, plots=["prompts.png"], data={"carriers": data},
        seconds=round(time.perf_counter() - started, 1),
    )


BUCKETS = [(1, 5), (6, 10), (11, 15), (16, MAX_REPEATS)]


def frequency_study(bed: Bed, tenant: str, out_dir: Path, method: str = "fit") -> StudyResult:
    """Records seen rarely vs often in training: memorization before, and what the edit leaves."""
    started = time.perf_counter()
    chosen = cached_mask(bed, method, [r for r in bed.records if r.tenant == tenant], out_dir)
    before = cached_evaluation(bed, "before", None, tenant, out_dir)
    after = cached_evaluation(bed, method, chosen.off, tenant, out_dir)
    rows, data = [], []
    b = {r.id: r for r in before.records}
    a = {r.id: r for r in after.records}
    for group, members in (("target", lambda r: r.tenant == tenant), ("others", lambda r: r.tenant != tenant)):
        for lo, hi in BUCKETS:
            ids = [r.id for r in before.records if members(r) and lo <= r.repeats <= hi]
            if not ids:
                continue
            exp_b = [b[i].exposure for i in ids if b[i].exposure is not None]
            exp_a = [a[i].exposure for i in ids if a[i].exposure is not None]
            entry = {"group": group, "repeats": f"{lo}-{hi}", "records": len(ids),
                     "extraction_before": fmean(b[i].extracted for i in ids),
                     "extraction_after": fmean(a[i].extracted for i in ids),
                     "exposure_before": fmean(exp_b) if exp_b else None,
                     "exposure_after": fmean(exp_a) if exp_a else None}
            data.append(entry)
            rows.append([group, entry["repeats"], len(ids), round(entry["extraction_before"], 2),
                         round(entry["extraction_after"], 2),
                         None if entry["exposure_before"] is None else round(entry["exposure_before"], 2),
                         None if entry["exposure_after"] is None else round(entry["exposure_after"], 2)])
    points = [{"id": r.id, "tenant": r.tenant, "repeats": r.repeats, "before": r.exposure,
               "after": a[r.id].exposure}
              for r in before.records if r.exposure is not None]
    plot_frequency(points, tenant, out_dir / "frequency.png")
    findings = [f"{d['group']}, seen {d['repeats']} times: extraction {d['extraction_before']:.2f} -> "
                f"{d['extraction_after']:.2f}" for d in data]
    return StudyResult(
        study="frequency", title="Records seen rarely vs often",
        question="Are records repeated often in training memorized more, and harder to erase?",
        testbed=str(bed.path), settings={"tenant": tenant, "method": method, "neurons": int(chosen.off.sum())},
        tables=[StudyTable(title=f"target {tenant} vs the other tenants, by training repeats",
                           columns=["records", "repeats", "n", "extraction before", "extraction after",
                                    "exposure before", "exposure after"], rows=rows)],
        findings=findings, plots=["frequency.png"], data={"buckets": data, "points": points},
        seconds=round(time.perf_counter() - started, 1),
    )
