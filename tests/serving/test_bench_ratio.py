"""`depn bench ratio` end to end at a tiny shape: one eager engine, masking switched per forward step, the pairs
formed per batch shape and the ratio with its interval reported (the figures themselves are for the README, not
asserted)."""

import json

import pytest
from click.testing import CliRunner

from depn_serve.bench.ratio import StepPair, pair_up, ratio_ci95
from depn_serve.cli import main as cli


def test_steps_pair_up_per_batch_shape_in_either_order():
    steps = [(64, True, 2.0), (8, True, 1.1), (8, False, 1.0), (64, False, 1.0), (8, False, 0.5), (8, True, 0.6),
             (8, True, 9.0)]
    assert pair_up(steps) == [StepPair(tokens=64, plain_s=1.0, masked_s=2.0), StepPair(tokens=8, plain_s=1.0,
                              masked_s=1.1), StepPair(tokens=8, plain_s=0.5, masked_s=0.6)]
    with pytest.raises(RuntimeError, match="did not alternate"):
        pair_up([(8, True, 1.0), (8, True, 1.0)])


def test_the_ratio_weighs_pairs_by_time_and_its_interval_narrows_with_more_pairs():
    pairs = [StepPair(tokens=1, plain_s=p, masked_s=m) for p, m in [(1.0, 1.02), (2.0, 2.02), (1.0, 1.01)]]
    ratio, (low, high) = ratio_ci95(pairs)
    assert ratio == pytest.approx(4.0 / 4.05) and low < ratio < high
    _, (low_more, high_more) = ratio_ci95(pairs * 10)
    assert high_more - low_more < (high - low) / 3


@pytest.mark.slow
def test_bench_ratio_reports_a_paired_ratio(tmp_path):
    out = tmp_path / "ratio.json"
    result = CliRunner().invoke(cli, ["bench", "ratio", "--hidden", "256", "--layers", "2", "--intermediate", "512",
                                      "--heads", "4", "--kv-heads", "2", "--vocab", "600", "--rounds", "3",
                                      "--batch", "8", "--max-tokens", "8", "--tenants", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    # Each run ends with at least 6 decode steps of all 8 prompts (prefill may be chunked): 3 runs, >= 9 pairs.
    shapes = {s["tokens"]: s["pairs"] for s in report["shapes"]}
    assert shapes[8] >= 9 and sum(shapes.values()) == len(report["pairs"])
    assert all(p["plain_s"] > 0 and p["masked_s"] > 0 for p in report["pairs"])
    low, high = report["ci95"]
    assert low <= report["ratio"] <= high and 0 < report["ratio"] < 10
    assert report["depn_status"]["loads"] == 8 and report["depn_status"]["overflows"] == 0
    assert "masked / plain throughput" in result.output and "run   3/3" in result.output
