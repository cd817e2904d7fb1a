"""The server's mask store: a directory of mask files plus an index, so masks survive restarts.

Layout: `<mask_id>.safetensors` (the pushed file, byte for byte) and `index.json` (pydantic `StoreIndex`): each
mask's version (bumped on every push), digest and neuron count, and the tenants whose mask list was changed at run
time (`tenant_masks`, which then replaces that tenant's `masks` from the tenants file). Every write is atomic.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.core.errors import DepnError, one_line
from depn_serve.core.fileio import atomic_write_bytes, atomic_write_text
from depn_serve.serving.server.tenants import ID_PATTERN

INDEX_NAME = "index.json"


class StoreError(DepnError):
    pass


def verdict(mask: NeuronMask) -> str:
    """'passed', 'failed' or 'none': what the mask's certificate says."""
    v = mask.manifest.verification
    return "none" if v is None else "passed" if v.passed else "failed"


class StoredMask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    neurons: int = Field(ge=0)
    built_for: str = Field(description="the tenant named in the mask's own manifest")
    verification: str = Field("none", pattern="^(passed|failed|none)$", description="the certificate's verdict")
    pushed_at: datetime


class StoreIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(1, ge=1, le=1)
    masks: dict[str, StoredMask] = Field(default_factory=dict)
    tenant_masks: dict[str, list[str]] = Field(
        default_factory=dict, description="tenant -> mask ids, for tenants changed by push/drop",
        validation_alias=AliasChoices("tenant_masks", "bindings"),  # "bindings": stores written before 0.2
    )


class MaskStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = self._read_index()

    def _read_index(self) -> StoreIndex:
        path = self.root / INDEX_NAME
        if not path.exists():
            return StoreIndex()
        try:
            return StoreIndex.model_validate_json(path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise StoreError(one_line(exc, str(path))) from None

    def _write_index(self) -> None:
        atomic_write_text(self.root / INDEX_NAME, self.index.model_dump_json(indent=2))

    def path(self, mask_id: str) -> Path:
        if not re.match(ID_PATTERN, mask_id):
            raise StoreError(f"mask id {mask_id!r}: expected letters, digits, '.', '_' or '-' (at most 64)")
        return self.root / f"{mask_id}.safetensors"

    def load(self, mask_id: str) -> NeuronMask:
        if mask_id not in self.index.masks:
            raise StoreError(f"mask {mask_id!r} is not in the mask store {self.root}")
        return NeuronMask.load(self.path(mask_id))

    def put(self, mask_id: str, data: bytes, mask: NeuronMask) -> StoredMask:
        """Store a validated mask's bytes under `mask_id` (file first, then index); returns its new entry."""
        previous = self.index.masks.get(mask_id)
        entry = StoredMask(
            version=(previous.version + 1) if previous else 1,
            sha256=hashlib.sha256(data).hexdigest(),
            neurons=mask.manifest.neuron_count,
            built_for=mask.manifest.tenant,
            verification=verdict(mask),
            pushed_at=datetime.now(timezone.utc),
        )
        atomic_write_bytes(self.path(mask_id), data)
        self.index.masks[mask_id] = entry
        self._write_index()
        return entry

    def remove(self, mask_id: str) -> None:
        self.index.masks.pop(mask_id, None)
        self._write_index()
        self.path(mask_id).unlink(missing_ok=True)

    def set_tenant_masks(self, tenant: str, mask_ids: list[str]) -> None:
        self.index.tenant_masks[tenant] = list(mask_ids)
        self._write_index()

    def checkpoint(self, mask_id: str) -> Checkpoint:
        """What `restore` needs to undo a change to `mask_id` and to the tenants' mask lists."""
        path = self.path(mask_id)
        return Checkpoint(self.index.model_copy(deep=True), mask_id, path.read_bytes() if path.exists() else None)

    def restore(self, checkpoint: Checkpoint) -> None:
        if checkpoint.file is None:
            self.path(checkpoint.mask_id).unlink(missing_ok=True)
        else:
            atomic_write_bytes(self.path(checkpoint.mask_id), checkpoint.file)
        self.index = checkpoint.index
        self._write_index()


@dataclass(frozen=True)
class Checkpoint:
    index: StoreIndex
    mask_id: str
    file: bytes | None  # None: there was no such mask file
