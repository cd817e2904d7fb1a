"""The demo's story: test-bed -> one verified isolation mask per tenant -> the cross-tenant matrix on the HF
model -> the same matrix through `depn serve` with each tenant's API key."""

from __future__ import annotations

import time
from pathlib import Path

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.core.console import console, progress
from depn_serve.core.fileio import atomic_write_text
from depn_serve.demo.api_matrix import serve_and_attack
from depn_serve.evaluation.figures import plot_mask_layers, plot_matrix
from depn_serve.evaluation.matrix import matrix_from_masks, render_matrix
from depn_serve.selection.isolation import isolate, render_isolation
from depn_serve.testbed import build_testbed, load_testbed_info


def run_demo(workdir: Path, profile: str, seed: int, design: str) -> None:
    started = time.perf_counter()
    bed = workdir / f"testbed-{profile}-{seed}"
    info_path = bed / "testbed.json"
    if info_path.is_file():
        info = load_testbed_info(info_path)
        console.print(f"[bold]1/4[/] using the test-bed in {bed}")
    else:
        console.print(f"[bold]1/4[/] building the '{profile}' test-bed in {bed} (a few minutes on 2 cores)")
        info = build_testbed(bed, profile, seed, progress=True)
    console.print(f"    memorized: {info.memorization.model_dump()}")
    records_path, model_dir = bed / "records.jsonl", bed / "model"

    masks_dir = workdir / "masks"
    console.print(f"[bold]2/4[/] one isolation mask per tenant ({design} design): forget every other tenant's "
                  "records, keep the tenant's own; each attacked and certified before it is written")
    with progress("fitting") as bar:
        report = isolate(model_dir, records_path, bed / "train.txt", bed / "valid.txt", masks_dir, design, bar=bar,
                         on_tenant=lambda row: console.print(
                             f"    {row.tenant}: {row.neurons} neurons, verification "
                             f"{'passed' if row.passed else 'FAILED'}", markup=False))
    console.print(render_isolation(report, str(masks_dir)))
    for row in report.tenants:
        plot_mask_layers(NeuronMask.load(masks_dir / f"{row.tenant}.safetensors"),
                         workdir / f"mask-{row.tenant}-layers.png")

    console.print("[bold]3/4[/] the cross-tenant matrix on the HF model (reference path)")
    with progress("attacking") as bar:
        bar.start(len(report.tenants) + 1)
        hf = matrix_from_masks(model_dir, records_path, masks_dir, progress=bar.advance)
    console.print(render_matrix(hf, "HF model with each tenant's mask"))
    plot_matrix(hf, workdir / "matrix-hf.png")
    atomic_write_text(workdir / "matrix-hf.json", hf.model_dump_json(indent=2))

    console.print("[bold]4/4[/] serving the test-bed with vLLM: every tenant's key runs with its isolation mask")
    api = serve_and_attack(bed, masks_dir, report.passed, workdir, console)
    plot_matrix(api, workdir / "matrix-api.png")
    atomic_write_text(workdir / "matrix-api.json", api.model_dump_json(indent=2))
    console.print(f"JSON, masks and plots in {workdir}; {time.perf_counter() - started:.0f} s in all")
