"""The server's view of tenants and masks: who may run, with which union of masks and version, and the admin
operations that change it. Version-agnostic; the engine is reached only through an `rpc(method, args)` coroutine that runs a
worker-extension method in every worker.

Order of every change: validate, write the store atomically, bind in the workers, then switch the server's own
view. If binding in a worker fails the store is rolled back, so a rejected or failed change leaves the active mask in place.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from depn_serve.artifacts.mask import MaskError, NeuronMask, pack_bits
from depn_serve.core.arch import MlpShape
from depn_serve.core.fingerprint import ModelFingerprint
from depn_serve.serving.server.api import DropResult, ListedMask, MaskListing, PushResult, TenantListing
from depn_serve.serving.server.metrics import DepnMetrics
from depn_serve.serving.server.store import Checkpoint, MaskStore, StoreError
from depn_serve.serving.server.tenants import Tenant, TenantsConfig, TenantsError

logger = logging.getLogger("depn_serve.serving")

Rpc = Callable[[str, tuple], Awaitable[list]]


class Refused(Exception):
    """A request or admin call refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class MaskUnion:
    """What a tenant's requests run with: the union of its masks, under a version that changes with every change."""

    version: int
    mask_ids: tuple[str, ...]
    off: torch.Tensor | None  # union of the masks; None = no mask
    missing: tuple[str, ...] = ()  # listed but not pushed yet: the tenant is refused until they are

    @property
    def neurons(self) -> int:
        return 0 if self.off is None else int(self.off.sum())


class ServingState:
    def __init__(
        self,
        tenants_path: Path,
        store: MaskStore,
        fingerprint: ModelFingerprint,
        shape: MlpShape,
        admin_token: str,
        metrics: DepnMetrics,
        allow_unverified: bool = False,
    ):
        self.tenants_path = Path(tenants_path)
        self.store = store
        self.fingerprint = fingerprint
        self.shape = shape
        self._admin_digest = hashlib.sha256(admin_token.encode()).digest()
        self.metrics = metrics
        self.allow_unverified = allow_unverified
        self.tenants = TenantsConfig.load(self.tenants_path)
        self._tenants_mtime = self.tenants_path.stat().st_mtime_ns
        self.unions: dict[str, MaskUnion] = {}
        self._version = 0
        self._lock = asyncio.Lock()
        self._rpc: Rpc | None = None
        self._planned: dict[str, MaskUnion] = {}

    # --- start-up -------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load and check every stored mask the tenants use, before vLLM starts (a bad mask stops start-up)."""
        self._planned = {t.id: self._union(self.mask_ids(t)) for t in self.tenants.tenants}
        for tenant_id, union in self._planned.items():
            if union.missing:
                logger.warning("depn-serve: tenant %r is refused until masks %s are pushed", tenant_id, union.missing)

    async def start(self, rpc: Rpc) -> None:
        """Bind every tenant's masks in the workers, before the server reports healthy."""
        self._rpc = rpc
        for tenant in self.tenants.tenants:
            union = self._planned.get(tenant.id) or self._union(self.mask_ids(tenant))
            await self._bind(tenant, union)
            self._commit(tenant.id, union)
        logger.info("depn-serve: %d tenants bound, %d masks in the store", len(self.unions), len(self.store.index.masks))

    # --- requests ----------------------------------------------------------------------------------------------
    def authenticate(self, key: str | None) -> Tenant:
        self._reload_tenants()
        tenant = self.tenants.authenticate(key)
        if tenant is None:
            raise Refused(401, "missing API key" if not key else "unknown API key")
        return tenant

    def admit(self, tenant_id: str) -> int:
        """The mask version a new request of this tenant runs with, or 403 if it has no mask it may run with."""
        union = self.unions.get(tenant_id)
        tenant = self._tenant(tenant_id)
        if union is not None and union.missing:
            raise Refused(403, f"tenant {tenant_id!r} uses masks {list(union.missing)} that are not pushed yet")
        if union is None or (union.off is None and not tenant.allow_unmasked):
            raise Refused(403, f"tenant {tenant_id!r} has no active mask and may not run unmasked")
        return union.version

    def is_admin(self, token: str | None) -> bool:
        digest = hashlib.sha256((token or "").encode()).digest()
        return bool(token) and hmac.compare_digest(digest, self._admin_digest)

    # --- admin ---------------------------------------------------------------------------------------------------
    async def push(self, tenant_id: str, mask_id: str, data: bytes) -> PushResult:
        started = time.perf_counter()
        try:
            tenant = self._tenant(tenant_id)
            try:
                self.store.path(mask_id)  # validates the id
                mask = NeuronMask.from_bytes(data, source=f"pushed mask {mask_id!r}")
                mask.check_model(self.fingerprint, self.shape, source=f"pushed mask {mask_id!r}")
                verification = self.gate(mask, f"pushed mask {mask_id!r}")
            except (MaskError, StoreError) as exc:
                raise Refused(400, str(exc)) from None
            async with self._lock:
                checkpoint = self.store.checkpoint(mask_id)
                entry = self.store.put(mask_id, data, mask)
                if mask_id not in self.mask_ids(tenant):
                    self.store.set_tenant_masks(tenant.id, [*self.mask_ids(tenant), mask_id])
                affected = [t for t in self.tenants.tenants if mask_id in self.mask_ids(t)]
                await self._apply(affected, checkpoint)
        except Refused as exc:
            self.metrics.pushes.labels("rejected" if exc.status < 500 else "failed").inc()
            raise
        self.metrics.pushes.labels("accepted").inc()
        self.metrics.push_latency.observe(time.perf_counter() - started)
        return PushResult(tenant=tenant.id, mask=mask_id, version=entry.version, neurons=entry.neurons,
                          tenant_neurons=self.unions[tenant.id].neurons, verification=verification)

    async def drop(self, tenant_id: str, mask_id: str) -> DropResult:
        tenant = self._tenant(tenant_id)
        async with self._lock:
            ids = self.mask_ids(tenant)
            if mask_id not in ids:
                raise Refused(404, f"tenant {tenant.id!r} does not use mask {mask_id!r} (it uses {ids})")
            checkpoint = self.store.checkpoint(mask_id)
            self.store.set_tenant_masks(tenant.id, [i for i in ids if i != mask_id])
            if not any(mask_id in self.mask_ids(t) for t in self.tenants.tenants):
                self.store.remove(mask_id)
            await self._apply([tenant], checkpoint)
        try:
            self.admit(tenant.id)
            servable = True
        except Refused:
            servable = False
        return DropResult(tenant=tenant.id, dropped=mask_id, masks=list(self.unions[tenant.id].mask_ids),
                          servable=servable)

    async def listing(self) -> MaskListing:
        status = await self.worker_status()
        resident = status.get("resident", {})
        tenants = []
        for tenant in self.tenants.tenants:
            union = self.unions.get(tenant.id)
            fields = {"version", "neurons", "built_for", "verification"}
            masks = [ListedMask(id=i, **self.store.index.masks[i].model_dump(include=fields))
                     for i in (union.mask_ids if union else ()) if i in self.store.index.masks]
            tenants.append(TenantListing(
                tenant=tenant.id, masks=masks, mask_version=union.version if union else None,
                masked_neurons=union.neurons if union else 0, allow_unmasked=tenant.allow_unmasked,
                missing=list(union.missing) if union else [],
                resident=resident.get(tenant.id) == (union.version if union else None),
            ))
        return MaskListing(tenants=tenants, slots=status.get("slots"), resident=len(resident))

    async def worker_status(self) -> dict:
        status = (await self._rpc("depn_status", ()))[0]
        self.metrics.worker_status = status
        return status

    def gate(self, mask: NeuronMask, source: str) -> str:
        """Refuse a mask without a passing certificate (its model is checked already: a certificate names the
        manifest's fingerprint or fails to load), unless the operator opted out; returns what to tell the pusher."""
        v = mask.manifest.verification
        if v is not None and v.passed:
            return v.summary()
        found = "no certificate" if v is None else f"a failed certificate ({'; '.join(v.failures)})"
        if not self.allow_unverified:
            raise MaskError(source, "verification", "a passing certificate (run `depn verify`, or start depn serve "
                            "with --allow-unverified)", found)
        logger.warning("depn-serve: %s has %s; served anyway (--allow-unverified)", source, found)
        return f"UNVERIFIED ({found}); served because of --allow-unverified"

    # --- internals -----------------------------------------------------------------------------------------------
    def mask_ids(self, tenant: Tenant) -> list[str]:
        """The store's run-time list replaces the tenants file's once a push or drop changed the tenant's masks."""
        return list(self.store.index.tenant_masks.get(tenant.id, tenant.masks))

    def _tenant(self, tenant_id: str) -> Tenant:
        self._reload_tenants()
        try:
            return self.tenants.tenant(tenant_id)
        except TenantsError as exc:
            raise Refused(404, str(exc)) from None

    def _reload_tenants(self) -> None:
        """Pick up keys and tenants added with `depn tenants add` while the server runs (a bad file is ignored)."""
        try:
            mtime = self.tenants_path.stat().st_mtime_ns
            if mtime == self._tenants_mtime:
                return
            self.tenants = TenantsConfig.load(self.tenants_path)
            self._tenants_mtime = mtime
        except (OSError, TenantsError) as exc:
            logger.error("depn-serve: keeping the previous tenants, the file could not be reloaded: %s", exc)

    def _union(self, mask_ids: list[str]) -> MaskUnion:
        off = None
        missing = tuple(i for i in mask_ids if i not in self.store.index.masks)
        for mask_id in mask_ids:
            if mask_id in missing:
                continue
            try:
                mask = self.store.load(mask_id)
                mask.check_model(self.fingerprint, self.shape, source=self.store.path(mask_id))
                self.gate(mask, str(self.store.path(mask_id)))
            except (MaskError, StoreError) as exc:
                raise Refused(409, str(exc)) from None
            off = mask.off.clone() if off is None else off | mask.off
        self._version += 1
        return MaskUnion(self._version, tuple(mask_ids), off, missing)

    async def _bind(self, tenant: Tenant, union: MaskUnion) -> None:
        if union.missing or (union.off is None and not tenant.allow_unmasked):
            return  # refused at admission; requests already running finish with the mask they had
        packed = None if union.off is None else pack_bits(union.off).tobytes()
        await self._rpc("depn_bind", (tenant.id, union.version, packed))

    def _commit(self, tenant_id: str, union: MaskUnion) -> None:
        self.unions[tenant_id] = union
        self.metrics.masked_neurons.labels(self.metrics.tenant_label(tenant_id)).set(union.neurons)
        in_use = {i for u in self.unions.values() for i in u.mask_ids if i in self.store.index.masks}
        self.metrics.unverified.set(sum(self.store.index.masks[i].verification != "passed" for i in in_use))

    async def _apply(self, tenants: list[Tenant], checkpoint: Checkpoint) -> None:
        """Bind the tenants' new unions in the workers; on any failure put the store and the workers back."""
        new = {}
        try:
            for tenant in tenants:
                new[tenant.id] = self._union(self.mask_ids(tenant))
            for tenant in tenants:
                await self._bind(tenant, new[tenant.id])
        except Exception as exc:
            self.store.restore(checkpoint)
            for tenant in tenants:
                if tenant.id in self.unions:
                    try:  # best effort: a worker that failed the new bind may still hold the old mask
                        await self._bind(tenant, self.unions[tenant.id])
                    except Exception as again:
                        logger.error("depn-serve: could not re-bind tenant %r after a failed change: %s", tenant.id,
                                     again)
            if isinstance(exc, Refused):
                raise
            raise Refused(500, f"the workers did not accept the mask ({exc}); nothing changed") from exc
        for tenant_id, union in new.items():
            self._commit(tenant_id, union)
