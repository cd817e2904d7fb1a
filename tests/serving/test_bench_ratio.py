"""`depn bench ratio` end to end at a tiny shape: one eager engine, masking switched per run, the ratio and its
interval reported (the figures themselves are for the README, not asserted)."""

import json

import pytest
from click.testing import CliRunner

from depn_serve.cli import main as cli

pytestmark = pytest.mark.slow


def test_bench_ratio_reports_a_paired_ratio(tmp_path):
    out = tmp_path / "ratio.json"
    result = CliRunner().invoke(cli, ["bench", "ratio", "--hidden", "256", "--layers", "2", "--intermediate", "512",
                                      "--heads", "4", "--kv-heads", "2", "--vocab", "600", "--rounds", "3",
                                      "--batch", "8", "--max-tokens", "8", "--tenants", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert len(report["rounds"]) == 3 and all(r["plain_s"] > 0 and r["masked_s"] > 0 for r in report["rounds"])
    low, high = report["ci95"]
    assert low <= report["ratio"] <= high and 0 < report["ratio"] < 10
    assert report["depn_status"]["loads"] == 8 and report["depn_status"]["overflows"] == 0
    assert "masked / plain throughput" in result.output
