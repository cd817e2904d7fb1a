"""A request's mask identity as it travels through vLLM: a tiny immutable type (as vLLM's `LoRARequest` carries an
adapter), stored in `SamplingParams.extra_args` under keys only the server may set.

Clients can send `vllm_xargs`, which vLLM copies into the same dict, so the server refuses any client key with the
`depn_` prefix and then writes these itself. The prefix cache is keyed by tenant and the mask's content hash through
vLLM's cache salt, so KV computed under one mask is never reused under another, also across restarts and replicas
that share a KV cache (a version number is only unique within one server process).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RESERVED_PREFIX = "depn_"
TENANT_KEY = "depn_tenant"
VERSION_KEY = "depn_version"
DIGEST_KEY = "depn_mask_sha256"
UNMASKED = "unmasked"  # the digest of a tenant that runs with no neuron switched off


@dataclass(frozen=True)
class MaskRequest:
    """Run this request with `tenant`'s mask; `version` is the mask version the server admitted it under and
    `digest` the hash of that mask's bits (offline engines may leave both out)."""

    tenant: str
    version: Any = None
    digest: str | None = None

    def to_extra_args(self) -> dict[str, Any]:
        extra = {TENANT_KEY: self.tenant, VERSION_KEY: self.version, DIGEST_KEY: self.digest}
        return {k: v for k, v in extra.items() if v is not None}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> MaskRequest | None:
        """The request's mask identity; None = no mask (only offline engines create such requests)."""
        tenant = (extra_args or {}).get(TENANT_KEY)
        if not isinstance(tenant, str):
            return None
        return cls(tenant, extra_args.get(VERSION_KEY), extra_args.get(DIGEST_KEY))


def tenant_of(extra_args: Mapping[str, Any] | None) -> str | None:
    """The tenant whose mask a request runs with (None: no mask)."""
    request = MaskRequest.from_extra_args(extra_args)
    return None if request is None else request.tenant


def mask_key(tenant: str, version: Any) -> str:
    """The name the engine gives one mask of a tenant (tenant ids hold no '/'): the workers hold masks and the
    scheduler counts slots by it, so a request runs with the mask it was admitted with, not whatever its tenant
    was bound to since."""
    return f"{tenant}/{version}"


def slot_key(extra_args: Mapping[str, Any] | None) -> str | None:
    """What a request needs a device slot for: the mask its server admitted it with, else its tenant's current one
    (offline engines, which set no hash); None when it needs no slot (no tenant, or a tenant served unmasked)."""
    request = MaskRequest.from_extra_args(extra_args)
    if request is None or request.digest == UNMASKED:
        return None
    return mask_key(request.tenant, request.digest) if request.digest else request.tenant


def reserved_keys(extra_args: Mapping[str, Any] | None) -> list[str]:
    """Keys in a client's extra args that only the server may set."""
    return sorted(k for k in (extra_args or {}) if str(k).startswith(RESERVED_PREFIX))


def cache_salt(request: MaskRequest | None, client_salt: str | None) -> str:
    """Prefix-cache salt: tenant and the mask's content hash first (its version where no hash was given), so no
    client-chosen salt can produce another tenant's or another mask's."""
    if request is None:
        salt = "depn:-:-"
    else:
        mask = request.digest or (f"v{request.version}" if request.version is not None else "-")
        salt = f"depn:{request.tenant or '-'}:{mask}"
    return salt if client_salt is None else f"{salt}|{client_salt}"
