"""`depn eval`: extraction, exposure, MRR and perplexity before and after a mask."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve.cli.options import existing_file, model_dir_option, setting
from depn_serve.core.console import console, progress
from depn_serve.evaluation.metrics import EvalSettings


@click.command("eval")
@model_dir_option(required=True)
@existing_file("--records", "records_path", required=True)
@existing_file("--valid", "valid_path", required=True)
@click.option("--mask", "mask_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--random-baseline/--no-random-baseline", default=True, show_default=True,
              help="also evaluate a random mask of the same size")
@setting(EvalSettings, "exposure_samples")
@click.option("--robustness", is_flag=True,
              help="also held-out paraphrase prompts (extraction, exposure) and sampled extraction (slower)")
@setting(EvalSettings, "samples")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None)
def evaluate(model_dir: Path, records_path: Path, valid_path: Path, mask_path: Path | None, random_baseline: bool,
             exposure_samples: int, robustness: bool, samples: int, seed: int, device: str,
             json_out: Path | None) -> None:
    """Extraction, exposure, MRR and validation perplexity, before and after a mask, per tenant."""
    from depn_serve.core.fileio import atomic_write_text
    from depn_serve.evaluation.report import render_table
    from depn_serve.evaluation.run import evaluate as run_evaluation

    settings = EvalSettings(exposure_samples=exposure_samples, robustness=robustness, samples=samples)
    with progress("evaluating") as bar:
        report = run_evaluation(model_dir, records_path, valid_path, mask_path, random_baseline=random_baseline,
                                seed=seed, settings=settings, device=device, on_start=bar.start, progress=bar.advance)
    console.print(render_table(report))
    if json_out:
        atomic_write_text(json_out, report.model_dump_json(indent=2))
        console.print(f"JSON -> {json_out}")


COMMANDS = [evaluate]
