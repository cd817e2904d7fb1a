"""`depn study …`: DEPN's analyses, one command each, each writing RESULTS/<study>.json and its PNG; `depn report`
puts them on one page."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve.core.console import console
from depn_serve.selection import DEFAULT_METHOD, METHODS
from depn_serve.study.common import StudyResult, write_study
from depn_serve.testbed.profiles import PROFILES

_BED = click.argument("bed", type=click.Path(path_type=Path, exists=True, file_okay=False))
_OUT = click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
                    help="results folder (shared by the studies: masks and evaluations are cached there)")
_TENANT = click.option("--tenant", default=None, help="tenant to protect (default: the test-bed's first)")
_METHOD = click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True)


def _load(bed_path: Path):
    from depn_serve.study.common import Bed

    return Bed.load(bed_path)


def _finish(result: StudyResult, out_dir: Path) -> None:
    path = write_study(out_dir, result)
    for finding in result.findings:
        console.print(f"  {finding}")
    console.print(f"[bold]{result.title}[/bold]: {result.seconds:.0f} s -> {path}, "
                  f"{', '.join(str(out_dir / p) for p in result.plots)}")


def _tenant(bed, tenant: str | None) -> str:
    tenants = bed.tenants()
    if tenant is None:
        return tenants[0]
    if tenant not in tenants:
        raise click.BadParameter(f"{tenant!r}: not in the test-bed; tenants: {tenants}", param_hint="--tenant")
    return tenant


@click.group()
def study() -> None:
    """DEPN's analyses on a test-bed (JSON + PNG per study; `depn report` puts them on one page)."""


@study.command("methods")
@_BED
@_TENANT
@click.option("--methods", default=",".join(METHODS), show_default=True, help="comma-separated subset")
@_OUT
def methods_cmd(bed: Path, tenant: str | None, methods: str, out_dir: Path) -> None:
    """Selection methods and baselines (random, knowledge-neurons attribution) on the same records."""
    from depn_serve.study.efficacy import methods_study

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; known: {list(METHODS)}", param_hint="--methods")
    loaded = _load(bed)
    _finish(methods_study(loaded, _tenant(loaded, tenant), out_dir, chosen), out_dir)


@study.command("batch-size")
@_BED
@click.option("--sizes", default="10,50,200", show_default=True, help="records per edit (capped at the test-bed's)")
@_METHOD
@_OUT
def batch_size_cmd(bed: Path, sizes: str, method: str, out_dir: Path) -> None:
    """Masks from N records of one edit: exposure drop and perplexity cost against N."""
    from depn_serve.study.efficacy import batch_size_study

    try:
        counts = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{sizes!r}: expected comma-separated integers", param_hint="--sizes") from None
    _finish(batch_size_study(_load(bed), counts, out_dir, method), out_dir)


def _per_tenant(name: str, doc: str, run) -> None:
    """A study of one tenant's edit on a test-bed: same options, same handling."""

    @_BED
    @_TENANT
    @_METHOD
    @_OUT
    def command(bed: Path, tenant: str | None, method: str, out_dir: Path) -> None:
        loaded = _load(bed)
        _finish(run()(loaded, _tenant(loaded, tenant), out_dir, method), out_dir)

    command.__doc__ = doc
    study.command(name)(command)


def _prompts():
    from depn_serve.study.records import prompts_study

    return prompts_study


def _frequency():
    from depn_serve.study.records import frequency_study

    return frequency_study


_per_tenant("prompts", "Exposure before/after per carrier sentence, training and held-out.", _prompts)
_per_tenant("frequency", "Records seen rarely vs often in training, before and after.", _frequency)


@study.command("neurons")
@_BED
@click.option("--methods", default="fit,vote", show_default=True, help="masks to compare across tenants")
@_OUT
def neurons_cmd(bed: Path, methods: str, out_dir: Path) -> None:
    """Privacy neurons per layer, per record kind, and their overlap between records and tenants."""
    from depn_serve.study.neurons import neurons_study

    _finish(neurons_study(_load(bed), out_dir, tuple(m.strip() for m in methods.split(","))), out_dir)


@study.command("model-size")
@click.option("--profile", type=click.Choice(list(PROFILES)), default="ci", show_default=True,
              help="corpus and training budget shared by every size")
@click.option("--sizes", default="128x2x512,192x3x768,256x4x1024", show_default=True,
              help="HIDDENxLAYERSxINTERMEDIATE, comma-separated; each is built under OUT/beds/ once")
@click.option("--seed", default=0, show_default=True)
@_METHOD
@_OUT
def model_size_cmd(profile: str, sizes: str, seed: int, method: str, out_dir: Path) -> None:
    """Builds one test-bed per size (same corpus) and edits its first tenant."""
    from depn_serve.study.scaling import model_size_study

    _finish(model_size_study([s.strip() for s in sizes.split(",") if s.strip()], profile, seed, out_dir, method),
            out_dir)


@study.command("training")
@_BED
@_TENANT
@_OUT
def training_cmd(bed: Path, tenant: str | None, out_dir: Path) -> None:
    """Memorization and DEPN's neurons across training checkpoints (`depn testbed build --checkpoints N`)."""
    from depn_serve.study.scaling import training_study

    _finish(training_study(bed, _tenant(_load(bed), tenant), out_dir), out_dir)


@click.command()
@click.argument("results_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="HTML file to write")
def report(results_dir: Path, out: Path) -> None:
    """Put every `depn study` result in RESULTS_DIR on one self-contained HTML page."""
    from depn_serve.study.report import write_report

    count = write_report(results_dir, out)
    console.print(f"{count} studies -> {out}")


COMMANDS = [study, report]
