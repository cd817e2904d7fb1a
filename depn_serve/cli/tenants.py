"""`depn tenants`: the tenants file `depn serve --tenants` reads."""

from __future__ import annotations

from pathlib import Path

import click

_CONFIG = click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False))


@click.group()
def tenants() -> None:
    """Tenants, their masks and API keys (the file `depn serve --tenants` reads)."""


@tenants.command("add")
@_CONFIG
@click.option("--tenant", required=True)
@click.option("--mask", "masks_", multiple=True, help="mask id in the mask store (repeat for a union)")
@click.option("--allow-unmasked", is_flag=True, help="let this tenant run without any mask")
def add(config_path: Path, tenant: str, masks_: tuple[str, ...], allow_unmasked: bool) -> None:
    """Create a tenant and print its new API key once (only its hash is stored)."""
    from depn_serve.serving.server.tenants import TenantsConfig

    config = TenantsConfig.load(config_path) if config_path.exists() else TenantsConfig()
    key = config.add_tenant(tenant, list(masks_), allow_unmasked)
    config.save(config_path)
    click.echo(f"tenant {tenant!r} added to {config_path}; its API key (shown only now):", err=True)
    click.echo(key)


@tenants.command("list")
@_CONFIG
def list_(config_path: Path) -> None:
    """Tenants with their masks and key hints."""
    from depn_serve.serving.server.tenants import TenantsConfig

    config = TenantsConfig.load(config_path)
    for t in config.tenants:
        anonymous = "  (anonymous)" if t.id == config.anonymous_tenant else ""
        masks_desc = ", ".join(t.masks) or ("none (may run unmasked)" if t.allow_unmasked else "none (refused)")
        keys = ", ".join(f"{k.hint}…" for k in t.api_keys) or "no keys"
        click.echo(f"{t.id}{anonymous}\tmasks: {masks_desc}\tkeys: {keys}")


COMMANDS = [tenants]
