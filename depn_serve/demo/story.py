"""The demo's story: test-bed -> detect -> select -> evaluate -> serve two tenants side by side."""

from __future__ import annotations

import json
import time
from pathlib import Path

from depn_serve.core.console import console, progress
from depn_serve.core.fileio import atomic_write_text
from depn_serve.core.records import load_records
from depn_serve.core.selectors import MaskPolicy
from depn_serve.demo.side_by_side import serve_side_by_side
from depn_serve.detection import detect_to_file
from depn_serve.evaluation.figures import plot_exposure, plot_mask_layers
from depn_serve.evaluation.report import render_table
from depn_serve.evaluation.run import evaluate
from depn_serve.selection import inputs_from_files, method, select
from depn_serve.testbed import build_testbed, load_testbed_info


def run_demo(workdir: Path, profile: str, seed: int, tenant: str | None, method_name: str, top_z: int | None) -> None:
    chosen_method = method(method_name)
    bed = workdir / f"testbed-{profile}-{seed}"
    info_path = bed / "testbed.json"
    if info_path.is_file():
        info = load_testbed_info(info_path)
        console.print(f"[bold]1/5[/] using the test-bed in {bed}")
    else:
        console.print(f"[bold]1/5[/] building the '{profile}' test-bed in {bed} (a few minutes on 2 cores)")
        info = build_testbed(bed, profile, seed, progress=True)
    console.print(f"    memorized: {info.memorization.model_dump()}")

    records_path, model_dir = bed / "records.jsonl", bed / "model"
    tenant = tenant or load_records(records_path)[0].tenant
    scores_path = workdir / f"scores-{tenant}.safetensors"
    console.print(f"[bold]2/5[/] detecting privacy neurons for tenant {tenant!r}")
    started = time.perf_counter()
    with progress("detecting") as bar:
        manifest = detect_to_file(model_dir, records_path, scores_path, tenant=tenant, on_start=bar.start,
                                  on_record_done=bar.advance)
    per_record = (time.perf_counter() - started) / len(manifest.record_tenants)
    console.print(f"    {per_record:.2f} s per record -> {scores_path}")

    mask_path = workdir / f"mask-{tenant}.safetensors"
    console.print(f"    selecting with {chosen_method.name}: {chosen_method.description}")
    inputs = inputs_from_files(MaskPolicy.own_records(tenant), scores_path, model_dir, records_path, bed / "train.txt")
    with progress(f"selecting ({chosen_method.name})") as bar:
        chosen = select(inputs, chosen_method.name, size=top_z, bar=bar)
    console.print(f"    {chosen.summary()}")
    mask = chosen.to_mask(inputs)
    mask.save(mask_path)
    plot_mask_layers(mask, workdir / f"mask-{tenant}-layers.png")
    console.print(f"[bold]3/5[/] mask: {mask.manifest.neuron_count} neurons, per layer "
                  f"{mask.manifest.neurons_per_layer} -> {mask_path}")

    console.print("[bold]4/5[/] evaluating before / after / random mask of the same size")
    with progress("evaluating") as bar:
        report = evaluate(model_dir, records_path, bed / "valid.txt", mask_path, on_start=bar.start,
                          progress=bar.advance)
    atomic_write_text(workdir / "eval.json", report.model_dump_json(indent=2))
    plot_exposure(report, workdir / "exposure.png")
    console.print(render_table(report))

    console.print(f"[bold]5/5[/] serving the test-bed with vLLM: {tenant!r} masked, another tenant unmasked")
    serving = serve_side_by_side(bed, tenant, mask_path, workdir, console)
    atomic_write_text(workdir / "serving.json", json.dumps(serving, indent=2))
    console.print(f"JSON, mask and plots in {workdir}")
