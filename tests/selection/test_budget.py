"""Budgeted selection: the search's bookkeeping on a tiny model, and a real search on the ci test-bed."""

import pytest
import torch

from depn_serve.core.selectors import MaskPolicy
from depn_serve.artifacts.mask import first_n
from depn_serve.core.arch import load_model, mlp_shape
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import read_texts
from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.selection import METHODS, Selection, SelectionInputs, inputs_from_files, select
from depn_serve.selection.budget import BudgetSettings, budgeted_selection
from depn_serve.selection.vote import VoteSettings
from tests.helpers import TEXTS, TINY_RECORDS

FAST = EvalSettings(exposure_samples=200)


def _search(model_dir, records, valid, order, target, budget):
    """Budgeted search over prefixes of `order` (flat neuron indices) for `records`; returns (off, report)."""
    model, tokenizer = load_model(model_dir)
    shape = mlp_shape(model.config)
    inputs = SelectionInputs(shape=shape, fingerprint=model_fingerprint(model_dir), target_ids=[r.id for r in records],
                             targets=records, model=model, tokenizer=tokenizer)
    selection = Selection(METHODS["vote"], VoteSettings(), order, first_n(order, len(order), shape.dims), {}, 0.0,
                          "depn-vote")
    chosen, report = budgeted_selection(inputs, selection, valid,
                                        BudgetSettings(target_exposure=target, ppl_budget=budget), FAST)
    assert chosen.label == "depn-vote-budgeted" and torch.equal(chosen.order, order)
    assert torch.equal(chosen.off, first_n(order, report.neurons, shape.dims))
    return chosen.off, report


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
    # The vote order over all the tenant's scored records; the search protects its phone records.
    inputs = inputs_from_files(MaskPolicy.own_records(tenant), mask_path.parent / "scores.safetensors",
                               records_path=ci_testbed / "records.jsonl")
    order = select(inputs, "vote").order
    records = [r for r in inputs.targets if r.kind == "phone"]
    valid = read_texts(ci_testbed / "valid.txt")
    off, report = _search(ci_testbed / "model", records, valid, order, target=29.0, budget=20.0)
    print(report.model_dump_json(indent=1, exclude={"records"}))
    points = {p.neurons: p for p in report.points}
    within = [p for p in report.points if p.within_budget]
    assert int(off.sum()) == report.neurons > 0 and report.ppl_change_pct <= 20.0
    # Whether all six can be protected within +20 % depends on the bed, whose weights differ in their last bits
    # between CPUs: on one host's bed they are, on another's one stays above 29 bits at 256 neurons. The search
    # must be right either way, and protect most of them.
    if report.all_protected:  # the smallest prefix that protects them all
        smaller = points.get(report.neurons - 1)
        assert report.neurons == 1 or (smaller is not None and smaller.protected < len(records))
    else:  # no size within the budget protects them all; the largest within it is kept, and says what still leaks
        assert report.unprotected and all(p.protected < len(records) for p in within)
        assert report.neurons == max(p.neurons for p in within)
        assert report.neurons == report.candidates or any(p.neurons > report.neurons for p in report.points)
    assert len(records) - len(report.unprotected) > len(records) / 2


def test_budgeted_mode_needs_all_its_options(tmp_path):
    from click.testing import CliRunner

    from depn_serve.cli import main

    scores = tmp_path / "scores.safetensors"
    scores.write_bytes(b"x")
    result = CliRunner().invoke(main, ["aggregate", str(scores), "--tenant", "acme", "--method", "vote",
                                       "--target-exposure", "20",
                                       "--out", str(tmp_path / "m.safetensors")])
    assert result.exit_code != 0 and "budgeted mode needs" in result.output
