"""The soak harness, short: a real `depn serve` with three tenants on two mask slots, under concurrent streaming
and non-streaming requests and hostile ones while masks are pushed and dropped every second, then killed -9 during
mask changes and refused store writes (`depn bench soak` runs it for 10 minutes). Every request completes or gets a
documented 403, hostile ones never a 5xx, the stable tenant's answers equal the HF reference, each fault leaves store
and served masks agreeing, the engine lives."""

import pytest

from depn_serve.bench.soak import SoakSettings, run_soak

pytestmark = pytest.mark.slow


def test_load_and_mask_churn_lose_nothing(ci_testbed, tmp_path):
    settings = SoakSettings(seconds=40, tenants=3, slots=2, concurrency=4, push_every=1.0, max_tokens=12, kills=1,
                            disk_faults=1, hostile_every=0.1)
    report = run_soak(ci_testbed, tmp_path, settings)
    print(report.markdown())
    assert report.failures == 0, report.failure_examples
    assert report.healthy_at_end and report.checked >= 10 and report.completed > report.checked
    assert report.prompts_changed >= 1  # the stable tenant's mask makes a difference the comparison can see
    assert report.pushes + report.drops >= 15 and report.pushes >= 5
    assert set(report.refused) <= {"403"}
    assert report.hostile >= 100
    assert report.faults.problems == [] and report.faults.survived == 2
