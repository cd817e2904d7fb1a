"""`depn masks`: inspect a mask file; push, list and drop masks on a running server."""

from __future__ import annotations

import json
from pathlib import Path

import click

from depn_serve.cli.options import existing_file
from depn_serve.core.console import console


@click.group()
def masks() -> None:
    """Inspect mask files; push, list and drop them on a running `depn serve`."""


@masks.command("inspect")
@click.argument("mask_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="manifest plus neuron indices per layer")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None, help="write a PNG")
def inspect(mask_path: Path, as_json: bool, plot: Path | None) -> None:
    """Summary and per-layer histogram of a mask."""
    from depn_serve.artifacts.mask import NeuronMask

    mask = NeuronMask.load(mask_path)
    m = mask.manifest
    if as_json:
        doc = json.loads(m.model_dump_json())
        doc["neurons"] = {str(layer): idx for layer, idx in mask.neurons().items()}
        click.echo(json.dumps(doc, indent=2))
    else:
        console.print(f"[bold]{mask_path}[/]  tenant [bold]{m.tenant}[/]  {m.architecture}  "
                      f"{m.num_layers} layers x {m.intermediate_size}  fingerprint {m.model_fingerprint.short}")
        share = 100 * m.neuron_count / (m.num_layers * m.intermediate_size)
        console.print(f"{m.neuron_count} neurons masked ({share:.2f} %), method {m.provenance.method}, "
                      f"{m.provenance.records} records, created {m.provenance.created_at:%Y-%m-%d %H:%M} UTC")
        if m.provenance.policy is not None:
            console.print(f"policy {m.provenance.policy.describe()}")
        console.print(f"made for tenant {m.made_for}" if m.made_for else "made for any tenant", markup=False)
        console.print(m.verification.summary() if m.verification else "not verified (run `depn verify`)",
                      markup=False)
        peak = max(m.neurons_per_layer) or 1
        for layer, count in enumerate(m.neurons_per_layer):
            console.print(f"  layer {layer:>3} {count:>6}  {'█' * round(40 * count / peak)}")
    if plot:
        from depn_serve.evaluation.figures import plot_mask_layers

        plot_mask_layers(mask, plot)
        if not as_json:
            console.print(f"plot -> {plot}")


SERVER_HELP = "base URL of depn serve, e.g. http://127.0.0.1:8000"


def _server_options(command):
    command = click.option("--server", required=True, help=SERVER_HELP)(command)
    return existing_file("--admin-token-file", "token_file", required=True)(command)


def _target_options(command):
    """Where a change goes: one server (`--server`, `--admin-token-file`), or the mask store a fleet shares
    (`--store`, `--tenants`), which every server sharing it applies within a second."""
    command = click.option("--server", help=SERVER_HELP)(command)
    command = existing_file("--admin-token-file", "token_file")(command)
    command = click.option("--store", type=click.Path(path_type=Path, exists=True, file_okay=False),
                           help="write into this mask store directly (the servers sharing it apply it)")(command)
    return existing_file("--tenants", "tenants_path", help="the fleet's tenants file (with --store)")(command)


def _check_target(server: str | None, token_file: Path | None, store: Path | None, tenants_path: Path | None) -> None:
    if (server is None) == (store is None):
        raise click.UsageError("give --server (with --admin-token-file) or --store (with --tenants)")
    if server is not None and token_file is None:
        raise click.UsageError("--server needs --admin-token-file")
    if store is not None and tenants_path is None:
        raise click.UsageError("--store needs --tenants (the tenants file the fleet serves)")


def _client(server: str, token_file: Path):
    from depn_serve.serving.client import AdminClient

    return AdminClient(server, token_file)


@masks.command("push")
@_target_options
@click.option("--tenant", required=True)
@existing_file("--mask", "mask_path", required=True)
@click.option("--id", "mask_id", default=None, help="mask id in the store (default: the file name without suffix)")
@click.option("--cross-tenant", is_flag=True,
              help="serve TENANT a mask made for another tenant (refused without it; recorded, and shown by `depn "
                   "masks list`)")
def push(server: str | None, token_file: Path | None, store: Path | None, tenants_path: Path | None, tenant: str,
         mask_path: Path, mask_id: str | None, cross_tenant: bool) -> None:
    """Upload a mask; the server validates it, stores it and activates it for the tenant without a restart. With
    --store, the servers sharing the store check and activate it within a second (`depn masks status` shows it).
    A mask made for another tenant (another tenant's isolation mask) is refused unless --cross-tenant."""
    _check_target(server, token_file, store, tenants_path)
    mask_id = mask_id or mask_path.stem
    if store is not None:
        from depn_serve.serving.server.fleet import push_to_store

        entry, generation = push_to_store(store, tenants_path, tenant, mask_id, mask_path.read_bytes(), cross_tenant)
        click.echo(f"stored {mask_id} v{entry.version} ({entry.neurons} neurons) for {tenant} in {store} "
                   f"(generation {generation}); the servers sharing it apply it within a second")
        return
    result = _client(server, token_file).push(tenant, mask_id, mask_path, cross_tenant)
    click.echo(f"pushed {result.mask} v{result.version} ({result.neurons} neurons) to {result.tenant}; "
               f"tenant now masks {result.tenant_neurons} neurons")
    click.echo(result.verification)


@masks.command("list")
@_server_options
@click.option("--json", "as_json", is_flag=True)
def list_(server: str, token_file: Path, as_json: bool) -> None:
    """Tenants, their mask ids, versions, neuron counts and whether each is resident in a slot."""
    from rich.table import Table

    listing = _client(server, token_file).list()
    if as_json:
        click.echo(listing.model_dump_json(indent=2))
        return
    table = Table(title=f"{listing.resident} of {listing.slots} mask slots resident; store generation "
                        f"{listing.store_generation}")
    for column in ("tenant", "masks (id vN: neurons, verification, made for)", "masked neurons", "resident",
                   "unmasked allowed"):
        table.add_column(column)
    for t in listing.tenants:
        masks_desc = ", ".join(f"{m.id} v{m.version}: {m.neurons}, {m.verification}, {_made_for(m)}"
                               for m in t.masks) or "-"
        if t.missing:
            masks_desc += f" (not pushed yet: {', '.join(t.missing)})"
        if t.problem:
            masks_desc += f" QUARANTINED: {t.problem}"
        if t.behind:
            state = "REFUSED, " if t.refused_behind else "serving its previous masks, "
            masks_desc += f" BEHIND THE STORE ({state}retrying): {t.behind}"
        table.add_row(t.tenant, masks_desc, str(t.masked_neurons), "yes" if t.resident else "no",
                      "yes" if t.allow_unmasked else "no")
    console.print(table)
    judged = {_criteria(m.criteria) for t in listing.tenants for m in t.masks if m.criteria is not None}
    console.print(f"this server requires certificates with {_criteria(listing.criteria)}", markup=False)
    for criteria in sorted(judged - {_criteria(listing.criteria)}):
        console.print(f"  some masks were certified with {criteria}", markup=False)


def _made_for(mask) -> str:
    if mask.made_for is None:
        return "any tenant"
    return f"{mask.made_for} (CROSS-TENANT, by the operator's choice)" if mask.cross_tenant else mask.made_for


def _criteria(criteria) -> str:
    return (f"max rate {criteria.max_rate:g}, exposure drop >= {criteria.min_exposure_drop:g}, keep ratio >= "
            f"{criteria.min_keep_ratio:g}, perplexity increase <= {criteria.max_perplexity_increase:g}, no leak "
            f"under {', '.join(criteria.zero)}")


@masks.command("drop")
@_target_options
@click.option("--tenant", required=True)
@click.option("--id", "mask_id", required=True)
def drop(server: str | None, token_file: Path | None, store: Path | None, tenants_path: Path | None, tenant: str,
         mask_id: str) -> None:
    """Stop using a mask for a tenant (deleted from the store once no tenant uses it)."""
    _check_target(server, token_file, store, tenants_path)
    if store is not None:
        from depn_serve.serving.server.fleet import drop_from_store

        left, generation = drop_from_store(store, tenants_path, tenant, mask_id)
        click.echo(f"dropped {mask_id} from {tenant} in {store} (masks now: {left or 'none'}; generation "
                   f"{generation}){'' if left else '; it has no mask left and will get 403'}")
        return
    result = _client(server, token_file).drop(tenant, mask_id)
    state = "" if result.servable else "; it has no mask left and will get 403"
    click.echo(f"dropped {result.dropped} from {result.tenant} (masks now: {result.masks or 'none'}){state}")


@masks.command("status")
@click.option("--server", "servers", multiple=True, required=True, help="a server of the fleet (repeat for each)")
@existing_file("--admin-token-file", "token_file", required=True)
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, help="seconds to wait for the servers to converge")
@click.option("--json", "as_json", is_flag=True)
def status(servers: tuple[str, ...], token_file: Path, wait: float, as_json: bool) -> None:
    """What each server serves every tenant with, and whether the fleet converged (exit 1 if it did not)."""
    import time

    from rich.table import Table

    from depn_serve.serving.server.fleet import fleet_status

    deadline = time.monotonic() + wait
    while True:
        report = fleet_status({s: _client(s, token_file).list() for s in servers})
        if report.converged or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        table = Table(title="converged" if report.converged else "NOT converged")
        table.add_column("tenant")
        for server, generation in zip(report.servers, report.generations):
            table.add_column(f"{server} (generation {generation})")
        for tenant, row in report.masks.items():
            table.add_row(tenant, *row)
        console.print(table)
    if not report.converged:
        raise SystemExit(1)


COMMANDS = [masks]
