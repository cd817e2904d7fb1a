"""The admin API's bodies (`/depn/v1/...`), shared by the server and `depn masks`, and the admin token file.

Pydantic and the standard library only, so the client side never imports torch or vLLM.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from depn_serve.artifacts.criteria import Criteria
from depn_serve.core.errors import DepnError

API_PREFIX = "/depn/v1"
MIN_ADMIN_TOKEN = 16


class AdminTokenError(DepnError):
    pass


def read_token(path: Path, kind: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise AdminTokenError(f"{path}: {kind} file not found")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < MIN_ADMIN_TOKEN:
        raise AdminTokenError(f"{path}: {kind} must be at least {MIN_ADMIN_TOKEN} characters, found {len(token)}")
    return token


def read_admin_token(path: Path) -> str:
    return read_token(path, "admin token")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PushResult(_Body):
    """Answer to `PUT /tenants/{tenant}/masks/{mask_id}` (body: the mask file's bytes)."""

    tenant: str
    mask: str
    version: int  # the mask id's version, bumped on every push
    neurons: int  # neurons the pushed mask switches off
    tenant_neurons: int  # neurons the tenant's masks switch off together (what its requests now run with)
    verification: str = Field(description="the certificate's summary, or why the mask is served without one")


class DropResult(_Body):
    """Answer to `DELETE /tenants/{tenant}/masks/{mask_id}`."""

    tenant: str
    dropped: str
    masks: list[str]  # the tenant's masks after the drop
    servable: bool  # whether the tenant's requests are still admitted


class ListedMask(_Body):
    id: str
    version: int
    neurons: int
    built_for: str = Field(description="the tenant named in the mask's own manifest")
    made_for: str | None = Field(None, description="the tenant the mask is made for; None: made for any tenant")
    cross_tenant: bool = Field(False, description="made for another tenant, served to this one by the operator's "
                                                  "explicit choice (`--cross-tenant`)")
    verification: str = Field("none", description="'passed', 'failed' or 'none' (no certificate)")
    criteria: Criteria | None = Field(None, description="the criteria its certificate judged it by")


class TenantListing(_Body):
    tenant: str
    masks: list[ListedMask]
    mask_version: int | None = Field(description="version of the tenant's union of masks (new on every change)")
    mask_sha256: str | None = Field(None, description="hash of the bits the tenant's requests run with (the workers "
                                                      "key masks by it)")
    masked_neurons: int
    allow_unmasked: bool
    missing: list[str] = Field(description="masks the tenant uses that are not pushed yet (it is refused until then)")
    problem: str | None = Field(None, description="why the tenant is quarantined: a stored mask failed its checks "
                                                  "(push a good one under the same id, or drop it)")
    resident: bool = Field(description="the tenant's current masks are loaded in a device slot")
    behind: str | None = Field(None, description="why this server still serves the tenant's previous masks: the "
                               "store's could not be applied (retried every second)")
    refused_behind: bool = Field(False, description="behind for longer than the server allows: its requests are "
                                                    "refused (503) until it catches up")


class MaskListing(_Body):
    """Answer to `GET /masks`."""

    tenants: list[TenantListing]
    slots: int | None
    resident: int
    store_generation: int = Field(description="the mask store generation this server applied: servers sharing a "
                                  "store that report the same one, none behind, serve the same masks")
    criteria: Criteria = Field(description="what this server requires of a mask's certificate")


class HealthDetail(_Body):
    """Answer to `GET /health` under the admin prefix: what the open `/health` does not tell strangers."""

    status: str = Field(description="'ok', or 'degraded' while some tenants are not served as the store says")
    store_generation: int
    tenants_behind_store: dict[str, str] = Field(description="tenant -> why its stored masks cannot be applied")
    tenants_refused_behind: list[str] = Field(description="tenants behind for too long: refused on this server")
    tenants_quarantined: dict[str, str] = Field(description="tenant -> why one of its stored masks failed its checks")
    tenants_file_problem: str | None = Field(None, description="why a changed tenants file could not be applied")


class ApiError(_Body):
    message: str
    code: int
    type: str | None = None


class ErrorBody(_Body):
    """Every refusal, from the auth layer and the admin routes alike (the OpenAI error shape)."""

    error: ApiError
