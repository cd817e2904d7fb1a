"""A fleet: servers sharing one mask store. Changes written straight into the store (no server in the path; every
server sharing it applies them within a second), and whether the servers converged on the same masks."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from depn_serve.serving.server.api import MaskListing
from depn_serve.serving.server.store import MaskStore, StoredMask, StoreError, parse_pushed
from depn_serve.serving.server.tenants import TenantsConfig


def push_to_store(store: Path, tenants: Path, tenant: str, mask_id: str, data: bytes,
                  cross_tenant: bool = False) -> tuple[StoredMask, int]:
    """Store a mask for a tenant of the tenants file; (its entry, the store's new generation). A mask made for
    another tenant is refused unless `cross_tenant` (recorded with it). The servers check it against their model
    and certificate gate when they apply it, and keep the previous mask if it fails."""
    found = _tenant(TenantsConfig.load(tenants), tenant, tenants)
    mask = parse_pushed(mask_id, data)
    made_for = mask.manifest.made_for
    if made_for not in (None, found.id) and not cross_tenant:
        raise StoreError(f"mask {mask_id!r} is made for tenant {made_for!r}, not {found.id!r}: refused (to serve "
                         f"{found.id!r} a mask made for another tenant, push it with --cross-tenant)")
    masks = MaskStore(store)
    entry = masks.put(found.id, mask_id, data, mask, found.masks, cross_tenant)
    return entry, masks.index.generation


def drop_from_store(store: Path, tenants: Path, tenant: str, mask_id: str) -> tuple[list[str], int]:
    """Stop using a tenant's mask; (its masks now, the store's new generation)."""
    found = _tenant(TenantsConfig.load(tenants), tenant, tenants)
    masks = MaskStore(store)
    if masks.index.entry(tenant, mask_id) is None:
        raise StoreError(f"tenant {tenant!r} has no mask {mask_id!r} in the mask store {store}")
    masks.remove(tenant, mask_id, found.masks)
    return masks.index.tenant_masks[tenant], masks.index.generation


def _tenant(config: TenantsConfig, tenant: str, path: Path):
    found = config.index().find(tenant)
    if found is None:
        raise StoreError(f"{path}: no tenant {tenant!r}")
    return found


class FleetStatus(BaseModel):
    servers: list[str]
    generations: list[int]  # the store generation each server applied
    masks: dict[str, list[str]]  # tenant -> what each server serves it with ("id vN, ..." or "behind: why")
    converged: bool


def fleet_status(listings: dict[str, MaskListing]) -> FleetStatus:
    """Converged: every server applied the same store generation, none is behind on any tenant, and each tenant's
    masks (ids and versions) are the same on every server."""
    servers = list(listings)
    masks: dict[str, list[str]] = {}
    for position, listing in enumerate(listings.values()):
        for t in listing.tenants:
            shown = f"behind: {t.behind}" if t.behind else ", ".join(f"{m.id} v{m.version}" for m in t.masks) or "-"
            masks.setdefault(t.tenant, ["(not configured)"] * len(servers))[position] = shown
    generations = [listing.store_generation for listing in listings.values()]
    converged = len(set(generations)) == 1 and all(len(set(row)) == 1 and not row[0].startswith(("behind", "("))
                                                   for row in masks.values())
    return FleetStatus(servers=servers, generations=generations, masks=masks, converged=converged)
