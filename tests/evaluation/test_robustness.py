"""Robustness metrics (held-out paraphrase prompts, sampled extraction) on the ci test-bed's memorized records."""

import pytest

from depn_serve.core.arch import load_model
from depn_serve.core.records import DIGIT_KINDS, load_records
from depn_serve.evaluation.metrics import EvalSettings, record_results
from depn_serve.evaluation.report import summarize

pytestmark = pytest.mark.slow


def test_paraphrase_and_sampling_metrics(ci_testbed):
    model, tokenizer = load_model(ci_testbed / "model")
    records = load_records(ci_testbed / "records.jsonl")
    one_per_kind = [next(r for r in records if r.kind == kind) for kind in ("name", "phone", "email", "id_number")]
    chosen = one_per_kind + [r for r in records if r.kind == "phone"][1:4]
    settings = EvalSettings(robustness=True, sample_temperatures=(1e-4, 1.0), samples=8, exposure_samples=300)
    results = record_results(model, tokenizer, chosen, settings)
    for record, result in zip(chosen, results):
        assert result.paraphrase_extraction is not None and 0 <= result.paraphrase_extraction <= 1
        assert (result.paraphrase_exposure is not None) == (record.kind in DIGIT_KINDS)
        # Sampling at a vanishing temperature is greedy decoding (near misses count in both).
        assert result.sampled_extraction["0.0001"] == result.attacks["greedy"]
        assert result.attacks["greedy"] >= float(result.extracted) and 0 <= result.attacks["beam"] <= 1
    summary = summarize(results)
    print(summary.model_dump_json())
    assert summary.extraction > 0.5
    # The test-bed memorized the wording: held-out paraphrases leak less, and so does sampling at T = 1.
    assert summary.paraphrase_extraction < summary.extraction
    assert summary.paraphrase_exposure < summarize([r for r in results if r.exposure is not None]).mean_exposure
