"""Client for the admin routes (`depn masks push|list|drop`): the standard library for HTTP and the API's pydantic
bodies, nothing else (no torch, no vLLM)."""

from __future__ import annotations

import http.client
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from depn_serve.core.errors import DepnError
from depn_serve.serving.server.api import (API_PREFIX, DropResult, ErrorBody, HealthDetail, MaskListing, PushResult,
                                           read_admin_token)

Answer = TypeVar("Answer", bound=BaseModel)


class AdminError(DepnError):
    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}" if status else message)
        self.status = status


class AdminClient:
    def __init__(self, server: str, token_file: Path, timeout: float = 120.0):
        self.base = server.rstrip("/") + API_PREFIX
        self.token = read_admin_token(token_file)
        self.timeout = timeout

    def _call(self, answer: type[Answer], method: str, path: str, body: bytes | None = None) -> Answer:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            request.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return answer.model_validate_json(response.read())
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                message = ErrorBody.model_validate_json(payload).error.message
            except ValidationError:
                message = payload.decode(errors="replace") or exc.reason
            raise AdminError(exc.code, message) from None
        except urllib.error.URLError as exc:
            raise AdminError(0, f"cannot reach {self.base} ({exc.reason})") from None
        except (http.client.HTTPException, OSError) as exc:  # the connection dropped: nothing says what was done
            raise AdminError(0, f"{self.base}{path}: the connection was lost before an answer ({exc!r}); check "
                                "with `depn masks list` whether the change was applied") from None
        except ValidationError as exc:
            raise AdminError(0, f"{self.base}{path}: unexpected answer ({exc.errors()[0]['msg']})") from None

    def push(self, tenant: str, mask_id: str, mask_file: Path, cross_tenant: bool = False) -> PushResult:
        """`cross_tenant`: serve the tenant a mask made for another tenant (refused without it)."""
        query = "?cross_tenant=true" if cross_tenant else ""
        return self._call(PushResult, "PUT", self._mask_path(tenant, mask_id) + query, Path(mask_file).read_bytes())

    def list(self) -> MaskListing:
        return self._call(MaskListing, "GET", "/masks")

    def health(self) -> HealthDetail:
        return self._call(HealthDetail, "GET", "/health")

    def drop(self, tenant: str, mask_id: str) -> DropResult:
        return self._call(DropResult, "DELETE", self._mask_path(tenant, mask_id))

    @staticmethod
    def _mask_path(tenant: str, mask_id: str) -> str:
        return f"/tenants/{urllib.parse.quote(tenant)}/masks/{urllib.parse.quote(mask_id)}"
