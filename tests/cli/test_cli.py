"""The `depn` commands end to end on a tiny random model (seconds)."""

import json

from click.testing import CliRunner

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.cli import main


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_detect_aggregate_inspect_eval(tmp_path, tiny_model_dir, tiny_records_file):
    scores = tmp_path / "scores.safetensors"
    res = _run("detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--tenant", "acme",
               "--steps", "4", "--layers", "1:", "--out", scores)
    assert res.exit_code == 0, res.output
    assert "scored 2 records" in res.output

    mask_path = tmp_path / "mask.safetensors"
    res = _run("aggregate", scores, "--tenant", "acme", "--method", "vote", "--top-z", "7", "--out", mask_path)
    assert res.exit_code == 0, res.output
    mask = NeuronMask.load(mask_path)
    assert mask.manifest.neuron_count == 7 and mask.manifest.neurons_per_layer[0] == 0  # layer 0 not attributed
    assert mask.manifest.provenance.detector["layers"] == [1, 2]

    res = _run("masks", "inspect", mask_path, "--json")
    doc = json.loads(res.output)
    assert doc["tenant"] == "acme" and sum(len(v) for v in doc["neurons"].values()) == 7
    plot = tmp_path / "layers.png"
    res = _run("masks", "inspect", mask_path, "--plot", plot)
    assert "7 neurons masked" in res.output and plot.read_bytes()[:4] == b"\x89PNG"

    valid = tmp_path / "valid.txt"
    valid.write_text("Hello team, the meeting is moved to Monday.\n\nRegards, Bob\n")
    out_json = tmp_path / "eval.json"
    res = _run("eval", "--model", tiny_model_dir, "--records", tiny_records_file, "--valid", valid,
               "--mask", mask_path, "--exposure-samples", "100", "--json", out_json)
    assert res.exit_code == 0, res.output
    report = json.loads(out_json.read_text())
    assert [s["name"] for s in report["states"]] == ["before", "after", "random"]
    assert report["target_tenant"] == "acme" and report["states"][2]["neurons"] == 7
    assert "validation perplexity" in res.output


def test_aggregate_fit(tmp_path, tiny_model_dir, tiny_records_file):
    """The default method end to end: a fitted mask whose provenance says how it was made."""
    scores = tmp_path / "scores.safetensors"
    assert _run("detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--steps", "2",
                "--out", scores).exit_code == 0
    keep = tmp_path / "mail.txt"
    keep.write_text("Hello team, the meeting is moved to Monday.\n\nRegards, Bob\n")
    mask_path = tmp_path / "fit.safetensors"
    res = _run("aggregate", scores, "--tenant", "acme", "--model", tiny_model_dir, "--records", tiny_records_file,
               "--keep-text", keep, "--fit-steps", "3", "--fit-rounds", "2", "--top-z", "5", "--out", mask_path)
    assert res.exit_code == 0, res.output
    mask = NeuronMask.load(mask_path)
    assert mask.manifest.neuron_count == 5 and mask.manifest.provenance.method == "depn-fit"
    assert mask.manifest.provenance.aggregator["rounds"] in (1, 2)  # stops early when nothing leaks
    assert mask.manifest.provenance.aggregator["steps"] == 3 and mask.manifest.provenance.aggregator["keep_records"] == 2
    # the fit's summary: 2 target records, 2 kept records (the other tenant's)
    assert "depn-fit: 5 neurons" in res.output and "(keep_records 2," in res.output
    assert "5 neurons from 2 records" in res.output


def test_errors_are_clear(tmp_path, tiny_model_dir, tiny_records_file):
    res = _run("detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--tenant", "nobody",
               "--out", tmp_path / "s.safetensors")
    assert res.exit_code != 0 and "no records of tenant 'nobody'" in res.output
    res = _run("detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--layers", "7:9",
               "--out", tmp_path / "s.safetensors")
    assert res.exit_code != 0 and "--layers" in res.output
    res = _run("detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--steps", "0",
               "--out", tmp_path / "s.safetensors")
    assert res.exit_code == 1 and "field 'steps'" in res.output and "greater than or equal to 1" in res.output
    assert not (tmp_path / "s.safetensors").exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    res = _run("masks", "inspect", bad)
    assert res.exit_code != 0 and str(bad) in res.output and "'file'" in res.output


def test_isolate_verify_and_the_matrix(tmp_path, tiny_model_dir, tiny_records_file):
    from depn_serve.core.records import write_texts
    from tests.helpers import TEXTS

    text = tmp_path / "text.txt"
    write_texts(TEXTS[:3], text)
    out = tmp_path / "isolation"
    fast = ["--fit-steps", 3, "--fit-rounds", 2, "--attack-samples", 2, "--beam-width", 3]
    res = _run("isolate", "--model", tiny_model_dir, "--records", tiny_records_file, "--keep-text", text,
               "--valid", text, "--out", out, *fast)
    report = json.loads((out / "isolation.json").read_text())
    assert [row["tenant"] for row in report["tenants"]] == ["acme", "globex"]
    for row in report["tenants"]:  # own records lost, per kind, against what the certificate says of each record
        own = [r for r in NeuronMask.load(out / f"{row['tenant']}.safetensors").manifest.verification.keep()
               if r.reproduced_before]
        assert row["kept"] == sum(bool(r.hits["greedy"]) for r in own) and row["kept_before"] == len(own), row
        assert set(row["lost"]) <= {r.kind for r in own if not r.hits["greedy"]}, row
    assert res.exit_code == (0 if all(row["passed"] for row in report["tenants"]) else 1), res.output
    assert "isolation masks (fit design)" in res.output and "s per tenant" in res.output
    for tenant, other in (("acme", "globex"), ("globex", "acme")):
        mask = NeuronMask.load(out / f"{tenant}.safetensors")
        v = mask.manifest.verification
        assert mask.manifest.tenant == tenant and v.policy.forget == (f"tenant!={tenant}",)
        assert {r.tenant for r in v.forget()} == {other} and {r.tenant for r in v.keep()} == {tenant}
        assert v.attacks["samples"] == 2 and {"greedy", "sample@1", "beam", "substitution"} <= set(v.forget()[0].tries)

    # verify: any mask, any policy; the certificate replaces the old one; exit 1 when it fails.
    checked = tmp_path / "checked.safetensors"
    res = _run("verify", out / "acme.safetensors", "--model", tiny_model_dir, "--records", tiny_records_file,
               "--valid", text, "--forget", "kind=phone", "--out", checked, "--attack-samples", 2)
    v = NeuronMask.load(checked).manifest.verification
    assert [r.id for r in v.forget()] == ["p1"] and {r.id for r in v.keep()} == {"n1", "e1", "i1"}
    assert res.exit_code == (0 if v.passed else 1) and "certificate written into" in res.output
    res = _run("verify", out / "acme.safetensors", "--model", tiny_model_dir, "--records", tiny_records_file,
               "--valid", text, "--keep", "kind=phone")
    assert res.exit_code == 1 and "--keep needs --forget" in res.output

    union = tmp_path / "union"
    res = _run("isolate", "--model", tiny_model_dir, "--records", tiny_records_file, "--keep-text", text,
               "--valid", text, "--out", union, "--design", "union", "--tenant", "globex", *fast)
    assert "isolation masks (union design)" in res.output and not (union / "acme.safetensors").exists()
    manifest = NeuronMask.load(union / "globex.safetensors").manifest
    assert manifest.provenance.method == "depn-fit-union"
    assert manifest.provenance.aggregator["union_of"] == ["forget tenant=acme"]
    report = json.loads((union / "isolation.json").read_text())  # globex's own records were never fitted
    assert report["fit_seconds"] == report["tenants"][0]["fit_seconds"] > 0
    res = _run("isolate", "--model", tiny_model_dir, "--records", tiny_records_file, "--keep-text", text,
               "--valid", text, "--out", union, "--tenant", "initech", *fast)
    assert res.exit_code == 1 and "tenants ['initech'] have no records" in res.output

    plot, matrix_json = tmp_path / "matrix.png", tmp_path / "matrix.json"
    res = _run("eval", "--model", tiny_model_dir, "--records", tiny_records_file, "--matrix", out, "--samples", 2,
               "--plot", plot, "--json", matrix_json)
    assert res.exit_code == 0, res.output
    matrix = json.loads(matrix_json.read_text())
    assert matrix["requesters"] == ["(no mask)", "acme", "globex"] and matrix["owners"] == ["acme", "globex"]
    assert len(matrix["cells"]) == 6 and plot.read_bytes()[:4] == b"\x89PNG"


def test_aggregate_with_a_policy(tmp_path, tiny_model_dir, tiny_records_file):
    scores = tmp_path / "scores.safetensors"
    assert _run("detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--steps", 2,
                "--out", scores).exit_code == 0
    mask_path = tmp_path / "m.safetensors"
    res = _run("aggregate", scores, "--tenant", "acme", "--forget", "tenant!=acme", "--keep", "tenant=acme",
               "--method", "vote", "--records", tiny_records_file, "--out", mask_path)
    assert res.exit_code == 0, res.output
    manifest = NeuronMask.load(mask_path).manifest
    assert manifest.provenance.policy.forget == ("tenant!=acme",) and manifest.provenance.records == 2
    assert manifest.made_for == "acme" and "made for tenant 'acme'" in res.output  # an isolation mask
    res = _run("aggregate", scores, "--tenant", "acme", "--method", "vote", "--out", mask_path)
    assert NeuronMask.load(mask_path).manifest.made_for is None and "made for any tenant" in res.output
    res = _run("aggregate", scores, "--tenant", "acme", "--for", "globex", "--method", "vote", "--out", mask_path)
    assert res.exit_code == 0 and NeuronMask.load(mask_path).manifest.made_for == "globex"
    assert "made for tenant globex" in _run("masks", "inspect", mask_path).output
    res = _run("aggregate", scores, "--tenant", "acme", "--for", "globex", "--forget", "tenant!=acme", "--method",
               "vote", "--records", tiny_records_file, "--out", mask_path)
    assert res.exit_code == 1 and "an isolation mask is made for that tenant" in res.output
    res = _run("aggregate", scores, "--tenant", "acme", "--forget", "tenant!=acme", "--method", "vote",
               "--out", mask_path)
    assert res.exit_code == 1 and "needs the records file (--records)" in res.output
    res = _run("aggregate", scores, "--tenant", "acme", "--forget", "owner=x", "--method", "vote",
               "--records", tiny_records_file, "--out", mask_path)
    assert res.exit_code == 1 and "field 'owner'" in res.output
