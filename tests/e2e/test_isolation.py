"""Isolation end to end on the `ci` test-bed: `depn isolate` builds one certified mask per tenant, the HF matrix
shows each tenant its own records and nobody else's, and `depn serve` gives the same answers through the API.

The fit is CI-sized: 3 fit-then-attack rounds where `depn isolate` runs up to 6 (the README's figures come from
the default, on three seeds). The figures are printed (run with -s, or read the JSON written to $DEPN_RESULTS_DIR
when set).
"""

import json
import os
import secrets
from contextlib import nullcontext
from pathlib import Path

import pytest
from rich.console import Console

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.core.arch import load_model, load_tokenizer
from depn_serve.core.records import encode_record, load_records
from depn_serve.editing import masked
from depn_serve.evaluation.attacks import ModelOracle, beam_search
from depn_serve.serving.process import ServerProcess
from depn_serve.evaluation.matrix import PLAIN, MatrixSettings, isolation_matrix, matrix_from_masks, render_matrix
from depn_serve.evaluation.remote import ApiOracle
from depn_serve.selection.fit import FitSettings
from depn_serve.selection.isolation import isolate, render_isolation
from depn_serve.serving.client import AdminClient
from depn_serve.serving.server.tenants import TenantsConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def isolated(ci_testbed, tmp_path_factory):
    out = tmp_path_factory.mktemp("isolation")
    report = isolate(ci_testbed / "model", ci_testbed / "records.jsonl", ci_testbed / "train.txt",
                     ci_testbed / "valid.txt", out, fit=FitSettings(rounds=3))
    matrix = matrix_from_masks(ci_testbed / "model", ci_testbed / "records.jsonl", out)
    console = Console(width=160)
    console.print(render_isolation(report, str(out)))
    console.print(render_matrix(matrix, "HF"))
    results = os.environ.get("DEPN_RESULTS_DIR")
    if results:
        Path(results).mkdir(parents=True, exist_ok=True)
        Path(results, "isolation-ci.json").write_text(report.model_dump_json(indent=2))
        Path(results, "matrix-ci.json").write_text(matrix.model_dump_json(indent=2))
    return out, report, matrix


def test_no_tenant_gets_anyone_elses_records(isolated):
    _, _, matrix = isolated
    assert all(matrix.cell(PLAIN, owner).greedy_exact > 0.8 for owner in matrix.owners)  # the test-bed memorized them
    for requester in matrix.owners:
        for owner in matrix.owners:
            if owner != requester:
                assert matrix.cell(requester, owner).greedy == 0, matrix.cell(requester, owner)


@pytest.mark.xfail(strict=True, reason="target missed (README, 'Isolation'): on ci seed 0 the default fit keeps 86 % "
                                       "and 73 % of the tenants' own records (this CI-sized one 50 % and 73 %), the "
                                       "target is 95 %; strict, so reaching it fails here")
def test_every_tenant_keeps_its_own_records(isolated):
    _, _, matrix = isolated
    for tenant in matrix.owners:
        cell = matrix.cell(tenant, tenant)
        assert cell.greedy_exact >= 0.95 * matrix.cell(PLAIN, tenant).greedy_exact, cell


def test_every_mask_carries_its_certificate(isolated, ci_testbed):
    out, report, _ = isolated
    for row in report.tenants:
        mask = NeuronMask.load(out / f"{row.tenant}.safetensors")
        v = mask.manifest.verification
        assert v is not None and v.passed == row.passed and v.mask_sha256 == mask.bits_sha256()
        assert v.policy.forget == (f"tenant!={row.tenant}",) and len(v.forget()) == row.forget > 0
        print(row.tenant, v.summary())


def test_the_server_gives_each_key_what_the_matrix_says(isolated, ci_testbed, tmp_path):
    """Through `depn serve` (gate on unless a mask failed) and the openai client: greedy cells equal the HF ones."""
    out, report, hf = isolated
    records = load_records(ci_testbed / "records.jsonl")
    tenants = sorted({r.tenant for r in records})
    config = TenantsConfig()
    keys = {t: config.add_tenant(t, [f"{t}-isolation"]) for t in tenants}
    config.save(tmp_path / "tenants.yaml")
    (tmp_path / "admin.token").write_text(secrets.token_urlsafe(32))
    server = ServerProcess(ci_testbed / "model", tmp_path / "tenants.yaml", tmp_path / "store",
                           tmp_path / "admin.token", tmp_path / "server.log", allow_unverified=not report.passed)
    with server:
        admin = AdminClient(server.url, tmp_path / "admin.token")
        for t in tenants:
            pushed = admin.push(t, f"{t}-isolation", out / f"{t}.safetensors")
            assert pushed.verification.startswith("verification passed" if report.passed else "UNVERIFIED")
        oracles = {t: ApiOracle(server.url, keys[t]) for t in tenants}
        tokenizer = load_tokenizer(ci_testbed / "model")
        views = [(t, (lambda o=oracles[t]: nullcontext(o))) for t in tenants]
        api = isolation_matrix(views, tokenizer, records, MatrixSettings(samples=0), path=server.url)
        # The logprob beam an API client can run finds what the same beam finds on the HF model with the mask.
        model, _ = load_model(ci_testbed / "model")
        for t in tenants:
            others = [r for r in records if r.tenant != t][:4]
            prompts = [encode_record(tokenizer, r)[0] for r in others]
            lengths = [len(encode_record(tokenizer, r)[1]) for r in others]
            through_api = beam_search(oracles[t], prompts, lengths, width=5, top_k=20)
            with masked(model, NeuronMask.load(out / f"{t}.safetensors").off):
                on_hf = beam_search(ModelOracle(model, tokenizer), prompts, lengths, width=5, top_k=20)
            assert [b[0] for b in through_api] == [b[0] for b in on_hf]
    print(json.dumps([c.model_dump() for c in api.cells]))
    for cell in api.cells:
        assert cell.greedy == hf.cell(cell.requester, cell.owner).greedy, cell
