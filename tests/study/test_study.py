"""Studies and the report: training checkpoints, the HTML page, and real studies on the ci test-bed."""

import json

import pytest
import torch
from click.testing import CliRunner

from depn_serve.cli import main
from depn_serve.study.common import StudyResult, StudyTable, write_study
from depn_serve.study.figures import plot_batch_size
from depn_serve.study.scaling import parse_size
from depn_serve.testbed import train_tokenizer
from depn_serve.testbed.profiles import ProfileSpec
from depn_serve.testbed.train import make_model, train

from tests.helpers import TEXTS

TINY_SPEC = ProfileSpec(tenants=("a",), records_per_tenant_kind=1, filler_emails=1, valid_emails=1, vocab_size=400,
                        hidden=64, layers=2, intermediate=96, heads=2, steps=6, batch_size=2, lr=1e-3,
                        warmup_steps=2, block_size=32)


def _trained(checkpoint=None, steps=frozenset()):
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    docs = [tokenizer(t)["input_ids"] for t in TEXTS[:6]]
    torch.manual_seed(0)
    model = make_model(TINY_SPEC, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                       tokenizer.pad_token_id)
    train(model, docs, TINY_SPEC, seed=0, progress=False, checkpoint=checkpoint, checkpoint_steps=steps)
    return model


def test_checkpoints_are_saved_at_their_steps_without_changing_training():
    seen = []
    with_checkpoints = _trained(seen.append, frozenset({2, 4}))
    plain = _trained()
    assert seen == [2, 4]
    for (name, a), (_, b) in zip(with_checkpoints.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_size_parsing():
    assert parse_size("256x4x1024") == {"hidden": 256, "layers": 4, "intermediate": 1024, "heads": 4}
    with pytest.raises(ValueError, match="HIDDENxLAYERSxINTERMEDIATE"):
        parse_size("256-4")


def _study(tmp_path, name="batch_size"):
    runs = [{"records": n, "target": {"exposure_change_pct": -10.0 * n}, "ppl_change_pct": 0.5 * n}
            for n in (1, 2, 3)]
    plot_batch_size(runs, tmp_path / f"{name}.png")
    result = StudyResult(study=name, title="Edit batch size <check escaping>", question="Q?", testbed="bed",
                         settings={"sizes": [1, 2, 3]},
                         tables=[StudyTable(title="t", columns=["records", "exposure %"],
                                            rows=[[1, -10.0], [2, -20.0], [3, None]])],
                         findings=["one finding"], plots=[f"{name}.png"], data={"runs": runs}, seconds=1.0)
    return write_study(tmp_path, result)


def test_report_embeds_every_study_with_its_figure(tmp_path):
    _study(tmp_path)
    (tmp_path / "unrelated.json").write_text("{}")  # not a study name: ignored
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "Edit batch size &lt;check escaping&gt;" in page and "<td>-20.00</td>" in page and "<td>-</td>" in page
    assert page.count("data:image/png;base64,") == 1 and "one finding" in page


def test_report_refuses_a_broken_study_and_an_empty_folder(tmp_path):
    path = _study(tmp_path, "methods")
    data = json.loads(path.read_text())
    del data["tables"]
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert result.exit_code != 0 and "methods.json: not a study result" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty), "--out", str(tmp_path / "r.html")])
    assert result.exit_code != 0 and "no study results" in result.output
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_studies_on_the_ci_testbed(ci_testbed, tmp_path):
    """Real studies (the fast vote method) end to end, then the report; the numbers must hang together."""
    out = tmp_path / "results"
    runner = CliRunner()
    for args in (["frequency", "--method", "vote"], ["neurons", "--methods", "vote"]):
        result = runner.invoke(main, ["study", args[0], str(ci_testbed), *args[1:], "--out", str(out)])
        assert result.exit_code == 0, result.output
    frequency = json.loads((out / "frequency.json").read_text())
    records = [json.loads(line) for line in (ci_testbed / "records.jsonl").read_text().splitlines()]
    assert sum(b["records"] for b in frequency["data"]["buckets"]) == len(records)
    targets = [b for b in frequency["data"]["buckets"] if b["group"] == "target"]
    assert sum(b["records"] for b in targets) == sum(r["tenant"] == records[0]["tenant"] for r in records)
    neurons = json.loads((out / "neurons.json").read_text())
    per_layer = neurons["tables"][0]["rows"]
    assert all(row[1] == sum(row[2:]) for row in per_layer)
    overlap = neurons["data"]["overlap"]
    assert all(0.0 <= v <= 1.0 for v in overlap.values())
    assert (out / "frequency.png").stat().st_size > 1000 and (out / "neurons.png").stat().st_size > 1000
    result = runner.invoke(main, ["report", str(out), "--out", str(tmp_path / "report.html")])
    assert result.exit_code == 0 and "2 studies" in result.output
