"""`depn tenants`: the tenants file `depn serve --tenants` reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

if TYPE_CHECKING:
    from depn_serve.serving.server.tenants import TenantsConfig

_CONFIG = click.option("--config", "config_path", required=True, type=click.Path(path_type=Path, dir_okay=False))
_TENANT = click.option("--tenant", required=True)
T = TypeVar("T")


def _edit(config_path: Path, change: Callable[[TenantsConfig], T], create: bool = False) -> T:
    """Load the tenants file, apply `change`, write it back atomically (nothing is written if `change` fails)."""
    from depn_serve.serving.server.tenants import TenantsConfig

    config = TenantsConfig() if create and not config_path.exists() else TenantsConfig.load(config_path)
    result = change(config)
    config.save(config_path)
    return result


@click.group()
def tenants() -> None:
    """Tenants, their masks and API keys (the file `depn serve --tenants` reads)."""


@tenants.command("add")
@_CONFIG
@_TENANT
@click.option("--mask", "masks_", multiple=True, help="the tenant's mask id in the mask store (repeat for a union)")
@click.option("--allow-unmasked", is_flag=True, help="let this tenant run without any mask")
@click.option("--lora-adapter", "adapters", multiple=True,
              help="a LoRA adapter (its name in `--lora-modules`) this tenant may use (repeat)")
def add(config_path: Path, tenant: str, masks_: tuple[str, ...], allow_unmasked: bool,
        adapters: tuple[str, ...]) -> None:
    """Create a tenant and print its new API key once (only its hash is stored). Per-tenant `limits` and the
    server's `criteria` are set by editing the file (see the README)."""

    def add_one(config: TenantsConfig) -> str:
        from depn_serve.serving.server.tenants import TenantsError

        taken = {a: t.id for t in config.tenants for a in t.lora_adapters if a in adapters}
        if taken:
            raise TenantsError(f"LoRA adapters belong to one tenant each; taken already: {taken}")
        key = config.add_tenant(tenant, list(masks_), allow_unmasked)
        config.tenant(tenant).lora_adapters = list(adapters)
        return key

    key = _edit(config_path, add_one, create=True)
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
        adapters = f"\tLoRA: {', '.join(t.lora_adapters)}" if t.lora_adapters else ""
        click.echo(f"{t.id}{anonymous}\tmasks: {masks_desc}\tkeys: {keys}{adapters}")


@tenants.command("key")
@_CONFIG
@_TENANT
def key(config_path: Path, tenant: str) -> None:
    """Give a tenant one more API key and print it once (rotate: add, move clients, then `revoke` the old one)."""
    new = _edit(config_path, lambda config: config.new_key(tenant))
    click.echo(f"new API key for tenant {tenant!r} (shown only now):", err=True)
    click.echo(new)


@tenants.command("revoke")
@_CONFIG
@_TENANT
@click.option("--key-hint", help="the key's first characters, as `depn tenants list` shows them (default: every key)")
def revoke(config_path: Path, tenant: str, key_hint: str | None) -> None:
    """Revoke a tenant's API keys; a running server applies the file on its next request."""
    count = _edit(config_path, lambda config: config.revoke(tenant, key_hint))
    click.echo(f"revoked {count} key(s) of tenant {tenant!r} in {config_path}")


@tenants.command("remove")
@_CONFIG
@_TENANT
def remove(config_path: Path, tenant: str) -> None:
    """Remove a tenant and its keys (its masks stay in the server's store until dropped)."""
    _edit(config_path, lambda config: config.remove(tenant))
    click.echo(f"removed tenant {tenant!r} from {config_path}")


COMMANDS = [tenants]
