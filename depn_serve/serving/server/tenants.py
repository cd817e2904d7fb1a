"""Tenants and their credentials: who a request belongs to, which masks it must run with, which LoRA adapters
it may use and how much it may ask of a server; and the criteria a mask's certificate must meet.

The tenants file is YAML validated by pydantic. It stores only SHA-256 hashes of API keys: keys are 256-bit
random tokens, so a fast hash is enough (there is nothing to brute-force), and a leaked file reveals no key.
Identity comes from the key alone: the key's hash is looked up in an index (`TenantIndex`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.errors import DepnError, one_line
from depn_serve.core.fileio import atomic_write_text

KEY_PREFIX = "depn_"
# libyaml's safe loader when PyYAML was built with it: ten times faster on a file of thousands of tenants.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Names the mask store's own files had (a tenant's directory there would replace its index), compared in lower case.
RESERVED_IDS = frozenset({"index.json"})


class TenantsError(DepnError):
    pass


def is_reserved(tenant_id: str) -> bool:
    return tenant_id.lower() in RESERVED_IDS


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    hint: str = Field(description="first characters of the key, to tell keys apart in listings")
    created_at: datetime


class Limits(BaseModel):
    """What one tenant may ask of a server (each API server process counts its own); null: no limit. A request
    beyond a limit is refused with 429, counted per limit in `depn_requests_limited_total`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_in_flight: int | None = Field(64, ge=1, description="API requests of the tenant in flight at once")
    max_n: int | None = Field(16, ge=1, description="largest `n` (completions per prompt, or beam width) of a request")
    max_prompts: int | None = Field(64, ge=1, description="prompts in one completion request (or items to score)")
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt and generated tokens over the last minute")

    def over(self, override: Limits | None) -> Limits:
        """These limits with the fields `override` sets (a tenant's own block over the file's)."""
        return self if override is None else self.model_copy(update=override.model_dump(exclude_unset=True))


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=ID_PATTERN)
    masks: list[Annotated[str, StringConstraints(pattern=ID_PATTERN)]] = Field(
        default_factory=list, description="mask ids in the mask store; several = union"
    )
    allow_unmasked: bool = Field(False, description="may run with no mask at all (otherwise refused with 403)")
    lora_adapters: list[str] = Field(default_factory=list, description=(
        "the LoRA adapters (names given to `--lora-modules`) this tenant may use and see in /v1/models"))
    limits: Limits | None = Field(None, description="this tenant's limits, over the file's `limits`")
    api_keys: list[ApiKey] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if is_reserved(value):
            raise ValueError(f"{value!r} is a reserved name (reserved: {sorted(RESERVED_IDS)})")
        return value


class TenantsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(1, ge=1, le=1)
    anonymous_tenant: str | None = Field(
        None, description="tenant used for requests without a key; unset = such requests get 401"
    )
    criteria: Criteria | None = Field(None, description=(
        "what a mask's certificate must demand at least (default: the product's targets); `depn serve`'s criteria "
        "options override single fields"))
    limits: Limits | None = Field(None, description="every tenant's limits (default: `Limits`' defaults)")
    tenants: list[Tenant] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> TenantsConfig:
        ids = [t.id for t in self.tenants]
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dup:
            raise ValueError(f"tenant ids must be unique, found duplicates {dup}")
        hashes = [k.sha256 for t in self.tenants for k in t.api_keys]
        if len(hashes) != len(set(hashes)):
            raise ValueError("an API key hash appears twice")
        if self.anonymous_tenant is not None and self.anonymous_tenant not in ids:
            raise ValueError(f"anonymous_tenant {self.anonymous_tenant!r} is not a configured tenant")
        shared = sorted({a for t in self.tenants for a in t.lora_adapters if
                         sum(a in u.lora_adapters for u in self.tenants) > 1})
        if shared:
            raise ValueError(f"LoRA adapters {shared} belong to several tenants: an adapter belongs to one tenant")
        return self

    # --- files -------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> TenantsConfig:
        path = Path(path)
        if not path.is_file():
            raise TenantsError(f"{path}: no tenants file (create one with `depn tenants add`)")
        return cls.parse(path.read_bytes(), path)

    @classmethod
    def parse(cls, data: bytes, path: Path) -> TenantsConfig:
        try:
            doc = yaml.load(data.decode("utf-8"), Loader=_LOADER) or {}
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise TenantsError(f"{path}: not valid UTF-8 YAML ({exc})") from None
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise TenantsError(one_line(exc, str(path))) from None

    def save(self, path: Path) -> None:
        doc = self.model_dump(mode="json")
        for part in (doc, *doc["tenants"]):  # unset optional blocks stay out of the file
            for key in ("criteria", "limits"):
                if part.get(key, 0) is None:
                    del part[key]
        atomic_write_text(Path(path), yaml.dump(doc, Dumper=_DUMPER, sort_keys=False))

    # --- use ---------------------------------------------------------------------------------------------------
    def find(self, tenant_id: str) -> Tenant | None:
        return next((t for t in self.tenants if t.id == tenant_id), None)

    def limits_of(self, tenant: Tenant) -> Limits:
        return (self.limits or Limits()).over(tenant.limits)

    def tenant(self, tenant_id: str) -> Tenant:
        """The tenant, or an error listing the configured ones (for operators: never shown to a tenant)."""
        found = self.find(tenant_id)
        if found is None:
            raise TenantsError(f"no tenant {tenant_id!r}; tenants: {[t.id for t in self.tenants]}")
        return found

    def add_tenant(self, tenant_id: str, masks: list[str], allow_unmasked: bool = False) -> str:
        """Add a tenant with one new API key; returns the key (the only time it exists in clear)."""
        if self.find(tenant_id) is not None:
            raise TenantsError(f"tenant {tenant_id!r} already exists")
        self.tenants.append(Tenant(id=tenant_id, masks=masks, allow_unmasked=allow_unmasked))
        return self.new_key(tenant_id)

    def new_key(self, tenant_id: str) -> str:
        """Give the tenant one more API key (to rotate: add, move clients over, revoke the old one)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        self.tenant(tenant_id).api_keys.append(
            ApiKey(sha256=hash_key(key), hint=key[:9], created_at=datetime.now(timezone.utc)))
        return key

    def revoke(self, tenant_id: str, hint: str | None = None) -> int:
        """Remove the tenant's keys that start with `hint` (all of them without one); returns how many."""
        tenant = self.tenant(tenant_id)
        kept = [k for k in tenant.api_keys if hint is not None and not k.hint.startswith(hint[:9])]
        revoked = len(tenant.api_keys) - len(kept)
        if hint is not None and revoked == 0:
            raise TenantsError(f"tenant {tenant_id!r} has no key starting with {hint[:9]!r}; its keys: "
                               f"{[k.hint for k in tenant.api_keys]}")
        tenant.api_keys = kept
        return revoked

    def remove(self, tenant_id: str) -> None:
        tenant = self.tenant(tenant_id)
        if self.anonymous_tenant == tenant_id:
            raise TenantsError(f"tenant {tenant_id!r} is the anonymous tenant; unset anonymous_tenant first")
        self.tenants.remove(tenant)

    def index(self) -> TenantIndex:
        return TenantIndex(self)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant a key belongs to (the anonymous tenant for no key), or None if the key is unknown."""
        return self.index().authenticate(key)


class TenantIndex:
    """Lookups by id and by key hash over one version of the file (the server builds one per version it applies):
    the same cost for 5 or 5,000 tenants. A lookup's timing depends only on the SHA-256 of the key presented,
    which tells an attacker nothing about any stored key."""

    def __init__(self, config: TenantsConfig):
        self.config = config
        self.by_id = {t.id: t for t in config.tenants}
        self.by_key = {stored.sha256: t for t in config.tenants for stored in t.api_keys}

    def find(self, tenant_id: str) -> Tenant | None:
        return self.by_id.get(tenant_id)

    def authenticate(self, key: str | None) -> Tenant | None:
        if not key:
            anonymous = self.config.anonymous_tenant
            return None if anonymous is None else self.by_id.get(anonymous)
        return self.by_key.get(hash_key(key))
