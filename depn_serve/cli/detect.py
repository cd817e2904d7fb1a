"""`depn detect`: integrated-gradient scores per record -> SCORES."""

from __future__ import annotations

import time
from pathlib import Path

import click

from depn_serve.cli.options import existing_file, model_dir_option, out_file, ray_option, setting
from depn_serve.core.console import console, progress
from depn_serve.detection.ig import DetectSettings


def parse_layers(value: str | None, model_dir: Path) -> list[int] | None:
    """'A:B' (Python slice, B exclusive; either end may be omitted) or a single index."""
    if value is None:
        return None
    from depn_serve.core.arch import mlp_shape, read_config

    every = list(range(mlp_shape(read_config(model_dir)).num_layers))
    try:
        if ":" in value:
            start, _, stop = value.partition(":")
            chosen = every[slice(int(start) if start else None, int(stop) if stop else None)]
        else:
            chosen = [every[int(value)]]
    except (ValueError, IndexError):
        raise click.BadParameter(f"expected A:B or an index within {len(every)} layers, found {value!r}",
                                 param_hint="--layers") from None
    if not chosen:
        raise click.BadParameter(f"{value!r} selects no layer of {len(every)}", param_hint="--layers")
    return chosen


@click.command()
@model_dir_option(required=True)
@existing_file("--records", "records_path", required=True)
@click.option("--tenant", default=None, help="score only this tenant's records")
@setting(DetectSettings, "steps")
@click.option("--layers", "layer_range", default=None, help="layer range A:B (B exclusive); default all")
@setting(DetectSettings, "batch_rows")
@setting(DetectSettings, "shard_records")
@click.option("--device", default="cpu", show_default=True)
@ray_option()
@out_file()
def detect(model_dir: Path, records_path: Path, tenant: str | None, steps: int, layer_range: str | None,
           batch_rows: int, shard_records: int, device: str, ray_address: str | None, out: Path) -> None:
    """Score every MLP neuron for each private record (integrated gradients) -> SCORES."""
    from depn_serve.core.cluster import runner
    from depn_serve.detection import detect_to_file

    settings = DetectSettings(steps=steps, layers=parse_layers(layer_range, model_dir), batch_rows=batch_rows,
                              shard_records=shard_records)
    started = time.perf_counter()
    with runner(ray_address, device) as jobs, progress("detecting") as bar:
        manifest = detect_to_file(model_dir, records_path, out, tenant=tenant, settings=settings, device=device,
                                  on_start=bar.start, on_record_done=bar.advance, runner=jobs)
    n = len(manifest.record_tenants)
    seconds = time.perf_counter() - started
    console.print(f"scored {n} records in {seconds:.1f} s ({seconds / n:.2f} s/record) -> {out}")


COMMANDS = [detect]
