"""The straightforward integrated-gradients loop of `depn bench detect` gives the batched detector's scores, and a
subtly wrong loop does not (so the comparison can fail)."""

import pytest
import torch

from depn_serve.bench import detector
from depn_serve.bench.detector import ATOL_OF_SCALE, RTOL, compare, naive_scores
from depn_serve.core.arch import load_model
from depn_serve.detection import DetectSettings, detect
from tests.helpers import TINY_RECORDS

STEPS = 4


@pytest.fixture(scope="module")
def scored(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    batched = [s for _, s in detect(model, tokenizer, TINY_RECORDS[:2], DetectSettings(steps=STEPS))]
    return model, tokenizer, batched


def _matches(model, tokenizer, batched) -> bool:
    naive = [naive_scores(model, tokenizer, record, STEPS) for record in TINY_RECORDS[:2]]
    scale = max(float(s.abs().max()) for s in batched)
    return all(torch.allclose(a, b, rtol=RTOL, atol=ATOL_OF_SCALE * scale) for a, b in zip(naive, batched))


def test_naive_equals_batched(scored):
    model, tokenizer, batched = scored
    assert all(s.abs().sum() > 0 for s in batched)
    assert _matches(model, tokenizer, batched)


def test_right_riemann_sum_does_not_match(scored, monkeypatch):
    monkeypatch.setattr(detector, "_alpha", lambda k, steps: (k + 1) / steps)
    assert not _matches(*scored)


def test_scaling_every_position_does_not_match(scored, monkeypatch):
    monkeypatch.setattr(detector, "_scale", lambda activation, pos, alpha: activation * alpha)
    assert not _matches(*scored)


def test_compare_report(tiny_model_dir, tiny_records_file):
    report = compare(tiny_model_dir, tiny_records_file, 2, 2, "cpu")
    assert report.records == 2 and report.layers == 3 and report.steps == 2
    assert report.secret_tokens == 12  # 10 digits + 2 name tokens with the tiny tokenizer
    assert report.allclose and report.max_rel_diff < RTOL
    assert report.naive_seconds > 0 and report.batched_seconds > 0
    assert report.markdown_row().count("|") == 10
