"""End to end on the `ci` test-bed: build -> detect -> aggregate -> evaluate, asserting the issue's bars.

The figures are printed (run with -s, or read the JSON written to $DEPN_RESULTS_DIR when set).
"""

import json
import os
from pathlib import Path

import pytest

from depn_serve.artifacts.mask import NeuronMask
from depn_serve.evaluation.metrics import EvalSettings
from depn_serve.evaluation.report import render_table
from depn_serve.evaluation.run import evaluate
from depn_serve.testbed import load_testbed_info

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(ci_testbed, ci_mask):
    records = ci_testbed / "records.jsonl"
    tenant, mask_path = ci_mask
    mask = NeuronMask.load(mask_path)
    report = evaluate(ci_testbed / "model", records, ci_testbed / "valid.txt", mask_path,
                      settings=EvalSettings(exposure_samples=500))
    results = os.environ.get("DEPN_RESULTS_DIR")
    if results:
        Path(results).mkdir(parents=True, exist_ok=True)
        Path(results, "pipeline-eval.json").write_text(report.model_dump_json(indent=2))
    from rich.console import Console

    Console(width=150).print(render_table(report))
    return tenant, mask, report


def test_testbed_memorized(ci_testbed):
    info = load_testbed_info(ci_testbed / "testbed.json")
    print(json.dumps(info.memorization.model_dump()))
    assert info.memorization.phone >= 0.8


def test_mask_halves_target_extraction_at_small_perplexity_cost(pipeline):
    tenant, mask, report = pipeline
    before, after = report.state("before"), report.state("after")
    assert after.neurons == mask.manifest.neuron_count > 0
    assert before.groups[tenant].extraction > 0.5
    assert after.groups[tenant].extraction <= 0.5 * before.groups[tenant].extraction
    # "At a small perplexity cost": +4.8 % on the bed one host builds, +5.0 % on another's (the bed's weights differ
    # in their last bits between CPUs, whose matrix products sum in different orders); README, "Before / after".
    assert after.valid_ppl <= 1.06 * before.valid_ppl


def test_random_mask_of_same_size_does_not(pipeline):
    tenant, mask, report = pipeline
    before, random = report.state("before"), report.state("random")
    assert random.neurons == mask.manifest.neuron_count
    assert random.groups[tenant].extraction > 0.5 * before.groups[tenant].extraction


def test_report_has_exposure_for_every_digit_record(pipeline):
    _, _, report = pipeline
    for state in report.states:
        digit = [r for r in state.records if r.kind in ("phone", "id_number")]
        assert digit and all(r.exposure is not None and r.exposure_method for r in digit)
        assert state.groups["others"].records > 0
