"""The `depn` command line: test-bed, detection, aggregation, masks, evaluation, demo."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from depn_serve.bench.cli import bench
from depn_serve.study.cli import study

# Logs and pipes get a wide console so the before/after table is not wrapped.
console = Console(width=None if sys.stdout.isatty() else 150)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@contextmanager
def _progress(description: str) -> Iterator[tuple]:
    """(on_start(total), advance()) callbacks driving one rich progress bar."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task(description, total=None)
        yield (lambda total: progress.update(task, total=total)), (lambda: progress.advance(task))


def _parse_layers(value: str | None, model_dir: Path) -> list[int] | None:
    """'A:B' (Python slice, B exclusive; either end may be omitted) or a single index."""
    if value is None:
        return None
    from depn_serve.arch import mlp_shape, read_config

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


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group()
@click.version_option(package_name="depn-serve")
def main() -> None:
    """DEPN: detect and edit privacy neurons, and serve per-tenant masks."""
    _quiet_transformers()


# --- test-bed ----------------------------------------------------------------------------------------------------
@main.group()
def testbed() -> None:
    """The built-in memorizing test-bed."""


@testbed.command("build")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--profile", type=click.Choice(["ci", "default"]), default="ci", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--checkpoints", default=0, show_default=True,
              help="also save N-1 evenly spaced training checkpoints under OUT/checkpoints/ (for `depn study training`)")
def testbed_build(out: Path, profile: str, seed: int, checkpoints: int) -> None:
    """Build a small Llama that has memorized private records injected into synthetic e-mail."""
    from depn_serve.testbed import build_testbed

    info = build_testbed(out, profile, seed, progress=True, checkpoints=checkpoints)
    console.print_json(info.model_dump_json())


# --- detection ---------------------------------------------------------------------------------------------------
@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--records", "records_path", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tenant", default=None, help="score only this tenant's records")
@click.option("--steps", default=20, show_default=True, help="integrated-gradient steps (m)")
@click.option("--layers", default=None, help="layer range A:B (B exclusive); default all")
@click.option("--batch-rows", default=512, show_default=True, help="rows (token x layer x step) per forward pass")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
def detect(model_dir, records_path, tenant, steps, layers, batch_rows, device, out) -> None:
    """Score every MLP neuron for each private record (integrated gradients) -> SCORES."""
    import time

    from depn_serve.detection import detect_to_file

    started = time.perf_counter()
    try:
        with _progress("detecting") as (on_start, advance):
            manifest = detect_to_file(
                model_dir, records_path, out, tenant=tenant, steps=steps, layers=_parse_layers(layers, model_dir),
                batch_rows=batch_rows, device=device, on_start=on_start, on_record_done=advance,
            )
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    n = len(manifest.record_tenants)
    seconds = time.perf_counter() - started
    console.print(f"scored {n} records in {seconds:.1f} s ({seconds / n:.2f} s/record) -> {out}")


# --- aggregation -------------------------------------------------------------------------------------------------
@main.command()
@click.argument("scores", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tenant", required=True)
@click.option("--method", type=click.Choice(["fit", "vote"]), default="fit", show_default=True,
              help="fit: gates fitted to forget this tenant's secrets and keep other tenants' records and ordinary "
                   "text (needs --model, --records, --keep-text); vote: DEPN's top-z by votes (needs only SCORES)")
@click.option("--threshold", type=float, default=None,
              help="vote if score >= threshold x the record's maximum (default: 0.1, DEPN's)")
@click.option("--top-z", "top_z", type=int, default=None,
              help="mask size (default: vote 1% of MLP neurons; fit the neurons whose gate ended below 0.5)")
@click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="fit / budgeted mode: the model the scores came from")
@click.option("--records", "records_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="fit / budgeted mode: the records file (fit: every tenant's, the others' are kept)")
@click.option("--keep-text", "keep_text_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="fit: ordinary text the mask must not change, e-mails separated by blank lines (e.g. train.txt)")
@click.option("--fit-steps", default=200, show_default=True, help="fit: optimizer steps")
@click.option("--target-exposure", type=float, default=None,
              help="budgeted mode: the fewest neurons that bring every record's exposure below this (bits)")
@click.option("--ppl-budget", type=float, default=None, help="budgeted mode: allowed perplexity increase, percent")
@click.option("--valid", "valid_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="budgeted mode: validation text (blank-line separated)")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="budgeted mode: write the search report (JSON) here")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False))
def aggregate(scores, tenant, method, threshold, top_z, model_dir, records_path, keep_text_path, fit_steps,
              target_exposure, ppl_budget, valid_path, report_path, out) -> None:
    """Turn a tenant's scores into its mask: fitted (default), top-z by votes, or (budgeted) the fewest neurons of
    either order that stop the leaks within a perplexity budget."""
    from depn_serve.aggregation import DEFAULT_THRESHOLD, aggregate_file

    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    budgeted = (target_exposure, ppl_budget, valid_path)
    if method == "fit" and (model_dir is None or records_path is None or keep_text_path is None):
        _fail(ValueError("--method fit (the default) needs --model, --records and --keep-text; "
                         "--method vote needs only SCORES"))
    if any(v is not None for v in budgeted):
        if any(v is None for v in budgeted) or model_dir is None or records_path is None or top_z is not None:
            _fail(ValueError("budgeted mode needs --target-exposure, --ppl-budget, --model, --records and --valid "
                             "(and no --top-z)"))
        mask = _budgeted(scores, tenant, method, threshold, fit_steps, target_exposure, ppl_budget, model_dir,
                         records_path, keep_text_path, valid_path, report_path)
    elif method == "fit":
        mask = _fitted(scores, tenant, model_dir, records_path, keep_text_path, fit_steps, top_z)[0]
    else:
        try:
            mask = aggregate_file(scores, tenant, threshold, top_z)
        except ValueError as exc:
            _fail(exc)
    mask.save(out)
    m = mask.manifest
    console.print(f"mask for tenant {tenant!r} ({m.provenance.method}): {m.neuron_count} neurons from "
                  f"{m.provenance.records} records -> {out}")


def _fitted(scores, tenant, model_dir, records_path, keep_text_path, steps, top_z):
    from pydantic import ValidationError

    from depn_serve.fitting import FitSettings, fit_file

    try:
        settings = FitSettings(steps=steps)
        with _progress("fitting gates") as (start, advance):
            start(steps)
            result = fit_file(scores, tenant, model_dir, records_path, keep_text_path, settings, top_z,
                              on_step=lambda _point: advance())
    except (ValidationError, ValueError) as exc:
        _fail(exc)
    fit = result[2]
    last = fit.trace[-1]
    console.print(f"fitted {fit.records} records against {fit.keep_records} kept records and "
                  f"{fit.keep_windows_pool} text windows in {fit.seconds:.0f} s: forget {last.forget:.3f}, "
                  f"KL records {last.keep_records:.4f}, KL text {last.keep_text:.4f}, {last.off} gates below 0.5")
    return result


def _budgeted(scores, tenant, method, threshold, fit_steps, target_exposure, ppl_budget, model_dir, records_path,
              keep_text_path, valid_path, report_path):
    from pydantic import ValidationError

    from depn_serve.aggregation import check_scores_model, mask_from, tally_file, vote_order
    from depn_serve.arch import load_model
    from depn_serve.budget import BudgetSettings, budgeted_selection
    from depn_serve.fileio import atomic_write_text
    from depn_serve.records import load_records
    from depn_serve.testbed.corpus import read_valid_texts

    try:
        budget = BudgetSettings(target_exposure=target_exposure, ppl_budget=ppl_budget)
        tally, scores_file = tally_file(scores, tenant, threshold)
        check_scores_model(scores_file, model_dir)
        records = load_records(records_path, tenant)
        if not records:
            raise ValueError(f"{records_path}: no records of tenant {tenant!r}")
    except (ValidationError, ValueError) as exc:
        _fail(exc)
    if method == "fit":
        order = _fitted(scores, tenant, model_dir, records_path, keep_text_path, fit_steps, None)[1]
        aggregator = {"steps": fit_steps}
    else:
        order = vote_order(tally)
        aggregator = {"threshold": threshold}
    model, tokenizer = load_model(model_dir)
    shape = (scores_file.manifest.num_layers, scores_file.manifest.intermediate_size)

    def show(point) -> None:
        console.print(f"  {point.neurons:6d} neurons: perplexity {point.perplexity:.2f}"
                      f"{'' if point.within_budget else ' (over budget)'}, {point.protected}/{len(records)} protected")

    off, report = budgeted_selection(model, tokenizer, records, read_valid_texts(valid_path), order, shape, budget,
                                     on_point=show)
    if report_path:
        atomic_write_text(report_path, report.model_dump_json(indent=2))
    verdict = "all protected" if report.all_protected else f"still leaking: {', '.join(report.unprotected)}"
    console.print(f"{report.neurons} of {report.candidates} candidate neurons; perplexity {report.ppl_before:.2f} -> "
                  f"{report.ppl_after:.2f} ({report.ppl_change_pct:+.1f} %); {verdict}; {report.seconds:.0f} s")
    return mask_from(scores_file, tenant, off, tally.records, f"depn-{method}-budgeted",
                     {**aggregator, "target_exposure": target_exposure, "ppl_budget": ppl_budget,
                      "neurons": report.neurons, "all_protected": report.all_protected})


# --- masks -------------------------------------------------------------------------------------------------------
@main.group()
def masks() -> None:
    """Inspect mask files."""


@masks.command("inspect")
@click.argument("mask_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="manifest plus neuron indices per layer")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None, help="write a PNG")
def masks_inspect(mask_path, as_json, plot) -> None:
    """Summary and per-layer histogram of a mask."""
    from depn_serve.masks import MaskError, NeuronMask

    try:
        mask = NeuronMask.load(mask_path)
    except MaskError as exc:
        _fail(exc)
    m = mask.manifest
    if as_json:
        doc = json.loads(m.model_dump_json())
        doc["neurons"] = {str(layer): idx for layer, idx in mask.neurons().items()}
        click.echo(json.dumps(doc, indent=2))
    else:
        console.print(f"[bold]{mask_path}[/]  tenant [bold]{m.tenant}[/]  {m.architecture}  "
                      f"{m.num_layers} layers x {m.intermediate_size}  fingerprint {m.model_fingerprint.short}")
        console.print(f"{m.neuron_count} neurons masked ({100 * m.neuron_count / (m.num_layers * m.intermediate_size):.2f} %), "
                      f"method {m.provenance.method}, {m.provenance.records} records, created {m.provenance.created_at:%Y-%m-%d %H:%M} UTC")
        peak = max(m.neurons_per_layer) or 1
        for layer, count in enumerate(m.neurons_per_layer):
            console.print(f"  layer {layer:>3} {count:>6}  {'█' * round(40 * count / peak)}")
    if plot:
        from depn_serve.plots import plot_mask_layers

        plot_mask_layers(mask, plot)
        if not as_json:
            console.print(f"plot -> {plot}")


# --- evaluation --------------------------------------------------------------------------------------------------
_SERVER = click.option("--server", required=True, help="base URL of depn serve, e.g. http://127.0.0.1:8000")
_TOKEN = click.option("--admin-token-file", "token_file", required=True,
                      type=click.Path(path_type=Path, exists=True, dir_okay=False))


def _admin(server: str, token_file: Path):
    from depn_serve.serving.client import AdminClient
    from depn_serve.serving.server import ServeError

    try:
        return AdminClient(server, token_file)
    except ServeError as exc:
        _fail(exc)


@masks.command("push")
@_SERVER
@_TOKEN
@click.option("--tenant", required=True)
@click.option("--mask", "mask_path", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--id", "mask_id", default=None, help="mask id in the store (default: the file name without suffix)")
def masks_push(server, token_file, tenant, mask_path, mask_id) -> None:
    """Upload a mask; the server validates it, stores it and activates it for the tenant without a restart."""
    from depn_serve.serving.client import AdminError

    try:
        result = _admin(server, token_file).push(tenant, mask_id or mask_path.stem, mask_path)
    except AdminError as exc:
        _fail(exc)
    click.echo(f"pushed {result['mask']} v{result['version']} ({result['neurons']} neurons) to {result['tenant']}; "
               f"tenant now masks {result['tenant_neurons']} neurons")


@masks.command("list")
@_SERVER
@_TOKEN
@click.option("--json", "as_json", is_flag=True)
def masks_list(server, token_file, as_json) -> None:
    """Tenants, their mask ids, versions, neuron counts and whether each is resident in a slot."""
    from rich.table import Table

    from depn_serve.serving.client import AdminError

    try:
        listing = _admin(server, token_file).list()
    except AdminError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    table = Table(title=f"{listing['resident']} of {listing['slots']} mask slots resident")
    for column in ("tenant", "masks (id vN: neurons)", "masked neurons", "resident", "unmasked allowed"):
        table.add_column(column)
    for t in listing["tenants"]:
        masks_desc = ", ".join(f"{m['id']} v{m['version']}: {m['neurons']}" for m in t["masks"]) or "-"
        table.add_row(t["tenant"], masks_desc, str(t["masked_neurons"]), "yes" if t["resident"] else "no",
                      "yes" if t["allow_unmasked"] else "no")
    console.print(table)


@masks.command("drop")
@_SERVER
@_TOKEN
@click.option("--tenant", required=True)
@click.option("--id", "mask_id", required=True)
def masks_drop(server, token_file, tenant, mask_id) -> None:
    """Stop using a mask for a tenant (deleted from the store once no tenant uses it)."""
    from depn_serve.serving.client import AdminError

    try:
        result = _admin(server, token_file).drop(tenant, mask_id)
    except AdminError as exc:
        _fail(exc)
    state = "" if result["servable"] else "; it has no mask left and will get 403"
    click.echo(f"dropped {result['dropped']} from {result['tenant']} (masks now: {result['masks'] or 'none'}){state}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--tenants", "tenants_path", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--mask-store", required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--admin-token-file", "token_file", required=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--max-mask-slots", default=64, show_default=True, help="masks resident on the device at once")
@click.option("--metrics-max-tenants", default=100, show_default=True,
              help="tenants with their own Prometheus label (the rest share '_other')")
@click.pass_context
def serve(ctx, model_dir, tenants_path, mask_store, token_file, max_mask_slots, metrics_max_tenants) -> None:
    """vLLM's OpenAI-compatible server with per-tenant masks; any other option is passed to vLLM as is."""
    from depn_serve.serving.server import ServeError
    from depn_serve.serving.server import serve as run_server
    from depn_serve.serving.store import StoreError
    from depn_serve.tenants import TenantsError

    try:
        run_server(model_dir, tenants_path, mask_store, token_file, max_mask_slots, metrics_max_tenants,
                   list(ctx.args))
    except (ServeError, StoreError, TenantsError, ValueError) as exc:
        _fail(exc)


@main.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--records", "records_path", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--valid", "valid_path", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--mask", "mask_path", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--random-baseline/--no-random-baseline", default=True, show_default=True,
              help="also evaluate a random mask of the same size")
@click.option("--exposure-samples", default=1000, show_default=True, help="candidates for the skew-normal fit")
@click.option("--robustness", is_flag=True,
              help="also held-out paraphrase prompts (extraction, exposure) and sampled extraction (slower)")
@click.option("--samples", default=10, show_default=True, help="with --robustness: samples per record and temperature")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None)
def eval_cmd(model_dir, records_path, valid_path, mask_path, random_baseline, exposure_samples, robustness, samples,
             seed, device, json_out) -> None:
    """Extraction, exposure, MRR and validation perplexity, before and after a mask, per tenant."""
    from depn_serve.evaluation.metrics import EvalSettings
    from depn_serve.evaluation.report import render_table
    from depn_serve.evaluation.run import evaluate
    from depn_serve.fileio import atomic_write_text
    from depn_serve.masks import MaskError

    try:
        with _progress("evaluating") as (on_start, advance):
            report = evaluate(
                model_dir, records_path, valid_path, mask_path, random_baseline=random_baseline, seed=seed,
                settings=EvalSettings(exposure_samples=exposure_samples, robustness=robustness, samples=samples),
                device=device, on_start=on_start, progress=advance,
            )
    except (MaskError, ValueError, FileNotFoundError) as exc:
        _fail(exc)
    console.print(render_table(report))
    if json_out:
        atomic_write_text(json_out, report.model_dump_json(indent=2))
        console.print(f"JSON -> {json_out}")


# --- demo --------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("runs/demo"),
              show_default=True)
@click.option("--profile", type=click.Choice(["ci", "default"]), default="ci", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tenant", default=None, help="tenant to protect (default: the first one)")
@click.option("--method", type=click.Choice(["fit", "vote"]), default="fit", show_default=True,
              help="how to choose the neurons (see `depn aggregate --help`)")
@click.option("--top-z", "top_z", type=int, default=None,
              help="mask size (default: vote 1% of MLP neurons; fit its own)")
def demo(workdir: Path, profile: str, seed: int, tenant: str | None, method: str, top_z: int | None) -> None:
    """The whole story: test-bed -> detect -> aggregate -> evaluate -> serve two tenants side by side."""
    import time

    from depn_serve.aggregation import aggregate_file
    from depn_serve.detection import detect_to_file
    from depn_serve.evaluation.report import render_table
    from depn_serve.evaluation.run import evaluate
    from depn_serve.fileio import atomic_write_text
    from depn_serve.plots import plot_exposure, plot_mask_layers
    from depn_serve.records import load_records
    from depn_serve.testbed import build_testbed, load_testbed_info

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
    with _progress("detecting") as (on_start, advance):
        manifest = detect_to_file(model_dir, records_path, scores_path, tenant=tenant,
                                  on_start=on_start, on_record_done=advance)
    per_record = (time.perf_counter() - started) / len(manifest.record_tenants)
    console.print(f"    {per_record:.2f} s per record -> {scores_path}")

    mask_path = workdir / f"mask-{tenant}.safetensors"
    if method == "fit":
        console.print("    fitting gates: forget this tenant's secrets, keep the other tenants' records and the mail")
        mask = _fitted(scores_path, tenant, model_dir, records_path, bed / "train.txt", 200, top_z)[0]
    else:
        mask = aggregate_file(scores_path, tenant, z=top_z)
    mask.save(mask_path)
    plot_mask_layers(mask, workdir / f"mask-{tenant}-layers.png")
    console.print(f"[bold]3/5[/] mask: {mask.manifest.neuron_count} neurons, per layer "
                  f"{mask.manifest.neurons_per_layer} -> {mask_path}")

    console.print("[bold]4/5[/] evaluating before / after / random mask of the same size")
    with _progress("evaluating") as (on_start, advance):
        report = evaluate(model_dir, records_path, bed / "valid.txt", mask_path, on_start=on_start, progress=advance)
    atomic_write_text(workdir / "eval.json", report.model_dump_json(indent=2))
    plot_exposure(report, workdir / "exposure.png")
    console.print(render_table(report))

    console.print(f"[bold]5/5[/] serving the test-bed with vLLM: {tenant!r} masked, another tenant unmasked")
    from depn_serve.serving.demo import serve_side_by_side

    serving = serve_side_by_side(bed, tenant, mask_path, workdir, console)
    atomic_write_text(workdir / "serving.json", json.dumps(serving, indent=2))
    console.print(f"JSON, mask and plots in {workdir}")


# --- benchmarks --------------------------------------------------------------------------------------------------
main.add_command(bench)
main.add_command(study)


@main.command()
@click.argument("results_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False), help="HTML file to write")
def report(results_dir: Path, out: Path) -> None:
    """Put every `depn study` result in RESULTS_DIR on one self-contained HTML page."""
    from depn_serve.study.report import write_report

    try:
        count = write_report(results_dir, out)
    except ValueError as exc:
        _fail(exc)
    console.print(f"{count} studies -> {out}")


# --- tenants -----------------------------------------------------------------------------------------------------
@main.group()
def tenants() -> None:
    """Tenants, their masks and API keys (the file `depn serve --tenants` reads)."""


@tenants.command("add")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--tenant", required=True)
@click.option("--mask", "masks_", multiple=True, help="mask id in the mask store (repeat for a union)")
@click.option("--allow-unmasked", is_flag=True, help="let this tenant run without any mask")
def tenants_add(config_path: Path, tenant: str, masks_: tuple[str, ...], allow_unmasked: bool) -> None:
    """Create a tenant and print its new API key once (only its hash is stored)."""
    from depn_serve.tenants import TenantsConfig, TenantsError

    try:
        config = TenantsConfig.load(config_path) if config_path.exists() else TenantsConfig()
        key = config.add_tenant(tenant, list(masks_), allow_unmasked)
        config.save(config_path)
    except (TenantsError, ValueError) as exc:
        _fail(exc)
    click.echo(f"tenant {tenant!r} added to {config_path}; its API key (shown only now):", err=True)
    click.echo(key)


@tenants.command("list")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
def tenants_list(config_path: Path) -> None:
    """Tenants with their masks and key hints."""
    from depn_serve.tenants import TenantsConfig, TenantsError

    try:
        config = TenantsConfig.load(config_path)
    except TenantsError as exc:
        _fail(exc)
    for t in config.tenants:
        anonymous = "  (anonymous)" if t.id == config.anonymous_tenant else ""
        masks_desc = ", ".join(t.masks) or ("none (may run unmasked)" if t.allow_unmasked else "none (refused)")
        keys = ", ".join(f"{k.hint}…" for k in t.api_keys) or "no keys"
        click.echo(f"{t.id}{anonymous}\tmasks: {masks_desc}\tkeys: {keys}")
