"""The server's view of tenants and masks: who may run, with which union of masks and version, and the admin
operations that change it. Version-agnostic; the engine is reached only through an `rpc(method, args)` coroutine
that runs a worker-extension method in every worker.

Every change and every bind decision is one transaction (`_transaction`): under this process's lock and the mask
store's (so other API server processes and replicas wait), with the tenants file and the store index as they are
now, and what other processes committed applied first; so no process ever binds a tenant list or a store older
than what the workers already hold. Within it: validate (the gate, `gate.py`), bind the new union in the workers,
write the store (the commit point: what a restart restores), then switch the server's own view. If the workers
refuse or the store cannot be written, the workers get the old union back and the store is untouched, so a
rejected or failed change leaves the active mask in place and a crash never activates a change that was not
acknowledged. A stored mask that fails its checks at start-up (changed on disk, for another model or another
tenant, no certificate that meets the server's criteria) quarantines only its tenant: refused with 503, counted,
and explained in the log and in `depn masks list`.

A fleet shares one store: `sync_store` (every second) applies what other servers or `depn masks push --store`
committed. A stored mask this server cannot apply leaves the tenant on its previous mask (or refused, if it had
none), reported in `depn masks list`, the admin health detail and `depn_tenants_behind_store`, and is retried;
after `max_behind_s` the tenant is refused (503) on this server rather than served a mask weaker than the store's.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import torch
from prometheus_client import CollectorRegistry

from depn_serve.artifacts.mask import MaskError, NeuronMask, pack_bits
from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.arch import MlpShape
from depn_serve.core.fileio import file_stamp
from depn_serve.core.fingerprint import ModelFingerprint
from depn_serve.serving.request import UNMASKED, mask_key
from depn_serve.serving.server.api import (DropResult, HealthDetail, ListedMask, MaskListing, PushResult,
                                           TenantListing)
from depn_serve.serving.server.errors import Refused
from depn_serve.serving.server.gate import Gate
from depn_serve.serving.server.limits import TenantLimiter
from depn_serve.serving.server.metrics import DepnMetrics
from depn_serve.serving.server.store import MaskStore, StoreError, parse_pushed
from depn_serve.serving.server.tenants import Tenant, TenantsConfig

logger = logging.getLogger("depn_serve.serving")
STORE_POLL_S = 1.0  # how often a server looks for changes other processes made to the mask store
MAX_BEHIND_S = 30.0  # how long a tenant may be served its previous masks when the store's cannot be applied

Rpc = Callable[[str, tuple], Awaitable[list]]
T = TypeVar("T")


@dataclass(frozen=True)
class MaskUnion:
    """What a tenant's requests run with: the union of its masks, under a version that changes with every change."""

    version: int
    mask_ids: tuple[str, ...]
    off: torch.Tensor | None  # union of the masks; None = no mask
    missing: tuple[str, ...] = ()  # listed but not pushed yet: the tenant is refused until they are
    problem: str | None = None  # a stored mask failed its checks: the tenant is quarantined (refused) until fixed
    source: tuple[tuple[str, str], ...] = ()  # (mask id, SHA-256 of its file) of each stored mask in the union

    @cached_property
    def digest(self) -> str:
        """The hash of the bits the tenant's requests run with (computed once per union): the prefix-cache salt, the
        same for the same mask in every process and replica."""
        if not self.masked:
            return UNMASKED
        return hashlib.sha256(pack_bits(self.off).tobytes()).hexdigest()[:32]

    @property
    def neurons(self) -> int:
        return 0 if self.off is None else int(self.off.sum())

    @property
    def masked(self) -> bool:
        """Whether the tenant's requests run with at least one neuron switched off."""
        return self.neurons > 0


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
        criteria: dict | None = None,
        max_behind_s: float = MAX_BEHIND_S,
        metrics_token: str | None = None,
    ):
        """`criteria`: the server's own criteria fields (command line), over the tenants file's `criteria`."""
        self.tenants_path = Path(tenants_path)
        self.store = store
        self._admin_digest = _digest(admin_token)
        self._metrics_digest = _digest(metrics_token) if metrics_token else None
        self.metrics = metrics
        self.limiter = TenantLimiter(metrics)
        self._criteria_options = dict(criteria or {})
        self.max_behind_s = max_behind_s
        self._tenants_stamp = file_stamp(self.tenants_path)
        self._index = TenantsConfig.load(self.tenants_path).index()
        self.gate = Gate(fingerprint, shape, self._criteria(self.tenants), allow_unverified)
        self._tenants_problem: str | None = None  # the file changed and could not be applied: requests are refused
        self._reloading = False
        self._tenants_digest = ""
        self._tenants_applied(self.tenants_path.read_bytes())
        self.unions: dict[str, MaskUnion] = {}
        self._version = 0
        self._lock = asyncio.Lock()
        self._rpc: Rpc | None = None
        self._planned: dict[str, MaskUnion] = {}
        self._status_lock = asyncio.Lock()
        self._status_at: float | None = None  # monotonic time of the last worker status
        self.behind: dict[str, str] = {}  # tenant -> why its stored masks could not be applied (it keeps the old)
        self._behind_since: dict[str, float] = {}  # tenant -> monotonic time it fell behind
        self.applied_generation = 0  # the store generation this server serves (see `sync_store`)
        self._follower: asyncio.Task | None = None

    @property
    def tenants(self) -> TenantsConfig:
        """The tenants file in force (the last version that applied)."""
        return self._index.config

    def _criteria(self, config: TenantsConfig) -> Criteria:
        """What a certificate must demand at least: the command line's fields over the file's, over the product's."""
        base = config.criteria or Criteria()
        return base.model_copy(update=self._criteria_options) if self._criteria_options else base

    # --- start-up -------------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load and check every stored mask the tenants use, before vLLM starts; a bad one quarantines its tenant."""
        self.store.migrate({t.id: t.masks for t in self.tenants.tenants})
        self._planned = {t.id: self._checked_union(t) for t in self.tenants.tenants}
        for tenant_id, union in self._planned.items():
            if union.missing:
                logger.warning("depn-serve: tenant %r is refused until masks %s are pushed", tenant_id, union.missing)

    def _checked_union(self, tenant: Tenant, ids: list[str] | None = None) -> MaskUnion:
        ids = self.mask_ids(tenant) if ids is None else ids
        try:
            return self._union(tenant.id, ids)
        except Refused as exc:
            logger.error("depn-serve: tenant %r is quarantined (refused until its masks are fixed): %s", tenant.id,
                         exc.message)
            self._version += 1
            return MaskUnion(self._version, tuple(ids), None, problem=exc.message, source=self._source(tenant.id, ids))

    async def start(self, rpc: Rpc) -> None:
        """Bind every tenant's masks in the workers (one engine call for all), before the server reports healthy:
        what `prepare` loaded, unless the tenants file or the store changed since (another API server process or
        replica may already have bound newer masks, which the workers must keep)."""
        self._rpc = rpc
        async with self._lock:
            await asyncio.to_thread(self.store.acquire)
            try:
                if file_stamp(self.tenants_path) != self._tenants_stamp:
                    self._planned = {}
                    await self._reload_tenants(bind=False)
                unions = {}
                for t in self.tenants.tenants:
                    planned, ids = self._planned.get(t.id), self.mask_ids(t)
                    fresh = planned is not None and list(planned.mask_ids) == ids and \
                        planned.source == self._source(t.id, ids)
                    unions[t.id] = planned if fresh else await asyncio.to_thread(self._checked_union, t)
                binds = [b for t in self.tenants.tenants if (b := self._binding(t, unions[t.id])) is not None]
                await self._rpc("depn_bind_many", (binds,))
                for tenant_id, union in unions.items():
                    self._commit(tenant_id, union)
                self._applied(self.store.index.generation)
            finally:
                self.store.release()
        self._planned = {}
        self._follower = asyncio.create_task(self._follow_store())
        logger.info("depn-serve: %d tenants bound, %d masks in the store", len(self.unions),
                    sum(len(m) for m in self.store.index.masks.values()))

    # --- requests ----------------------------------------------------------------------------------------------
    async def authenticate(self, key: str | None) -> Tenant:
        await self.refresh_tenants()
        if self._tenants_problem is not None:
            raise Refused(503, "the server's tenant configuration is being repaired; try again later")
        tenant = self._index.authenticate(key)
        if tenant is None:
            raise Refused(401, "missing API key" if not key else "unknown API key")
        return tenant

    def admit(self, tenant_id: str) -> int:
        """The mask version a new request of this tenant runs with, or 403 if it has no mask it may run with."""
        union = self.unions.get(tenant_id)
        tenant = self._index.find(tenant_id)  # not `tenants.tenant`: its error lists every tenant
        if tenant is None:
            raise Refused(403, f"tenant {tenant_id!r} is not configured")
        if union is not None and union.problem:
            raise Refused(503, f"tenant {tenant_id!r} cannot be served: one of its stored masks failed its checks "
                               "(the operator sees why in `depn masks list`)")
        if self._too_far_behind(tenant_id):
            raise Refused(503, f"tenant {tenant_id!r} cannot be served by this server now: it could not apply the "
                               "tenant's current masks (the operator sees why in `depn masks list`)")
        if union is not None and union.missing:
            raise Refused(403, f"tenant {tenant_id!r} uses masks {list(union.missing)} that are not pushed yet")
        if union is None or (not union.masked and not tenant.allow_unmasked):
            raise Refused(403, f"tenant {tenant_id!r} has no active mask and may not run unmasked")
        return union.version

    def _too_far_behind(self, tenant_id: str) -> bool:
        since = self._behind_since.get(tenant_id)
        return since is not None and time.monotonic() - since > self.max_behind_s

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(_digest(token), self._admin_digest)

    def may_scrape(self, token: str | None) -> bool:
        """The metrics token (where one is set) or the admin token: /metrics names tenants and masks."""
        metrics = self._metrics_digest is not None and bool(token) and \
            hmac.compare_digest(_digest(token), self._metrics_digest)
        return metrics or self.is_admin(token)

    # --- admin ---------------------------------------------------------------------------------------------------
    async def push(self, tenant_id: str, mask_id: str, data: bytes, cross_tenant: bool = False) -> PushResult:
        started = time.perf_counter()
        try:
            # Parsing a mask takes milliseconds to seconds: off the event loop, which serves tokens.
            mask = await asyncio.to_thread(_parse, mask_id, data)
            async with self._transaction():
                tenant = self._tenant(tenant_id)
                verification = _refused_as(400, self.gate.check, mask, tenant.id, f"pushed mask {mask_id!r}",
                                           cross_tenant)
                ids = self.mask_ids(tenant)
                ids = ids if mask_id in ids else [*ids, mask_id]
                union = self._union(tenant.id, ids, {mask_id: (mask, hashlib.sha256(data).hexdigest())})
                entry = await self._change(tenant, union, lambda: self.store.put(tenant.id, mask_id, data, mask,
                                                                                 tenant.masks, cross_tenant))
        except Refused as exc:
            self.metrics.pushes.labels("rejected" if exc.status < 500 else "failed").inc()
            raise
        self.metrics.pushes.labels("accepted").inc()
        self.metrics.push_latency.observe(time.perf_counter() - started)
        return PushResult(tenant=tenant.id, mask=mask_id, version=entry.version, neurons=entry.neurons,
                          tenant_neurons=self.unions[tenant.id].neurons, verification=verification)

    async def drop(self, tenant_id: str, mask_id: str) -> DropResult:
        async with self._transaction():
            tenant = self._tenant(tenant_id)
            ids = self.mask_ids(tenant)
            if mask_id not in ids:
                raise Refused(404, f"tenant {tenant.id!r} does not use mask {mask_id!r} (it uses {ids})")
            rest = [i for i in ids if i != mask_id]
            await self._change(tenant, self._union(tenant.id, rest),
                               lambda: self.store.remove(tenant.id, mask_id, tenant.masks))
        try:
            self.admit(tenant.id)
            servable = True
        except Refused:
            servable = False
        return DropResult(tenant=tenant.id, dropped=mask_id, masks=list(self.unions[tenant.id].mask_ids),
                          servable=servable)

    async def listing(self) -> MaskListing:
        await self.refresh_tenants()
        status = await self.worker_status()
        resident = set(status.get("resident", ()))
        tenants = []
        fields = {"version", "neurons", "built_for", "made_for", "cross_tenant", "verification", "criteria"}
        for tenant in self.tenants.tenants:
            union = self.unions.get(tenant.id)
            entries = [(i, self.store.index.entry(tenant.id, i)) for i in (union.mask_ids if union else ())]
            masks = [ListedMask(id=i, **e.model_dump(include=fields)) for i, e in entries if e is not None]
            tenants.append(TenantListing(
                tenant=tenant.id, masks=masks, mask_version=union.version if union else None,
                mask_sha256=union.digest if union else None,
                masked_neurons=union.neurons if union else 0, allow_unmasked=tenant.allow_unmasked,
                missing=list(union.missing) if union else [], problem=union.problem if union else None,
                resident=union is not None and union.masked and mask_key(tenant.id, union.digest) in resident,
                behind=self.behind.get(tenant.id), refused_behind=self._too_far_behind(tenant.id),
            ))
        return MaskListing(tenants=tenants, slots=status.get("slots"), resident=len(resident),
                           store_generation=self.applied_generation, criteria=self.gate.criteria)

    async def worker_status(self, max_age: float = 0.0) -> dict:
        """The workers' slot status, reused if fetched less than `max_age` seconds ago: concurrent callers share one
        engine call, so a flood of /metrics scrapes costs the engine at most one call per `max_age`."""
        async with self._status_lock:
            if self._status_at is not None and time.monotonic() - self._status_at <= max_age:
                return self.metrics.worker_status
            status = (await self._rpc("depn_status", ()))[0]
            self.metrics.worker_status, self._status_at = status, time.monotonic()
            self.metrics.tenant_digests = {t: u.digest for t, u in self.unions.items()}
            return status

    # --- a fleet: other processes change the store -------------------------------------------------------------
    async def _follow_store(self) -> None:
        while True:
            await asyncio.sleep(STORE_POLL_S)
            try:
                await self.sync_store()
            except Exception:  # the follower must outlive any one failure: it is retried on the next tick
                logger.exception("depn-serve: applying the mask store's changes failed; retrying")

    async def sync_store(self) -> None:
        """Bind every tenant whose stored masks differ from what it is served with (changed by another server or by
        `depn masks push --store`), after the tenants file if it changed. A tenant whose masks cannot be applied
        keeps its previous mask (or stays refused if it had none) and is retried on the next call."""
        unchanged = not self.store.changed() and file_stamp(self.tenants_path) == self._tenants_stamp
        if not (unchanged and not self.behind and self.applied_generation == self.store.index.generation):
            async with self._transaction():
                pass  # catching up is what every transaction does first
        self.metrics.refused_behind.set(sum(map(self._too_far_behind, self.behind)))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """This process's lock and the store's, with the tenants file and the store's changes applied first."""
        async with self._lock:
            await asyncio.to_thread(self.store.acquire)
            try:
                if file_stamp(self.tenants_path) != self._tenants_stamp:
                    await self._reload_tenants()
                await self._apply_store()
                yield
            finally:
                self.store.release()

    async def _apply_store(self) -> None:
        """Bind each tenant whose masks in the (just re-read) store differ from what it is served with."""
        generation = self.store.index.generation
        if generation == self.applied_generation and not self.behind:
            return
        for tenant in self.tenants.tenants:
            ids, current = self.mask_ids(tenant), self.unions.get(tenant.id)
            if tenant.id not in self.behind and current is not None and list(current.mask_ids) == ids \
                    and current.source == self._source(tenant.id, ids):
                continue
            try:
                union = await asyncio.to_thread(self._union, tenant.id, ids)
                await self._bind(tenant, union)
            except Exception as exc:
                self._fall_behind(tenant.id, current, exc.message if isinstance(exc, Refused) else str(exc))
                continue
            if self.behind.pop(tenant.id, None) is not None:
                self._behind_since.pop(tenant.id, None)
                logger.info("depn-serve: tenant %r caught up with the mask store", tenant.id)
            self._commit(tenant.id, union)
        self._applied(generation)

    def _applied(self, generation: int) -> None:
        self.applied_generation = generation
        self.metrics.store_generation.set(generation)
        self.metrics.behind.set(len(self.behind))

    def _fall_behind(self, tenant_id: str, current: MaskUnion | None, reason: str) -> None:
        """The tenant's stored masks cannot be applied: it keeps what it has, or is refused if it has nothing."""
        if self.behind.get(tenant_id) != reason:
            logger.error("depn-serve: tenant %r keeps its previous mask (retrying every second; refused after %g s): "
                         "its masks in the store cannot be applied: %s", tenant_id, self.max_behind_s, reason)
        self.behind[tenant_id] = reason
        self._behind_since.setdefault(tenant_id, time.monotonic())
        if current is None:
            self._version += 1
            self._commit(tenant_id, MaskUnion(self._version, (), None, problem=reason))

    def health_detail(self) -> HealthDetail:
        """Which tenants are not served as the store says (for the admin: `/health` itself says nothing of them)."""
        quarantined = {t: u.problem for t, u in self.unions.items() if u.problem and t not in self.behind}
        refused = sorted(t for t in self.behind if self._too_far_behind(t))
        return HealthDetail(status="degraded" if self.behind or quarantined else "ok",
                            store_generation=self.applied_generation, tenants_behind_store=dict(self.behind),
                            tenants_refused_behind=refused, tenants_quarantined=quarantined,
                            tenants_file_problem=self._tenants_problem)

    # --- internals -----------------------------------------------------------------------------------------------
    def mask_ids(self, tenant: Tenant) -> list[str]:
        """The store's run-time list replaces the tenants file's once a push or drop changed the tenant's masks."""
        return list(self.store.index.tenant_masks.get(tenant.id, tenant.masks))

    def _tenant(self, tenant_id: str) -> Tenant:
        if self._tenants_problem is not None:
            raise Refused(503, f"the tenants file {self.tenants_path} cannot be applied ({self._tenants_problem}); "
                               "fix it first")
        tenant = self._index.find(tenant_id)
        if tenant is None:
            raise Refused(404, f"no tenant {tenant_id!r} in {self.tenants_path}")
        return tenant

    # --- the tenants file, changed while serving ---------------------------------------------------------------------
    async def refresh_tenants(self) -> None:
        """Apply the tenants file if it changed since it was last read: parsed once per change, applied entirely
        (keys, tenants, `allow_unmasked`, `masks`, criteria, limits) or not at all. A file that cannot be applied
        refuses every tenant request (503) until it is fixed, so a revocation saved with a typo never leaves the
        revoked key working."""
        if file_stamp(self.tenants_path) == self._tenants_stamp or self._reloading:
            return  # requests arriving during a reload go on with the tenants in force until it is applied
        self._reloading = True
        try:
            async with self._transaction():
                pass  # the transaction applies the file first
        finally:
            self._reloading = False

    async def _reload_tenants(self, bind: bool = True) -> None:
        """Parse and apply the changed tenants file (under the transaction); `bind=False` before anything is bound."""
        self._tenants_stamp = file_stamp(self.tenants_path)
        try:
            data = await asyncio.to_thread(self.tenants_path.read_bytes)
            config = await asyncio.to_thread(TenantsConfig.parse, data, self.tenants_path)
            if bind:
                await self._apply_tenants(config)
            else:
                self._index, self.gate = config.index(), replace(self.gate, criteria=self._criteria(config))
        except Exception as exc:  # a broken file, or workers that refused the new masks: nothing applied
            self._tenants_problem = str(exc.message if isinstance(exc, Refused) else exc)
            self.metrics.tenants_file_ok.set(0)
            logger.error("depn-serve: the tenants file %s could not be applied (tenant requests get 503 until it is "
                         "fixed): %s", self.tenants_path, self._tenants_problem)
            return
        self._tenants_problem = None
        self._tenants_applied(data)

    def _tenants_applied(self, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()[:16]
        self.metrics.tenants_file_in_force(digest, self._tenants_digest)
        self._tenants_digest = digest
        self.metrics.tenants_file_ok.set(1)
        logger.info("depn-serve: tenants file %s (sha256 %s…) active: %d tenants", self.tenants_path, digest,
                    len(self.tenants.tenants))

    async def _apply_tenants(self, config: TenantsConfig) -> None:
        """Bind what changed for each tenant (new tenants, `allow_unmasked`, `masks`; every tenant when the criteria
        changed), then switch to `config`. A tenant whose `masks` changed in the file follows the file again,
        whatever was pushed or dropped since."""
        old, index = self._index, config.index()
        gate = replace(self.gate, criteria=self._criteria(config))
        edited = {t.id for t in config.tenants if (o := old.find(t.id)) is None or o.masks != t.masks}
        overrides = {t: ids for t, ids in self.store.index.tenant_masks.items() if t not in edited}
        plans: dict[str, tuple[Tenant, MaskUnion]] = {}
        previous_gate, self.gate = self.gate, gate  # the new criteria judge the new plans
        try:
            for tenant in config.tenants:
                ids, before = overrides.get(tenant.id, tenant.masks), old.find(tenant.id)
                union = self.unions.get(tenant.id)
                if before is None or union is None or before.allow_unmasked != tenant.allow_unmasked or \
                        list(union.mask_ids) != ids or gate != previous_gate:
                    plans[tenant.id] = (tenant, await asyncio.to_thread(self._checked_union, tenant, ids))
        except BaseException:
            self.gate = previous_gate
            raise
        bound: list[str] = []
        try:
            for tenant, union in plans.values():
                await self._bind(tenant, union)
                bound.append(tenant.id)
            if edited & set(self.store.index.tenant_masks):
                self.store.follow_file(sorted(edited))
        except Exception:
            self.gate = previous_gate
            for tenant_id in bound:
                if tenant_id in self.unions and old.find(tenant_id) is not None:
                    try:
                        await self._bind(old.find(tenant_id), self.unions[tenant_id])
                    except Exception as again:
                        logger.error("depn-serve: could not re-bind tenant %r: %s", tenant_id, again)
            raise
        self._index = index
        for tenant_id in set(self.unions) - set(index.by_id):
            del self.unions[tenant_id]  # removed: its keys no longer authenticate, admission refuses it
        for tenant_id, (_, union) in plans.items():
            self._commit(tenant_id, union)

    def _union(self, tenant_id: str, mask_ids: list[str],
               pushed: dict[str, tuple[NeuronMask, str]] | None = None) -> MaskUnion:
        """The union of the tenant's masks, each loaded from the store and checked (or the one being pushed, with
        its SHA-256)."""
        pushed = pushed or {}
        off = None
        missing = tuple(i for i in mask_ids if i not in pushed and self.store.index.entry(tenant_id, i) is None)
        source = dict(self._source(tenant_id, mask_ids))
        for mask_id in mask_ids:
            if mask_id in missing:
                continue
            if mask_id in pushed:
                mask, source[mask_id] = pushed[mask_id]
            else:
                mask = self._stored(tenant_id, mask_id)
            off = mask.off.clone() if off is None else off | mask.off
        self._version += 1
        return MaskUnion(self._version, tuple(mask_ids), off, missing, source=tuple(source.items()))

    def _source(self, tenant_id: str, mask_ids: list[str]) -> tuple[tuple[str, str], ...]:
        """What the store holds for these masks of the tenant: (mask id, SHA-256) of each stored one."""
        entries = ((i, self.store.index.entry(tenant_id, i)) for i in mask_ids)
        return tuple((i, e.sha256) for i, e in entries if e is not None)

    @staticmethod
    def _binding(tenant: Tenant, union: MaskUnion) -> tuple[str, str, bytes | None] | None:
        """What the workers hold for the tenant, or None when it is refused at admission (then requests already
        running finish with the mask they had). Keyed by the mask's content hash, not this process's version: with
        several API server processes each binds the same masks, and the same bits must not reload a slot."""
        if union.missing or union.problem or (not union.masked and not tenant.allow_unmasked):
            return None
        return tenant.id, union.digest, pack_bits(union.off).tobytes() if union.masked else None

    def _stored(self, tenant_id: str, mask_id: str) -> NeuronMask:
        """A stored mask, checked again (the file, the model, the tenant, the gate) before it is bound."""
        try:
            mask = self.store.load(tenant_id, mask_id)
        except StoreError as exc:
            raise Refused(409, str(exc)) from None
        entry = self.store.index.entry(tenant_id, mask_id)
        _refused_as(409, self.gate.check, mask, tenant_id, f"tenant {tenant_id!r} mask {mask_id!r}",
                    entry is not None and entry.cross_tenant)
        return mask

    async def _bind(self, tenant: Tenant, union: MaskUnion) -> None:
        binding = self._binding(tenant, union)
        if binding is not None:
            await self._rpc("depn_bind", binding)

    def _commit(self, tenant_id: str, union: MaskUnion) -> None:
        self.unions[tenant_id] = union
        self.metrics.masked_neurons.labels(self.metrics.tenant_label(tenant_id)).set(union.neurons)
        entries = [self.store.index.entry(t, i) for t, u in self.unions.items() for i in u.mask_ids]
        self.metrics.unverified.set(sum(e is not None and e.verification != "passed" for e in entries))
        self.metrics.quarantined.set(sum(u.problem is not None for u in self.unions.values()))

    async def _change(self, tenant: Tenant, union: MaskUnion, write: Callable[[], T]) -> T:
        """Bind the tenant's new union in the workers, then `write` the store (under the transaction's lock); if
        either fails, the workers get the old union back and nothing changed."""
        try:
            await self._bind(tenant, union)
            with _store_errors():
                written = await asyncio.to_thread(write)  # fsyncs: off the event loop, which serves tokens
        except Exception as exc:
            if tenant.id in self.unions:
                try:  # a worker that failed the new bind may still hold the old mask, the others must get it back
                    await self._bind(tenant, self.unions[tenant.id])
                except Exception as again:
                    logger.error("depn-serve: could not re-bind tenant %r after a failed change: %s", tenant.id, again)
            if isinstance(exc, Refused):
                raise
            raise Refused(500, f"the workers did not accept the mask ({exc}); nothing changed") from exc
        self._commit(tenant.id, union)
        self._applied(self.store.index.generation)  # caught up before the change, under the store's lock
        return written


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _parse(mask_id: str, data: bytes) -> NeuronMask:
    try:
        return parse_pushed(mask_id, data)
    except (MaskError, StoreError) as exc:
        raise Refused(400, str(exc)) from None


def _refused_as(status: int, check: Callable[..., T], *args) -> T:
    """`check(*args)`, a mask error turned into a refusal with `status`."""
    try:
        return check(*args)
    except (MaskError, StoreError) as exc:
        raise Refused(status, str(exc)) from None


@contextmanager
def _store_errors():
    """A store write that fails (disk full, I/O error) changed nothing: say so with a status, not a traceback."""
    try:
        yield
    except OSError as exc:
        status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else 500
        raise Refused(status, f"the mask store could not be written ({exc.strerror or exc}); nothing changed") from None


@dataclass(frozen=True)
class StateSpec:
    """What an API server process needs to build its `ServingState`: picklable, because with `--api-server-count N`
    each of vLLM's N spawned API server processes builds its own (they converge through the mask store)."""

    tenants: Path
    mask_store: Path
    fingerprint: ModelFingerprint
    shape: MlpShape
    admin_token: str
    metrics_max_tenants: int
    allow_unverified: bool
    criteria: dict = field(default_factory=dict)  # criteria fields set on the command line
    max_behind_s: float = MAX_BEHIND_S
    metrics_token: str | None = None

    def build(self, registry: CollectorRegistry, multiprocess: bool = False) -> ServingState:
        """The state with every stored mask loaded and checked (a bad one quarantines its tenant; the others serve)."""
        state = ServingState(
            tenants_path=self.tenants, store=MaskStore(self.mask_store), fingerprint=self.fingerprint,
            shape=self.shape, admin_token=self.admin_token,
            metrics=DepnMetrics(registry, self.metrics_max_tenants, multiprocess=multiprocess),
            allow_unverified=self.allow_unverified, criteria=self.criteria, max_behind_s=self.max_behind_s,
            metrics_token=self.metrics_token,
        )
        state.prepare()
        return state
