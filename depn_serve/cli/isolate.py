"""`depn isolate` (one certified isolation mask per tenant) and `depn verify` (attack any mask, write its
certificate)."""

from __future__ import annotations

from pathlib import Path

import click

from depn_serve.artifacts.criteria import Criteria
from depn_serve.cli.options import existing_file, model_dir_option, ray_option, setting, settings_from
from depn_serve.core.console import console, progress
from depn_serve.evaluation.attacks import AttackSettings
from depn_serve.selection.fit import FitSettings


def attack_options(command):
    """The attack suite's and the criteria's main settings, shared by `isolate` and `verify`."""
    for option in reversed((
        setting(AttackSettings, "samples", "--attack-samples"),
        setting(AttackSettings, "beam_width"),
        setting(AttackSettings, "contexts"),
        setting(AttackSettings, "near_miss"),
        setting(Criteria, "max_rate"),
        setting(Criteria, "min_exposure_drop"),
        setting(Criteria, "min_keep_ratio"),
        setting(Criteria, "max_perplexity_increase"),
    )):
        command = option(command)
    return command


def _attack_settings(options: dict) -> tuple[AttackSettings, Criteria]:
    return settings_from(AttackSettings, options), settings_from(Criteria, options)


@click.command()
@model_dir_option(required=True)
@existing_file("--records", "records_path", required=True)
@existing_file("--keep-text", "keep_text_path", required=True,
               help="ordinary text every mask must leave alone, e-mails separated by blank lines (e.g. train.txt)")
@existing_file("--valid", "valid_path", required=True,
               help="held-out text: perplexity and the unrelated mails of the context attack (e.g. valid.txt)")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="directory for <tenant>.safetensors and isolation.json")
@click.option("--tenant", "tenants", multiple=True, help="only these tenants (repeat; default: every tenant)")
@click.option("--design", type=click.Choice(["fit", "union"]), default="fit", show_default=True,
              help="fit: one fit per tenant over every other tenant's records; union: one fit per owner, a tenant's "
                   "mask is the union of the other owners'")
@setting(FitSettings, "steps", "--fit-steps")
@setting(FitSettings, "rounds", "--fit-rounds")
@setting(FitSettings, "max_seconds", "--fit-max-seconds", type=float)
@setting(FitSettings, "batch_records")
@setting(FitSettings, "text_weight")
@setting(FitSettings, "secret_keep_weight")
@setting(FitSettings, "context", "--fit-context/--no-fit-context")
@attack_options
@click.option("--device", default="cpu", show_default=True)
@ray_option()
def isolate(model_dir: Path, records_path: Path, keep_text_path: Path, valid_path: Path, out_dir: Path,
            tenants: tuple[str, ...], design: str, device: str, ray_address: str | None, **options) -> None:
    """One isolation mask per tenant: it forgets every other tenant's records and keeps the tenant's own. Each
    is attacked and certified (`depn verify`) before it is written."""
    from depn_serve.core.cluster import runner
    from depn_serve.selection.isolation import isolate as run_isolation
    from depn_serve.selection.isolation import render_isolation

    fit = settings_from(FitSettings, options)
    attack, criteria = _attack_settings(options)
    with runner(ray_address, device) as jobs, progress("fitting") as bar:
        report = run_isolation(
            model_dir, records_path, keep_text_path, valid_path, out_dir, design, tenants, fit, attack, criteria,
            device, bar, on_tenant=lambda row: console.print(
                f"{row.tenant}: {row.neurons} neurons, {'passed' if row.passed else 'FAILED'}", markup=False),
            runner=jobs)
    console.print(render_isolation(report, str(out_dir)))
    per_tenant = report.seconds / len(report.tenants)
    console.print(f"{report.seconds:.0f} s in all, {per_tenant:.0f} s per tenant, fits {report.fit_seconds:.0f} s "
                  f"({report.fit_seconds / report.records:.2f} s per record)")
    if not report.passed:
        raise click.exceptions.Exit(1)


@click.command()
@click.argument("mask_path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@model_dir_option(required=True)
@existing_file("--records", "records_path", required=True)
@existing_file("--valid", "valid_path", required=True,
               help="held-out text: perplexity and the unrelated mails of the context attack")
@click.option("--forget", multiple=True, metavar="SELECTOR",
              help="records the mask must forget (default: the policy in the mask, else the tenant's own records)")
@click.option("--keep", multiple=True, metavar="SELECTOR", help="records it must keep (default: the rest)")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the certified mask here (default: replace MASK_PATH)")
@attack_options
@click.option("--device", default="cpu", show_default=True)
def verify(mask_path: Path, model_dir: Path, records_path: Path, valid_path: Path, forget: tuple[str, ...],
           keep: tuple[str, ...], out: Path | None, device: str, **options) -> None:
    """Attack MASK_PATH (any mask: fitted, voted, budgeted, hand-made) and write its verification certificate into
    its manifest. Exits 1 when the mask fails."""
    from depn_serve.artifacts.mask import NeuronMask
    from depn_serve.core.arch import load_model, mlp_shape
    from depn_serve.core.errors import DepnError
    from depn_serve.core.fileio import file_sha256
    from depn_serve.core.fingerprint import model_fingerprint
    from depn_serve.core.records import load_records, read_texts
    from depn_serve.core.selectors import MaskPolicy
    from depn_serve.evaluation.verify import verify_mask

    mask = NeuronMask.load(mask_path)
    if keep and not forget:
        raise DepnError("--keep needs --forget")
    policy = MaskPolicy(tenant=mask.manifest.tenant, forget=forget, keep=keep) if forget else None
    model, tokenizer = load_model(model_dir, device)
    mask.check_model(model_fingerprint(model_dir), mlp_shape(model.config), source=mask_path)
    attack, criteria = _attack_settings(options)
    with console.status("attacking the mask"):
        verification = verify_mask(model, tokenizer, mask, load_records(records_path), read_texts(valid_path),
                                   policy, attack, criteria, file_sha256(records_path), str(records_path))
    out = out or mask_path
    mask.certified(verification).save(out)
    console.print(verification.summary(), markup=False)
    console.print(f"certificate written into {out}")
    if not verification.passed:
        raise click.exceptions.Exit(1)


COMMANDS = [isolate, verify]
