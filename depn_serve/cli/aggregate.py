"""`depn aggregate`: a tenant's scores -> its mask, by any selection method, optionally budgeted."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve.cli.options import existing_file, model_dir_option, out_file, ray_option, setting, settings_from
from depn_serve.core.console import console, progress
from depn_serve.core.errors import DepnError
from depn_serve.selection import DEFAULT_METHOD, METHODS
from depn_serve.selection.budget import BudgetSettings
from depn_serve.selection.fit import FitSettings
from depn_serve.selection.vote import VoteSettings

# Which option supplies each input a method needs.
_OPTION_FOR = {"model": "--model", "tokenizer": "--model", "targets": "--records", "keep_texts": "--keep-text"}


@click.command()
@click.argument("scores", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--tenant", required=True, help="the tenant the mask is built with (its policy's, by default its own "
                                             "records are forgotten)")
@click.option("--for", "made_for", default=None, metavar="TENANT",
              help="the tenant the mask is made for: servers refuse it for any other tenant (default: none in "
                   "particular, so any tenant may be served with it; an isolation policy's mask is made for its "
                   "tenant)")
@click.option("--forget", multiple=True, metavar="SELECTOR",
              help="records to forget, e.g. 'tenant!=acme' or 'tenant=acme,kind=phone' (repeat: any of them; "
                   "default: the tenant's own records)")
@click.option("--keep", multiple=True, metavar="SELECTOR",
              help="records to keep, e.g. 'tenant=acme' (repeat: any of them; default: every record not forgotten)")
@click.option("--method", "method_name", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True,
              help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
@setting(VoteSettings, "threshold", help="vote: a record votes for neurons scoring >= threshold x its maximum")
@setting(FitSettings, "steps", "--fit-steps", help="fit: optimizer steps of the first round")
@setting(FitSettings, "rounds", "--fit-rounds", help="fit: fit-then-attack rounds at most (1: no attacks)")
@setting(FitSettings, "text_weight", help="fit: weight of the KL on ordinary text")
@setting(FitSettings, "secret_keep_weight", help="fit: weight of the kept records' secret tokens")
@setting(FitSettings, "context", "--fit-context/--no-fit-context", help="fit: also forget behind ordinary text")
@click.option("--top-z", "top_z", type=int, default=None,
              help="mask size (default: the method's own; vote and the baselines 1% of MLP neurons, fit the neurons "
                   "whose gate ended below 0.5)")
@model_dir_option(help="the model the scores came from (fit, kn, budgeted mode)")
@existing_file("--records", "records_path",
               help="the records file: the tenant's records are forgotten, every other tenant's kept")
@existing_file("--keep-text", "keep_text_path",
               help="fit: ordinary text the mask must not change, e-mails separated by blank lines (e.g. train.txt)")
@click.option("--target-exposure", type=float, default=None,
              help="budgeted mode: the fewest neurons that bring every record's exposure below this (bits)")
@click.option("--ppl-budget", type=float, default=None, help="budgeted mode: allowed perplexity increase, percent")
@existing_file("--valid", "valid_path", help="budgeted mode: validation text (blank-line separated)")
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="budgeted mode: write the search report (JSON) here")
@click.option("--device", default="cpu", show_default=True)
@ray_option()
@out_file()
def aggregate(scores: Path, tenant: str, made_for: str | None, forget: tuple[str, ...], keep: tuple[str, ...],
              method_name: str,
              top_z: int | None, model_dir: Path | None,
              records_path: Path | None, keep_text_path: Path | None, target_exposure: float | None,
              ppl_budget: float | None, valid_path: Path | None, report_path: Path | None, device: str,
              ray_address: str | None, out: Path, **method_options) -> None:
    """Turn scores into a mask served to TENANT: by default it forgets the tenant's own records (DEPN); --forget and
    --keep choose any records. Fitted (default), top-z by votes, a baseline, or (budgeted) the fewest neurons of
    the method's order that stop the leaks within a perplexity budget."""
    from depn_serve.core.cluster import runner
    from depn_serve.core.records import load_records
    from depn_serve.core.selectors import MaskPolicy
    from depn_serve.selection.aggregation import Aggregation
    from depn_serve.selection.aggregation import aggregate as run_aggregation

    method = METHODS[method_name]
    given = {"--model": model_dir, "--records": records_path, "--keep-text": keep_text_path}
    missing = sorted({_OPTION_FOR[n] for n in method.needs if n in _OPTION_FOR and given[_OPTION_FOR[n]] is None})
    if missing:
        raise DepnError(f"--method {method.name} needs {', '.join(missing)}")
    budgeted = (target_exposure, ppl_budget, valid_path)
    budget = None
    if any(v is not None for v in budgeted):
        if any(v is None for v in budgeted) or model_dir is None or records_path is None or top_z is not None:
            raise DepnError("budgeted mode needs --target-exposure, --ppl-budget, --model, --records and --valid "
                            "(and no --top-z)")
        budget = BudgetSettings(target_exposure=target_exposure, ppl_budget=ppl_budget)
    policy = MaskPolicy(tenant=tenant, forget=forget or (f"tenant={tenant}",), keep=keep)
    targets = len(policy.split(load_records(records_path), str(records_path))[0]) if budget else 0

    def show(point) -> None:
        console.print(f"  {point.neurons:6d} neurons: perplexity {point.perplexity:.2f}"
                      f"{'' if point.within_budget else ' (over budget)'}, {point.protected}/{targets} protected")

    job = Aggregation(policy, method.name, settings_from(method.settings, method_options), scores, model_dir,
                      records_path, keep_text_path, valid_path, top_z, budget, device)
    with runner(ray_address, device) as jobs, progress(f"selecting ({method.name})") as bar:
        # on a cluster the job runs elsewhere: its progress and search points are shown when it is done
        result = jobs.map(run_aggregation, [job])[0] if ray_address else run_aggregation(job, bar, show)
    console.print(result.summary)
    report = result.report
    if report is not None:
        if ray_address:
            for point in report.points:
                show(point)
        if report_path:
            from depn_serve.core.fileio import atomic_write_text

            atomic_write_text(report_path, report.model_dump_json(indent=2))
        verdict = "all protected" if report.all_protected else f"still leaking: {', '.join(report.unprotected)}"
        console.print(f"{report.neurons} of {report.candidates} candidate neurons; perplexity {report.ppl_before:.2f}"
                      f" -> {report.ppl_after:.2f} ({report.ppl_change_pct:+.1f} %); {verdict}; {report.seconds:.0f} s")
    mask = result.mask if made_for is None else result.mask.made_for(made_for)
    mask.save(out)
    m = mask.manifest
    whom = f"made for tenant {m.made_for!r}" if m.made_for else "made for any tenant"
    console.print(f"mask of tenant {tenant!r}, {whom} ({m.provenance.method}): {m.neuron_count} neurons from "
                  f"{m.provenance.records} records -> {out}")


COMMANDS = [aggregate]
