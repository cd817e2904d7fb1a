"""`--ray`: detect, aggregate and isolate on a real Ray cluster (a head started here, 2 worker CPUs) give the same
results as the single-process run, bit for bit."""

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.artifacts.scores import ScoresFile
from depn_serve.cli import main
from tests.helpers import TEXTS

# not imported here: Ray reads RAY_AUTH_MODE when it is first imported, which must come after the fixture sets it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is in the dev extra: pip install -e '.[dev]'")


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on this machine with two CPUs and token authentication, as an operator would start one (`ray
    start --head`, with the cluster's token in a file of its own); this process connects as a driver with that
    token. Nothing is read from `~/.ray`, so the test runs on a machine that never ran Ray."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = tmp_path_factory.mktemp("ray")
    (temp / "auth_token").write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "auth_token")}
    subprocess.run([ray_bin, "start", "--head", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                    "--temp-dir", str(temp)], check=True, capture_output=True, timeout=120, env={**os.environ, **auth})
    before = {name: os.environ.get(name) for name in auth}
    os.environ.update(auth)
    # A Ray task computes on one thread (`core.cluster`); the one-process runs compared with it must too: on some
    # CPUs a matrix product's sums come out in another order on two threads, and the claim is bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield f"{socket.gethostbyname(socket.gethostname())}:{port}"
    finally:
        torch.set_num_threads(threads)
        for name, value in before.items():
            os.environ.pop(name) if value is None else os.environ.update({name: value})
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _scores(path: Path) -> dict[str, torch.Tensor]:
    file = ScoresFile(path)
    return dict(file.iter_scores(file.record_ids()))


def test_detect_and_aggregate_on_ray_equal_one_process(tmp_path, tiny_model_dir, tiny_records_file, cluster):
    here, there = tmp_path / "here.safetensors", tmp_path / "there.safetensors"
    detect = ["detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--steps", 3, "--shard-records", 1]
    _run(*detect, "--out", here)
    res = _run(*detect, "--ray", cluster, "--out", there)
    assert "scored 4 records" in res.output
    a, b = _scores(here), _scores(there)
    assert list(a) == list(b) and len(a) == 4
    assert all(torch.equal(a[r], b[r]) and a[r].abs().sum() > 0 for r in a)

    keep = tmp_path / "keep.txt"
    keep.write_text("\n\n".join(TEXTS[:3]))
    masks = {}
    for where in ("here", "there"):
        out = tmp_path / f"{where}-mask.safetensors"
        ray_args = ["--ray", cluster] if where == "there" else []
        _run("aggregate", here, "--tenant", "acme", "--model", tiny_model_dir, "--records", tiny_records_file,
             "--keep-text", keep, "--fit-steps", 3, "--fit-rounds", 2, "--top-z", 5, *ray_args, "--out", out)
        masks[where] = NeuronMask.load(out)
    assert torch.equal(masks["here"].off, masks["there"].off) and masks["here"].manifest.neuron_count == 5
    assert masks["here"].manifest.provenance.method == masks["there"].manifest.provenance.method == "depn-fit"


@pytest.mark.parametrize("design", ["fit", "union"])
def test_isolate_on_ray_equals_one_process(tmp_path, tiny_model_dir, tiny_records_file, cluster, design):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS[:3]))
    fast = ["--fit-steps", 3, "--fit-rounds", 2, "--attack-samples", 2, "--beam-width", 3]
    isolate = ["isolate", "--model", tiny_model_dir, "--records", tiny_records_file, "--keep-text", text, "--valid",
               text, "--design", design, *fast]
    for where, extra in (("here", []), ("there", ["--ray", cluster])):
        result = CliRunner().invoke(main, [str(a) for a in [*isolate, *extra, "--out", tmp_path / where]])
        assert result.exit_code in (0, 1) and "isolation masks" in result.output, result.output
    for tenant in ("acme", "globex"):
        a, b = (NeuronMask.load(tmp_path / w / f"{tenant}.safetensors") for w in ("here", "there"))
        assert torch.equal(a.off, b.off)
        va, vb = a.manifest.verification, b.manifest.verification
        assert va.model_dump(exclude={"seconds", "created_at"}) == vb.model_dump(exclude={"seconds", "created_at"})
    reports = [json.loads((tmp_path / w / "isolation.json").read_text()) for w in ("here", "there")]
    for report in reports:
        for row in report["tenants"]:
            row.pop("fit_seconds"), row.pop("verify_seconds")
    assert reports[0]["tenants"] == reports[1]["tenants"]


def test_ray_local_starts_an_instance_of_its_own(tmp_path, tiny_model_dir, tiny_records_file):
    detect = ["detect", "--model", tiny_model_dir, "--records", tiny_records_file, "--steps", 2, "--shard-records", 2]
    _run(*detect, "--out", tmp_path / "here.safetensors")
    _run(*detect, "--ray", "local", "--out", tmp_path / "local.safetensors")
    a, b = _scores(tmp_path / "here.safetensors"), _scores(tmp_path / "local.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[r], b[r]) for r in a)


def test_ray_errors_are_clear(tmp_path, tiny_model_dir, tiny_records_file):
    result = CliRunner().invoke(main, ["detect", "--model", str(tiny_model_dir), "--records", str(tiny_records_file),
                                       "--ray", "no-such-address", "--out", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 1 and "--ray no-such-address: could not connect" in result.output, result.output
    assert not (tmp_path / "s.safetensors").exists()
