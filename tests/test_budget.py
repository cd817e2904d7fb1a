"""Budgeted selection: the search's bookkeeping on a tiny model, and a real search on the ci test-bed."""

import pytest
import torch

from depn_serve.aggregation import tally_file, vote_order
from depn_serve.arch import load_model
from depn_serve.budget import BudgetSettings, budgeted_selection
from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.records import load_records
from depn_serve.testbed.corpus import read_valid_texts

from .conftest import TEXTS, TINY_RECORDS

FAST = EvalSettings(exposure_samples=200)


def _search(model_dir, records, valid, order, target, budget):
    model, tokenizer = load_model(model_dir)
    shape = (model.config.num_hidden_layers, model.config.intermediate_size)
    return budgeted_selection(model, tokenizer, records, valid, order, shape,
                              BudgetSettings(target_exposure=target, ppl_budget=budget), FAST)


def test_already_protected_needs_no_neuron(tiny_model_dir):
    records = [r for r in TINY_RECORDS if r.tenant == "acme"]
    off, report = _search(tiny_model_dir, records, TEXTS[:3], torch.arange(50), target=1000.0, budget=1.0)
    assert report.neurons == 0 and not off.any() and report.all_protected
    assert [p.neurons for p in report.points] == [0]


def test_unreachable_target_reports_what_still_leaks(tiny_model_dir):
    records = [r for r in TINY_RECORDS if r.kind == "phone"]
    off, report = _search(tiny_model_dir, records, TEXTS[:3], torch.arange(20), target=1e-9, budget=1e6)
    assert not report.all_protected and report.unprotected == [records[0].id]
    assert report.neurons == 20 == int(off.sum())  # every candidate, all within the (huge) budget
    assert [p.neurons for p in report.points] == [0, 1, 2, 4, 8, 16, 20]


@pytest.mark.slow
def test_budgeted_mask_is_the_smallest_prefix_that_protects(ci_testbed, ci_mask):
    tenant, mask_path = ci_mask
    tally, _ = tally_file(mask_path.parent / "scores.safetensors", tenant)
    records = [r for r in load_records(ci_testbed / "records.jsonl", tenant) if r.kind == "phone"]
    valid = read_valid_texts(ci_testbed / "valid.txt")
    off, report = _search(ci_testbed / "model", records, valid, vote_order(tally), target=29.0, budget=20.0)
    print(report.model_dump_json(indent=1, exclude={"records"}))
    points = {p.neurons: p for p in report.points}
    assert report.all_protected and report.ppl_change_pct <= 20.0 and int(off.sum()) == report.neurons > 0
    smaller = points.get(report.neurons - 1)
    assert report.neurons == 1 or (smaller is not None and smaller.protected < len(records))


def test_budgeted_mode_needs_all_its_options(tmp_path):
    from click.testing import CliRunner

    from depn_serve.cli import main

    scores = tmp_path / "scores.safetensors"
    scores.write_bytes(b"x")
    result = CliRunner().invoke(main, ["aggregate", str(scores), "--tenant", "acme", "--method", "vote",
                                       "--target-exposure", "20",
                                       "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code != 0 and "budgeted mode needs" in result.output
