"""Faults and hostile input against a live `depn serve`, for `depn bench soak`.

Two kinds of fault, each followed by checks that the store on disk, its checksums, what the server lists and what
it serves all agree:
- **kill -9**: the whole server (API process and engine, one process group) is killed at a random moment of a push
  or a drop, then restarted. An acknowledged change must hold; one that was not may hold or not, but whole.
- **disk refuses writes**: the server's file-size limit (`RLIMIT_FSIZE`, set from outside with `prlimit`) is lowered
  so that a store write fails part-way (EFBIG, the kernel's answer, as ENOSPC is for a full disk): the push must be
  refused with 507 and the old mask stay stored and served; with the limit lifted the same push goes through.

`hostile_request` makes the hostile-input cases the soak sends while serving: odd methods, paths and Authorization
headers, and broken mask bytes. Each must get an answer below 500 and the engine must live.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import threading
import time
import urllib.error
from urllib.parse import quote
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.serving.client import AdminClient, AdminError
from depn_serve.serving.process import ServerProcess
from depn_serve.serving.server.api import API_PREFIX
from depn_serve.serving.server.store import INDEX_NAME, LOCK_NAME, StoreIndex

MASK_ID = "main"


class FaultReport(BaseModel):
    kills: int = 0  # server killed during a push or drop, then restarted
    kills_after_ack: int = 0  # ... of which the change had been acknowledged before the kill
    disk_faults: int = 0  # pushes made while the store's writes failed
    survived: int = 0  # faults after which every check held
    problems: list[str] = []


class Faults:
    """Injects faults into `server` during the `churn` tenants' mask changes and checks every tenant in `keys`
    (each with one mask, `MASK_ID`). `reference(off)` is the HF model's greedy answer to `probe` with `off` switched
    off; `new_mask(tenant)` writes a fresh mask file for a tenant."""

    def __init__(self, server: ServerProcess, admin: AdminClient, store: Path, keys: dict[str, str],
                 churn: list[str], probe: str, max_tokens: int, reference: Callable[[torch.Tensor], str],
                 new_mask: Callable[[str], Path], rng: random.Random):
        self.server, self.admin, self.store, self.keys, self.churn = server, admin, store, keys, churn
        self.probe, self.max_tokens, self.reference = probe, max_tokens, reference
        self.new_mask, self.rng = new_mask, rng
        self.report = FaultReport()

    # --- faults --------------------------------------------------------------------------------------------------
    def kill_during_change(self, window_s: float = 0.04) -> None:
        """SIGKILL the server a random moment (within `window_s`) after a push or drop was sent; restart; check."""
        tenant = self.rng.choice(self.churn)
        before = self._index()
        has_mask = MASK_ID in before.tenant_masks.get(tenant, [])
        drop = has_mask and self.rng.random() < 0.3
        path = None if drop else self.new_mask(tenant)
        data = None if path is None else path.read_bytes()
        acked: list[bool] = []

        def change() -> None:
            try:
                if path is None:
                    self.admin.drop(tenant, MASK_ID)
                else:
                    self.admin.push(tenant, MASK_ID, path)
                acked.append(True)
            except AdminError:  # refused, or cut off by the kill
                acked.append(False)

        worker = threading.Thread(target=change)
        worker.start()
        time.sleep(self.rng.uniform(0, window_s))
        self.server.kill()
        worker.join()
        self.report.kills += 1
        self.report.kills_after_ack += acked == [True]
        self.server.start()
        after = self._index()
        changed = (MASK_ID not in after.tenant_masks.get(tenant, [])) if drop else \
            (after.entry(tenant, MASK_ID) is not None and after.entry(tenant, MASK_ID).sha256 == _sha(data))
        problems = self._agree(after)
        if acked == [True] and not changed:
            problems.append(f"{tenant}: an acknowledged {'drop' if drop else 'push'} was lost by the kill")
        if not changed and _view(after, tenant) != _view(before, tenant):
            problems.append(f"{tenant}: the store holds neither the old nor the new state after the kill")
        problems += [f"{t}: changed by another tenant's interrupted change" for t in self.keys
                     if t != tenant and _view(after, t) != _view(before, t)]
        self._outcome(f"kill during {'drop' if drop else 'push'}", problems)

    def disk_refuses_writes(self) -> None:
        """A push while the server cannot write more than `limit` bytes to a file: refused with 507, nothing
        changed (store and served mask); then the same push with the limit lifted goes through."""
        tenant = self.rng.choice(self.churn)
        path = self.new_mask(tenant)
        data = path.read_bytes()
        before, index_bytes = self._index(), (self.store / INDEX_NAME).read_bytes()
        limit = self.rng.randrange(0, max(len(data), len(index_bytes)) - 64)  # the bigger write fails, at least
        pid = self.server.proc.pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
        try:
            self.admin.push(tenant, MASK_ID, path)
            refused = None
        except AdminError as exc:
            refused = exc
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
        self.report.disk_faults += 1
        problems = []
        if refused is None or refused.status != 507:
            problems.append(f"{tenant}: a push the disk refused was answered {refused or 'with success'}")
        if (self.store / INDEX_NAME).read_bytes() != index_bytes:
            problems.append("the index changed although the push failed")
        problems += self._agree(before)
        try:
            self.admin.push(tenant, MASK_ID, path)
        except AdminError as exc:
            problems.append(f"{tenant}: the push failed again with the disk writable: {exc}")
        problems += self._agree(self._index())
        self._outcome(f"disk refusing writes at {limit} bytes", problems)

    # --- checks --------------------------------------------------------------------------------------------------
    def _agree(self, index: StoreIndex) -> list[str]:
        """The store's files match their checksums and nothing else is there; the server lists what the index holds;
        every tenant is served with exactly its stored mask (HF reference), or refused without one."""
        problems = []
        named = {self.store / INDEX_NAME, self.store / LOCK_NAME}
        for tenant, masks in index.masks.items():
            for mask_id, entry in masks.items():
                path = self.store / tenant / f"{mask_id}.v{entry.version}.safetensors"
                named.add(path)
                if not path.exists() or _sha(path.read_bytes()) != entry.sha256:
                    problems.append(f"{path}: missing or not the bytes the index names")
        extra = [p for p in self.store.rglob("*") if p.is_file() and p not in named]
        if extra:
            problems.append(f"files no index names: {[str(p) for p in extra]}")
        listed = {t.tenant: [(m.id, m.version) for m in t.masks] for t in self.admin.list().tenants}
        for tenant in self.keys:
            stored = [(i, index.entry(tenant, i).version) for i in index.tenant_masks.get(tenant, [])
                      if index.entry(tenant, i) is not None]
            if listed.get(tenant) != stored:
                problems.append(f"{tenant}: the server lists {listed.get(tenant)}, the store holds {stored}")
            problems += self._served(tenant, index)
        return problems

    def _served(self, tenant: str, index: StoreIndex) -> list[str]:
        entry = index.entry(tenant, MASK_ID) if MASK_ID in index.tenant_masks.get(tenant, []) else None
        try:
            text = self.server.complete(self.keys[tenant], self.probe, self.max_tokens)
        except urllib.error.HTTPError as exc:
            return [] if entry is None and exc.code == 403 else [f"{tenant}: answered {exc.code} with a stored mask"]
        if entry is None:
            return [f"{tenant}: served although its mask was dropped"]
        off = NeuronMask.load(self.store / tenant / f"{MASK_ID}.v{entry.version}.safetensors").off
        return [] if text == self.reference(off) else [f"{tenant}: the answer is not the stored mask's"]

    def _index(self) -> StoreIndex:
        return StoreIndex.model_validate(json.loads((self.store / INDEX_NAME).read_bytes()))

    def _outcome(self, what: str, problems: list[str]) -> None:
        if problems:
            self.report.problems += [f"{what}: {p}" for p in problems]
        else:
            self.report.survived += 1


def _view(index: StoreIndex, tenant: str) -> tuple:
    entry = index.entry(tenant, MASK_ID)
    return tuple(index.tenant_masks.get(tenant, [])), entry.sha256 if entry else None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hostile_request(rng: random.Random, keys: dict[str, str], admin_token: str, target: str,
                    mask: bytes) -> tuple[str, str, dict[str, str], bytes]:
    """One hostile request: (method, path, headers, body). Admin-authenticated changes only ever name `target` (a
    tenant of its own) or unknown tenants, and vLLM's operator routes never get the admin token, so the other
    tenants and the engine's own state are attacked, never legitimately changed."""
    tenant = rng.choice([target, "nobody", "../stable", "a" * 300, "ünï", ""])
    mask_id = rng.choice([MASK_ID, "main\n", "..", "x" * 200, "a/b", "%00", "main.v1"])
    admin_path = f"{API_PREFIX}/tenants/{quote(tenant, safe='/%')}/masks/{quote(mask_id, safe='/%')}"
    operator = rng.choice(["/collective_rpc", "/sleep", "/wake_up", "/pause", "/reset_prefix_cache", "/update_weights",
                           "/scale_elastic_ep", "/v1/responses/resp_1", "/v1/load_lora_adapter", "/docs",
                           "/openapi.json", "/v1/../depn/v1/masks", "//v1/completions", "/v1/completions/",
                           "/" + "x" * 2000, "/%2e%2e/etc/passwd"])
    path = rng.choice([admin_path, f"{API_PREFIX}/masks", operator, "/v1/completions", "/v1/chat/completions",
                       "/v1/models", "/tokenize"])
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    key = rng.choice(list(keys.values()))
    credential = rng.choice(["", f"Bearer {key}", f"Basic {key}",
                             "Bearer", "Bearer " + "k" * 5000, "bearer " + admin_token[::-1], "Token abc",
                             f"Bearer {admin_token}"])
    if credential == f"Bearer {admin_token}" and not path.startswith(API_PREFIX):
        credential = ""  # the admin token on vLLM's operator routes would really pause or reset the engine
    broken = bytearray(mask[: rng.randrange(len(mask))]) if rng.random() < 0.5 else bytearray(mask)
    if broken and rng.random() < 0.5:
        broken[rng.randrange(min(len(broken), 64))] ^= 0xFF  # the header: a flipped tensor bit could be a valid mask
    body = rng.choice([b"", bytes(broken), rng.randbytes(rng.randrange(1, 4096)), b'{"prompt": [[[]]]}',
                       b'{"model": 1, "prompt": "x", "max_tokens": -1}', b"\xff\xfe{", b"[" * 1000])
    headers = {"Authorization": credential} if credential else {}
    if body:
        headers["Content-Type"] = rng.choice(["application/json", "application/octet-stream", "text/plain"])
    return method, path, headers, body
