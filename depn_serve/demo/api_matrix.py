"""The serving half of `depn demo`: every tenant's isolation mask pushed to `depn serve`, then the cross-tenant
matrix through the OpenAI-compatible API with each tenant's own key, a few answers side by side, and the
server's depn_ metrics."""

from __future__ import annotations

import secrets
from pathlib import Path

from rich.console import Console
from rich.table import Table

from depn_serve.core.arch import load_tokenizer
from depn_serve.core.records import encode_record, load_records
from depn_serve.serving.process import ServerProcess
from depn_serve.evaluation.attacks import reproduces
from depn_serve.evaluation.matrix import IsolationMatrix, isolation_matrix, render_matrix
from depn_serve.evaluation.remote import ApiOracle
from depn_serve.serving.client import AdminClient
from depn_serve.serving.server.tenants import TenantsConfig

MAX_TOKENS = 24
SHOWN = 3


def serve_and_attack(bed: Path, masks_dir: Path, verified: bool, workdir: Path, console: Console) -> IsolationMatrix:
    records = load_records(bed / "records.jsonl")
    tenants = sorted({r.tenant for r in records})
    serve_dir = workdir / "serve"
    serve_dir.mkdir(parents=True, exist_ok=True)
    config = TenantsConfig()
    keys = {t: config.add_tenant(t, [f"{t}-isolation"]) for t in tenants}
    config.save(serve_dir / "tenants.yaml")
    token_file = serve_dir / "admin.token"
    token_file.write_text(secrets.token_urlsafe(32))
    token_file.chmod(0o600)
    if not verified:
        console.print("    [bold red]not every mask passed verification[/]: serving them with --allow-unverified "
                      "so the matrix shows what leaks")
    server = ServerProcess(bed / "model", serve_dir / "tenants.yaml", serve_dir / "store", token_file,
                           serve_dir / "server.log", allow_unverified=not verified)
    console.print(f"    starting depn serve on {server.url} (vLLM engine start-up, about 30 s; log: {server.log_path})")
    tokenizer = load_tokenizer(bed / "model")
    with server:
        admin = AdminClient(server.url, token_file)
        for tenant in tenants:
            pushed = admin.push(tenant, f"{tenant}-isolation", masks_dir / f"{tenant}.safetensors")
            console.print(f"    pushed {pushed.mask} v{pushed.version} ({pushed.neurons} neurons) for {tenant!r}: "
                          f"{pushed.verification}", markup=False)
        oracles = {t: ApiOracle(server.url, keys[t]) for t in tenants}
        console.print("    attacking through the API with the official openai client, one key per row")
        matrix = isolation_matrix([(t, _fixed(oracles[t])) for t in tenants], tokenizer, records, path=server.url)
        console.print(render_matrix(matrix, f"through depn serve ({server.url})"))
        console.print(_examples(records, tenants, oracles, tokenizer))
        metrics = [line for line in server.metrics().splitlines()
                   if line.startswith("depn_") and "_created" not in line and "_bucket" not in line]
        console.print("    /metrics (depn_ series):")
        for line in metrics:
            console.print(f"      {line}", highlight=False)
    return matrix


def _fixed(oracle: ApiOracle):
    """A view that is always the same API client (the key is the view)."""
    from contextlib import nullcontext

    return lambda: nullcontext(oracle)


def _examples(records, tenants: list[str], oracles: dict[str, ApiOracle], tokenizer) -> Table:
    """The same prompts asked with each key: the owner's key gets its secret back, other keys do not."""
    shown = [r for t in tenants for r in [r for r in records if r.tenant == t][:SHOWN]]
    prompts = [encode_record(tokenizer, r)[0] for r in shown]
    answers = {t: [tokenizer.decode(ids, skip_special_tokens=True).strip()
                   for ids in oracles[t].greedy(prompts, MAX_TOKENS)] for t in tenants}
    table = Table(title="the same prompts through the API, greedy, with each tenant's key")
    for column in ("owner", "secret", *(f"as {t}" for t in tenants)):
        table.add_column(column, overflow="fold")
    for i, record in enumerate(shown):
        cells = []
        for t in tenants:
            leaked = reproduces(answers[t][i], record.secret, 2)
            mark = ("[green]own[/]" if t == record.tenant else "[red]LEAK[/]") if leaked else \
                ("[red]lost[/]" if t == record.tenant else "[green]safe[/]")
            cells.append(f"{mark} {answers[t][i][:32]!r}")
        table.add_row(record.tenant, record.secret, *cells)
    return table
