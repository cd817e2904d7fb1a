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


def _server_options(command):
    command = click.option("--server", required=True, help="base URL of depn serve, e.g. http://127.0.0.1:8000")(command)
    return existing_file("--admin-token-file", "token_file", required=True)(command)


def _client(server: str, token_file: Path):
    from depn_serve.serving.client import AdminClient

    return AdminClient(server, token_file)


@masks.command("push")
@_server_options
@click.option("--tenant", required=True)
@existing_file("--mask", "mask_path", required=True)
@click.option("--id", "mask_id", default=None, help="mask id in the store (default: the file name without suffix)")
def push(server: str, token_file: Path, tenant: str, mask_path: Path, mask_id: str | None) -> None:
    """Upload a mask; the server validates it, stores it and activates it for the tenant without a restart."""
    result = _client(server, token_file).push(tenant, mask_id or mask_path.stem, mask_path)
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
    table = Table(title=f"{listing.resident} of {listing.slots} mask slots resident")
    for column in ("tenant", "masks (id vN: neurons, verification)", "masked neurons", "resident", "unmasked allowed"):
        table.add_column(column)
    for t in listing.tenants:
        masks_desc = ", ".join(f"{m.id} v{m.version}: {m.neurons}, {m.verification}" for m in t.masks) or "-"
        if t.missing:
            masks_desc += f" (not pushed yet: {', '.join(t.missing)})"
        if t.problem:
            masks_desc += f" QUARANTINED: {t.problem}"
        table.add_row(t.tenant, masks_desc, str(t.masked_neurons), "yes" if t.resident else "no",
                      "yes" if t.allow_unmasked else "no")
    console.print(table)


@masks.command("drop")
@_server_options
@click.option("--tenant", required=True)
@click.option("--id", "mask_id", required=True)
def drop(server: str, token_file: Path, tenant: str, mask_id: str) -> None:
    """Stop using a mask for a tenant (deleted from the store once no tenant uses it)."""
    result = _client(server, token_file).drop(tenant, mask_id)
    state = "" if result.servable else "; it has no mask left and will get 403"
    click.echo(f"dropped {result.dropped} from {result.tenant} (masks now: {result.masks or 'none'}){state}")


COMMANDS = [masks]
