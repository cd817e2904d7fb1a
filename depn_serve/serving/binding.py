"""How a request carries its tenant through vLLM: two keys in `SamplingParams.extra_args`, set only by the server.

Clients can send `vllm_xargs`, which vLLM copies into the same dict, so the server refuses any client key with the
`depn_` prefix and then writes these itself. The prefix cache is keyed by tenant and mask version through vLLM's
cache salt, so KV computed under one mask is never reused under another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "depn_"
TENANT_KEY = "depn_tenant"
VERSION_KEY = "depn_version"


def tenant_of(extra_args: Mapping[str, Any] | None) -> str | None:
    """The tenant whose mask a request runs with; None = no mask (only offline engines create such requests)."""
    if not extra_args:
        return None
    tenant = extra_args.get(TENANT_KEY)
    return tenant if isinstance(tenant, str) else None


def client_keys(extra_args: Mapping[str, Any] | None) -> list[str]:
    """Keys in a client's extra args that only the server may set."""
    return sorted(k for k in (extra_args or {}) if str(k).startswith(PREFIX))


def cache_salt(extra_args: Mapping[str, Any] | None, client_salt: str | None) -> str:
    """Prefix-cache salt: tenant and mask version first, so no client-chosen salt can produce another tenant's."""
    tenant = tenant_of(extra_args)
    version = (extra_args or {}).get(VERSION_KEY) if tenant is not None else None
    salt = f"depn:{tenant or '-'}:{version if version is not None else '-'}"
    return salt if client_salt is None else f"{salt}|{client_salt}"
