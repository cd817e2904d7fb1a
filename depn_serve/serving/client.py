"""Client for the admin routes (`depn masks push|list|drop`); standard library only."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from depn_serve.serving.server import read_admin_token


class AdminError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status


class AdminClient:
    def __init__(self, server: str, token_file: Path, timeout: float = 120.0):
        self.base = server.rstrip("/") + "/depn/v1"
        self.token = read_admin_token(token_file)
        self.timeout = timeout

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if body is not None:
            request.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                message = json.loads(payload)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = payload.decode(errors="replace") or exc.reason
            raise AdminError(exc.code, message) from None
        except urllib.error.URLError as exc:
            raise AdminError(0, f"cannot reach {self.base} ({exc.reason})") from None

    def push(self, tenant: str, mask_id: str, mask_file: Path) -> dict:
        path = f"/tenants/{urllib.parse.quote(tenant)}/masks/{urllib.parse.quote(mask_id)}"
        return self._call("PUT", path, Path(mask_file).read_bytes())

    def list(self) -> dict:
        return self._call("GET", "/masks")

    def drop(self, tenant: str, mask_id: str) -> dict:
        return self._call("DELETE", f"/tenants/{urllib.parse.quote(tenant)}/masks/{urllib.parse.quote(mask_id)}")
