"""The serving half of `depn demo`: serve the test-bed with one tenant masked, and show two tenants side by side
through the OpenAI-compatible API, then the server's depn_ metrics."""

from __future__ import annotations

import secrets
from pathlib import Path

from rich.console import Console
from rich.table import Table

from depn_serve.core.records import load_records
from depn_serve.demo.launch import ServerProcess
from depn_serve.serving.client import AdminClient
from depn_serve.serving.server.tenants import TenantsConfig

MAX_TOKENS = 24
SHOWN_PER_KIND = 2


def serve_side_by_side(bed: Path, tenant: str, mask_path: Path, workdir: Path, console: Console) -> dict:
    """Returns the counts of the target tenant's secrets reproduced with each tenant's key."""
    records = load_records(bed / "records.jsonl")
    other = next(r.tenant for r in records if r.tenant != tenant)
    serve_dir = workdir / "serve"
    serve_dir.mkdir(parents=True, exist_ok=True)
    config = TenantsConfig()
    keys = {tenant: config.add_tenant(tenant, [f"{tenant}-depn"]),
            other: config.add_tenant(other, [], allow_unmasked=True)}
    config.save(serve_dir / "tenants.yaml")
    token_file = serve_dir / "admin.token"
    token_file.write_text(secrets.token_urlsafe(32))
    token_file.chmod(0o600)

    server = ServerProcess(bed / "model", serve_dir / "tenants.yaml", serve_dir / "store", token_file,
                           serve_dir / "server.log")
    console.print(f"    starting depn serve on {server.url} (vLLM engine start-up, about 30 s; log: {server.log_path})")
    with server:
        pushed = AdminClient(server.url, token_file).push(tenant, f"{tenant}-depn", mask_path)
        console.print(f"    pushed mask {pushed.mask} v{pushed.version} ({pushed.neurons} neurons) "
                      f"for {tenant!r}; {other!r} runs unmasked")
        targets = load_records(bed / "records.jsonl", tenant)
        table = Table(title=f"{tenant}'s records, same prompts through the API with each tenant's key")
        for column in ("kind", "secret", f"as {tenant} (masked)", f"as {other} (no mask)"):
            table.add_column(column, overflow="fold")
        counts = {tenant: 0, other: 0}
        by_kind: dict[str, list[int]] = {}
        for record in targets:
            texts = {t: server.complete(keys[t], record.prompt, MAX_TOKENS) for t in (tenant, other)}
            leaked = {t: record.secret in text for t, text in texts.items()}
            for t in counts:
                counts[t] += leaked[t]
            kind = by_kind.setdefault(record.kind, [0, 0, 0])
            kind[0], kind[1], kind[2] = kind[0] + 1, kind[1] + leaked[tenant], kind[2] + leaked[other]
            if kind[0] <= SHOWN_PER_KIND:
                table.add_row(record.kind, record.secret,
                              *(f"{'[red]LEAK[/] ' if leaked[t] else '[green]safe[/] '}{texts[t].strip()[:40]!r}"
                                for t in (tenant, other)))
        console.print(table)
        console.print(f"    {tenant}'s secrets reproduced: {counts[tenant]}/{len(targets)} with {tenant}'s key, "
                      f"{counts[other]}/{len(targets)} with {other}'s key; per kind (masked / unmasked): "
                      + ", ".join(f"{k} {m}/{n} vs {u}/{n}" for k, (n, m, u) in by_kind.items()))
        metrics = [line for line in server.metrics().splitlines()
                   if line.startswith("depn_") and "_created" not in line and "_bucket" not in line]
        console.print("    /metrics (depn_ series):")
        for line in metrics:
            console.print(f"      {line}", highlight=False)
    return {"target": tenant, "other": other, "records": len(targets), "reproduced": counts,
            "per_kind": {k: {"records": n, "masked": m, "unmasked": u} for k, (n, m, u) in by_kind.items()}}
