"""The server's mask store: a directory of mask files plus an index, so masks survive restarts and crashes.

Layout: `<tenant>/<mask_id>.v<version>.safetensors` (the pushed file, byte for byte; mask ids are per tenant) and
`_index.json` (pydantic `StoreIndex`): each tenant's masks with their version (bumped on every push), SHA-256,
neuron count, whom the mask is made for and whether the operator opted in to serving it to another tenant, and the
tenants whose mask list was changed at run time (`tenant_masks`, which then replaces that tenant's `masks` from the
tenants file). The store's own files (`_index.json`, `.lock`) begin with characters no tenant id may begin with,
so no tenant's directory can take their place.

Several processes may share a store (the servers of a fleet on one volume, `depn masks push --store`): every change
takes the store's lock (`flock` on `.lock`), re-reads the index under it and bumps its `generation`, so no change
overwrites another's; servers notice a changed index by its stamp and apply it (`ServingState.sync_store`). A
server holds the lock across a whole change (`acquire` / `release`: re-read, bind in its workers, write), so each
decision is made from the index as it is.

Crash consistency: a mask file is never rewritten in place. A change writes the new version's file (atomically),
then the index (atomically: the commit point, which the server reaches only once the workers took the change),
then deletes the files the index no longer names. A crash at any point leaves the old index with its files, or the
new index with its files; files no index names (and temporary files) are swept when the store is opened. Loading
checks each file against the index's SHA-256. Stores of earlier formats (`index.json`) are moved to this one when
opened (format 2) or when `depn serve` starts (format 1, which needs the tenants file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from depn_serve.artifacts.mask import MaskError, NeuronMask
from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.errors import DepnError, one_line
from depn_serve.core.fileio import atomic_write_bytes, atomic_write_text, file_stamp
from depn_serve.serving.server.tenants import ID_PATTERN, is_reserved

INDEX_NAME = "_index.json"
LEGACY_INDEX_NAME = "index.json"  # formats 1 and 2, where a tenant named "index.json" could take the index's place
LOCK_NAME = ".lock"
FORMAT_VERSION = 3
SUFFIX = ".safetensors"

logger = logging.getLogger("depn_serve.serving")


class StoreError(DepnError):
    pass


def verdict(mask: NeuronMask) -> str:
    """'passed', 'failed' or 'none': what the mask's certificate says."""
    v = mask.manifest.verification
    return "none" if v is None else "passed" if v.passed else "failed"


def check_id(kind: str, value: str) -> str:
    if not re.fullmatch(ID_PATTERN, value):
        raise StoreError(f"{kind} {value!r}: expected letters, digits, '.', '_' or '-' (at most 64)")
    return value


def check_tenant_id(value: str) -> str:
    check_id("tenant", value)
    if is_reserved(value):
        raise StoreError(f"tenant {value!r}: a reserved name (the mask store's own files once had it)")
    return value


def parse_pushed(mask_id: str, data: bytes) -> NeuronMask:
    """A pushed mask, checked for what holds whatever the model: its id, its file, at least one neuron switched off
    (a tenant that may run with nothing masked is one with `allow_unmasked`)."""
    source = f"pushed mask {mask_id!r}"
    check_id("mask id", mask_id)
    mask = NeuronMask.from_bytes(data, source=source)
    if mask.manifest.neuron_count == 0:
        raise MaskError(source, "neuron_count", "at least one neuron switched off (a tenant that may run with nothing "
                        "masked is one with allow_unmasked)", "0")
    return mask


class StoredMask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    neurons: int = Field(ge=0)
    built_for: str = Field(description="the tenant named in the mask's own manifest")
    made_for: str | None = Field(None, description="the tenant the mask is made for (None: any tenant)")
    cross_tenant: bool = Field(False, description="the operator opted in to serving this tenant a mask made for "
                                                  "another")
    verification: str = Field("none", pattern="^(passed|failed|none)$", description="the certificate's verdict")
    criteria: Criteria | None = Field(None, description="the criteria the certificate judged the mask by")
    pushed_at: datetime


class StoreIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(FORMAT_VERSION, ge=2, le=FORMAT_VERSION)  # 2: read from `index.json`, moved
    generation: int = Field(0, ge=0, description="bumped by every change: servers that applied the same generation "
                            "serve the same masks")
    masks: dict[str, dict[str, StoredMask]] = Field(default_factory=dict, description="tenant -> mask id -> mask")
    tenant_masks: dict[str, list[str]] = Field(
        default_factory=dict, description="tenant -> mask ids, for tenants changed by push/drop")

    def entry(self, tenant: str, mask_id: str) -> StoredMask | None:
        return self.masks.get(tenant, {}).get(mask_id)


class LegacyIndex(BaseModel):
    """Format 1 (before mask ids were per tenant): one namespace of mask ids, files `<mask_id>.safetensors`."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(1, ge=1, le=1)
    masks: dict[str, StoredMask] = Field(default_factory=dict)
    tenant_masks: dict[str, list[str]] = Field(
        default_factory=dict, validation_alias=AliasChoices("tenant_masks", "bindings"))  # "bindings": before 0.2


class MaskStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.legacy: LegacyIndex | None = None
        self._lock_file = None  # the open `.lock` while this process holds the store's lock
        with self.locked():  # no other process is half-way through a change while this one sweeps
            if self.index.format_version < FORMAT_VERSION:
                self._commit(self.index.model_copy(update={"format_version": FORMAT_VERSION}))
                logger.info("depn-serve: mask store %s moved to format %d", self.root, FORMAT_VERSION)
            if self.legacy is None:
                self._sweep()

    def changed(self) -> bool:
        """Whether another process changed the index since this one last read or wrote it (no lock taken)."""
        return file_stamp(self.root / INDEX_NAME) != self._stamp

    def refresh(self) -> bool:
        """Re-read the index if another process changed it since this one last read or wrote it; whether it did."""
        if not self.changed():
            return False
        with self.locked():
            return True

    def acquire(self) -> None:
        """Take the store's lock (blocks: call it off the event loop) and re-read the index under it; every change
        this process makes until `release` is made under it."""
        lock = open(self.root / LOCK_NAME, "a+b")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stamp = file_stamp(self.root / INDEX_NAME)
            self.index = self._read_index()
        except BaseException:
            lock.close()  # closing drops the lock
            raise
        self._lock_file = lock

    def release(self) -> None:
        lock, self._lock_file = self._lock_file, None
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock, with the index as it is on disk now (another process may have changed it); within
        `acquire` / `release` it is held already."""
        if self._lock_file is not None:
            yield
            return
        self.acquire()
        try:
            yield
        finally:
            self.release()

    # --- reading -------------------------------------------------------------------------------------------------
    def _read_index(self) -> StoreIndex:
        path = self.root / INDEX_NAME
        self.legacy = None
        if not path.exists():
            path = self.root / LEGACY_INDEX_NAME
        if not path.is_file():
            return StoreIndex()
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(f"{path}: expected UTF-8 JSON ({exc})") from None
        try:
            if isinstance(doc, dict) and doc.get("format_version", 1) == 1:
                self.legacy = LegacyIndex.model_validate(doc)
                return StoreIndex()
            return StoreIndex.model_validate(doc)
        except ValidationError as exc:
            raise StoreError(one_line(exc, str(path))) from None

    def file(self, tenant: str, mask_id: str, version: int) -> Path:
        return self.root / check_tenant_id(tenant) / f"{check_id('mask id', mask_id)}.v{version}{SUFFIX}"

    def load(self, tenant: str, mask_id: str) -> NeuronMask:
        """The stored mask, refused if its file is missing or differs from what was pushed."""
        entry = self.index.entry(tenant, mask_id)
        if entry is None:
            raise StoreError(f"tenant {tenant!r} has no mask {mask_id!r} in the mask store {self.root}")
        path = self.file(tenant, mask_id, entry.version)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreError(f"{path}: cannot read the stored mask ({exc.strerror or exc})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise StoreError(f"{path}: SHA-256 {digest[:12]}… differs from the index's {entry.sha256[:12]}… "
                             "(the file changed after it was pushed)")
        return NeuronMask.from_bytes(data, source=str(path))

    # --- changing (each is one index commit) ---------------------------------------------------------------------
    def put(self, tenant: str, mask_id: str, data: bytes, mask: NeuronMask, file_masks: list[str],
            cross_tenant: bool = False) -> StoredMask:
        """Store a validated mask's bytes as the next version of the tenant's `mask_id`, which joins the tenant's mask
        list (its run-time list, else `file_masks` from the tenants file); returns its entry. `cross_tenant`: the
        operator opted in to serving the tenant a mask made for another. If this raises, nothing changed."""
        with self.locked():
            previous = self.index.entry(tenant, mask_id)
            certificate = mask.manifest.verification
            entry = StoredMask(
                version=(previous.version + 1) if previous else 1,
                sha256=hashlib.sha256(data).hexdigest(),
                neurons=mask.manifest.neuron_count,
                built_for=mask.manifest.tenant,
                made_for=mask.manifest.made_for,
                cross_tenant=cross_tenant and mask.manifest.made_for not in (None, tenant),
                verification=verdict(mask),
                criteria=certificate.criteria if certificate is not None else None,
                pushed_at=datetime.now(timezone.utc),
            )
            path = self.file(tenant, mask_id, entry.version)
            atomic_write_bytes(path, data)
            index = self.index.model_copy(deep=True)
            index.masks.setdefault(tenant, {})[mask_id] = entry
            masks = index.tenant_masks.get(tenant, file_masks)
            index.tenant_masks[tenant] = masks if mask_id in masks else [*masks, mask_id]
            try:
                self._commit(index)
            except BaseException:
                _remove(path)  # the index never named it
                raise
            return entry

    def remove(self, tenant: str, mask_id: str, file_masks: list[str]) -> None:
        """Forget the tenant's `mask_id`, which leaves its mask list (its run-time list, else `file_masks`). If this
        raises, nothing changed."""
        with self.locked():
            index = self.index.model_copy(deep=True)
            index.masks.get(tenant, {}).pop(mask_id, None)
            index.tenant_masks[tenant] = [i for i in index.tenant_masks.get(tenant, file_masks) if i != mask_id]
            self._commit(index)

    def follow_file(self, tenants: list[str]) -> None:
        """These tenants' mask lists come from the tenants file again (it was edited after a push or drop)."""
        with self.locked():
            index = self.index.model_copy(deep=True)
            for tenant in tenants:
                index.tenant_masks.pop(tenant, None)
            self._commit(index)

    def migrate(self, file_masks: dict[str, list[str]]) -> None:
        """Move a format-1 store to per-tenant ids: every tenant gets its own copy of each mask it uses (its list in
        the store, else `file_masks`, from the tenants file); a mask nobody uses goes to the tenant it was built for.
        Copies first, then the index, then the old files: a crash leaves one format or the other whole."""
        with self.locked():
            legacy = self.legacy
            if legacy is None:
                return
            uses = {**file_masks, **legacy.tenant_masks}
            index = StoreIndex(tenant_masks={t: list(ids) for t, ids in legacy.tenant_masks.items()})
            for mask_id, entry in legacy.masks.items():
                try:
                    data = (self.root / f"{mask_id}{SUFFIX}").read_bytes()
                except OSError as exc:
                    logger.error("depn-serve: mask %r of the old store is unreadable (%s); its tenants are refused "
                                 "until it is pushed again", mask_id, exc)
                    continue
                for tenant in [t for t, ids in uses.items() if mask_id in ids] or [entry.built_for]:
                    atomic_write_bytes(self.file(tenant, mask_id, entry.version), data)
                    index.masks.setdefault(tenant, {})[mask_id] = entry
            self.legacy = None
            self._commit(index)
            self._sweep()  # the format-1 files
            logger.info("depn-serve: mask store %s moved to per-tenant mask ids (format %d)", self.root, FORMAT_VERSION)

    def _commit(self, index: StoreIndex) -> None:
        """Write `index` (the commit point), adopt it, then delete the files only the old index named."""
        if self.legacy is not None:  # writing now would drop the format-1 masks from the index
            raise StoreError(f"{self.root}: a store written by 0.1; `depn serve` moves it to this format first")
        before = self._named()
        index.generation = self.index.generation + 1
        index.format_version = FORMAT_VERSION
        path, text = self.root / INDEX_NAME, index.model_dump_json(indent=2)
        try:
            atomic_write_text(path, text)
        except OSError as exc:
            try:  # the rename may have happened before the error (syncing the directory): then it is committed
                committed = path.read_text(encoding="utf-8") == text
            except OSError:
                committed = False
            if not committed:
                raise
            logger.warning("depn-serve: %s was replaced but not synced (%s)", path, exc)
        self.index, self._stamp = index, file_stamp(path)
        for path in (before - self._named()) | {self.root / LEGACY_INDEX_NAME}:
            _remove(path)

    def _named(self) -> set[Path]:
        return {self.file(t, m, e.version) for t, masks in self.index.masks.items() for m, e in masks.items()}

    def _sweep(self) -> None:
        """Delete temporary files and mask files the index does not name (left by a crash or a failed write)."""
        named = self._named()
        for path in list(self.root.rglob("*")):
            if path.is_file() and (path.name.endswith(".tmp") or (path.suffix == SUFFIX and path not in named)):
                _remove(path)
        for directory in self.root.iterdir():
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # best effort: the file is unused, and the next start sweeps it again
        logger.warning("depn-serve: could not remove %s: %s", path, exc)
