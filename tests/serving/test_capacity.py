"""`depn bench capacity`: the resident table's size is what bits cost, every mask loads once and then never again
while all fit, and with fewer slots than masks the LRU evicts (no vLLM: the slots alone, on CPU)."""

import json

from click.testing import CliRunner

from depn_serve.bench.capacity import run_capacity
from depn_serve.cli import main as cli


def test_all_masks_resident_load_once_then_never():
    report = run_capacity(layers=3, intermediate=100, masks=300, batch=64)
    assert report.table_bytes == 3 * (300 + 2) * 4 * 4  # 100 neurons -> 4 int32 words a row, 2 reserved rows
    assert report.bf16_rows_bytes == 3 * 302 * 100 * 2
    assert (report.first.loads, report.first.evictions, report.first.overflows) == (300, 0, 0)
    assert (report.steady.loads, report.steady.evictions, report.steady.overflows) == (0, 0, 0)


def test_fewer_slots_than_masks_evict_least_recently_used():
    report = run_capacity(layers=2, intermediate=64, masks=200, slots=100, batch=50)
    assert report.first.loads == 200 and report.first.evictions == 100
    assert report.steady.loads == 200 and report.steady.overflows == 0  # a cycle through 2x the slots: all miss


def test_the_command_prints_and_writes_the_figures(tmp_path):
    out = tmp_path / "capacity.json"
    result = CliRunner().invoke(cli, ["bench", "capacity", "--layers", "2", "--intermediate", "64", "--masks", "50",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "masks per GiB as bits" in result.output and "steady round" in result.output
    assert json.loads(out.read_text())["steady"]["loads"] == 0
