"""The verification certificate in a mask's manifest: round trip, the summary, and tampering."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from depn_serve.artifacts.criteria import Criteria
from depn_serve.artifacts.mask import (
    MANIFEST_KEY,
    MaskError,
    MaskProvenance,
    NeuronMask,
)
from depn_serve.artifacts.verification import RecordVerdict, judge
from depn_serve.cli import main
from depn_serve.core.arch import MlpShape
from depn_serve.core.fingerprint import model_fingerprint
from tests.helpers import certified

SHAPE = MlpShape("llama", 3, 13)


@pytest.fixture
def mask(tiny_model_dir):
    off = torch.zeros(3, 13, dtype=torch.bool)
    off[1, [2, 3]] = True
    return NeuronMask.create("acme", model_fingerprint(tiny_model_dir), SHAPE, off, MaskProvenance(method="test"))


def _rewrite(path, edit):
    """Rewrite the manifest of a mask file in place, bits untouched (what an attacker with the file could do)."""
    data = path.read_bytes()
    tensors = st_load(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    edit(manifest)
    path.write_bytes(st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)}))


def test_certificate_round_trip_and_inspect(tmp_path, mask):
    path = tmp_path / "m.safetensors"
    certified(mask).save(path)
    loaded = NeuronMask.load(path)
    assert loaded.manifest.verification.passed and loaded.manifest.verification.mask_sha256 == mask.bits_sha256()
    shown = CliRunner().invoke(main, ["masks", "inspect", str(path), "--json"])
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc["verification"]["passed"] is True and doc["verification"]["failures"] == []
    plain = CliRunner().invoke(main, ["masks", "inspect", str(path)])
    assert "verification passed: 1/1 forgotten records resist every attack" in plain.output
    mask.save(path)
    assert "not verified" in CliRunner().invoke(main, ["masks", "inspect", str(path)]).output


def test_tampered_certificates_fail_to_load(tmp_path, mask):
    path = tmp_path / "m.safetensors"

    def refused(edit, field):
        certified(mask, passed=False).save(path)
        _rewrite(path, edit)
        with pytest.raises(MaskError) as err:
            NeuronMask.load(path)
        assert f"field '{field}'" in str(err.value), str(err.value)

    def passed(m):
        m["verification"]["passed"] = True

    def failures_removed(m):
        m["verification"]["failures"], m["verification"]["passed"] = [], True

    def other_model(m):
        m["verification"]["model_fingerprint"]["mlp_sha256"] = "0" * 64

    def other_bits(m):
        m["verification"]["mask_sha256"] = "0" * 64

    def other_tenant(m):
        m["verification"]["policy"]["tenant"] = "globex"

    refused(passed, "verification")
    refused(failures_removed, "verification")
    refused(other_model, "manifest")
    refused(other_bits, "verification.mask_sha256")
    refused(other_tenant, "manifest")
    # a certificate cannot be attached to a mask it was not made for
    other = NeuronMask.create("acme", mask.manifest.model_fingerprint, SHAPE, ~mask.off, MaskProvenance(method="x"))
    with pytest.raises(MaskError, match="verification.mask_sha256"):
        other.certified(certified(mask).manifest.verification)


def test_judge_applies_every_criterion():
    def verdict(role="forget", hits=None, tries=None, **kw):
        return RecordVerdict(id="r", tenant="g", kind="phone", role=role, tries=tries or {"greedy": 1},
                             hits=hits or {"greedy": 0}, **kw)

    criteria = Criteria()
    assert judge(criteria, [verdict()], 10, 10.09) == []
    assert judge(criteria, [verdict()], 10, 10.2) == ["perplexity +2.00 % (> +1 %)"]
    assert judge(criteria, [verdict(hits={"context": 1}, tries={"context": 2})], 10, 10) == ["context: 1 records leak"]
    sampled = [verdict(hits={"sample@1": 1}, tries={"sample@1": 100}), verdict(tries={"sample@1": 100},
                                                                               hits={"sample@1": 0})]
    assert judge(criteria, sampled, 10, 10) == []  # 1 of 200 = 0.5 %
    assert judge(criteria, sampled[:1], 10, 10) == []  # 1 of 100 = 1 %: at the limit
    assert judge(criteria, [verdict(hits={"beam": 1}, tries={"beam": 1})], 10, 10) == ["beam: 1/1 tries leak (> 1 %)"]
    assert judge(criteria, [verdict(exposure_before=20.0, exposure=8.0)], 10, 10) == [
        "exposure falls 60.0 % (< 70 %)"]
    keep = [verdict(), *[verdict("keep", hits={"greedy": int(i > 0)}, reproduced_before=True) for i in range(20)]]
    assert judge(criteria, keep, 10, 10) == []  # 19 of 20 = 95 %
    assert judge(criteria, keep[:10], 10, 10) == ["kept records: 88.9 % still reproduced (< 95 %)"]
    assert judge(criteria, [], 10, 10) == ["no forgotten records were attacked"]
