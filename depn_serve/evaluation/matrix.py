"""The cross-tenant matrix: for each requesting tenant's view of the model (its mask, or its API key), how many
of each owner's records come out. Isolation is a matrix with the diagonal as before and zeros elsewhere.

Rows are requesters, columns owners; each cell holds greedy extraction (the training prompt; near misses
included, and character for character) and sampled extraction (share of `samples` continuations at temperature
`temperature` that reproduce the secret, near misses included). The HF path (`depn eval --matrix`) and the API path (the demo, through `depn serve`) run the same
attacks through an `Oracle`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.table import Table

from depn_serve.artifacts.mask import MaskError, NeuronMask
from depn_serve.core.arch import load_model, mlp_shape
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import PrivateRecord, load_records
from depn_serve.editing import masked
from depn_serve.evaluation.attacks import AttackSettings, ModelOracle, Oracle, reproduces, run_attacks

PLAIN = "(no mask)"


class MatrixSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    samples: int = Field(10, ge=0, description="sampled continuations per record")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    near_miss: int = Field(2, ge=0, description="characters a continuation may get wrong in place and still leak")
    seed: int = 0

    def attacks(self) -> AttackSettings:
        return AttackSettings(paraphrases=False, contexts=0, samples=self.samples, temperatures=(self.temperature,),
                              beam_width=0, exposure=False, near_miss=self.near_miss, seed=self.seed)


class MatrixCell(BaseModel):
    requester: str
    owner: str
    records: int
    greedy: float  # share of the owner's records greedy decoding reproduces, near misses included
    greedy_exact: float  # ... character for character (what "getting one's own records back" means)
    sampled: float | None  # share of sampled continuations that reproduce a secret, near misses included

    @property
    def shown(self) -> float:
        """The greedy figure tables and heatmaps show: exact for one's own records, near misses for others'."""
        return self.greedy_exact if self.requester == self.owner else self.greedy


class IsolationMatrix(BaseModel):
    settings: MatrixSettings
    requesters: list[str]
    owners: list[str]
    cells: list[MatrixCell]
    path: str = Field(description="how the model was reached: 'hf' or the server's URL")

    def cell(self, requester: str, owner: str) -> MatrixCell:
        return next(c for c in self.cells if c.requester == requester and c.owner == owner)


def isolation_matrix(
    views: Sequence[tuple[str, Callable[[], AbstractContextManager[Oracle]]]], tokenizer,
    records: Sequence[PrivateRecord], settings: MatrixSettings | None = None, path: str = "hf",
    progress: Callable[[], None] | None = None,
) -> IsolationMatrix:
    """`views`: (requester, a context manager giving the model as that requester sees it) in row order."""
    settings = settings or MatrixSettings()
    owners = sorted({r.tenant for r in records})
    cells = []
    for requester, view in views:
        with view() as oracle:
            report = run_attacks(oracle, tokenizer, records, (), (), settings.attacks())
        secrets = {r.id: r.secret for r in records}
        for owner in owners:
            rows = [r for r in report.records if r.tenant == owner]
            sample_tries = sum(r.tries.get(f"sample@{settings.temperature:g}", 0) for r in rows)
            sample_hits = sum(r.hits.get(f"sample@{settings.temperature:g}", 0) for r in rows)
            cells.append(MatrixCell(
                requester=requester, owner=owner, records=len(rows),
                greedy=sum(r.hits["greedy"] for r in rows) / len(rows),
                greedy_exact=sum(reproduces(r.greedy_text, secrets[r.id], 0) for r in rows) / len(rows),
                sampled=sample_hits / sample_tries if sample_tries else None))
        if progress:
            progress()
    return IsolationMatrix(settings=settings, requesters=[name for name, _ in views], owners=owners, cells=cells,
                           path=path)


def matrix_from_masks(model_dir: Path, records_path: Path, masks_dir: Path, settings: MatrixSettings | None = None,
                      device: str = "cpu", progress: Callable[[], None] | None = None) -> IsolationMatrix:
    """The HF reference matrix: the plain model, then each tenant of the records file with `masks_dir/<tenant>
    .safetensors` (every tenant needs one; each is checked against the model)."""
    records = load_records(records_path)
    model, tokenizer = load_model(model_dir, device)
    fingerprint, shape = model_fingerprint(model_dir), mlp_shape(model.config)
    masks = {}
    for tenant in sorted({r.tenant for r in records}):
        path = Path(masks_dir) / f"{tenant}.safetensors"
        mask = NeuronMask.load(path)
        mask.check_model(fingerprint, shape, source=path)
        if mask.manifest.tenant != tenant:
            raise MaskError(path, "tenant", repr(tenant), repr(mask.manifest.tenant))
        masks[tenant] = mask.off

    def view(off: torch.Tensor | None):
        @contextmanager
        def enter():
            with masked(model, off) if off is not None else nullcontext():
                yield ModelOracle(model, tokenizer)
        return enter

    views = [(PLAIN, view(None)), *((tenant, view(off)) for tenant, off in masks.items())]
    return isolation_matrix(views, tokenizer, records, settings, "hf", progress)


def render_matrix(matrix: IsolationMatrix, title: str) -> Table:
    """Rows: the requesting key; columns: whose records; cells: greedy / sampled extraction (own records: greedy
    character for character; others': near misses count)."""
    s = matrix.settings
    table = Table(title=f"{title}: records reproduced, greedy / sampled ({s.samples} at T = {s.temperature:g})")
    table.add_column("requesting key \\ whose records")
    for owner in matrix.owners:
        table.add_column(owner, justify="right")
    for requester in matrix.requesters:
        table.add_row(requester, *(_cell(matrix.cell(requester, owner)) for owner in matrix.owners))
    return table


def _cell(cell: MatrixCell) -> str:
    sampled = "" if cell.sampled is None else f" / {100 * cell.sampled:.1f} %"
    return f"{100 * cell.shown:.0f} %{sampled}"
