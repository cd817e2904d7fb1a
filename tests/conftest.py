"""Shared fixtures: tiny random models of each supported architecture (seconds), and the CI test-bed (minutes).
The plain helpers they build on (TEXTS, TINY_RECORDS, make_tiny_model) live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import TINY_RECORDS, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_records_file(tmp_path_factory) -> Path:
    from depn_serve.core.records import save_records

    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    save_records(TINY_RECORDS, path)
    return path


@pytest.fixture(scope="session")
def ci_testbed(tmp_path_factory) -> Path:
    """The `ci` profile test-bed, built once per session (or taken from DEPN_TESTBED_DIR when set)."""
    preset = os.environ.get("DEPN_TESTBED_DIR")
    if preset:
        return Path(preset)
    from depn_serve.testbed import build_testbed

    out = tmp_path_factory.mktemp("testbed-ci")
    build_testbed(out, "ci", seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def ci_mask(ci_testbed, tmp_path_factory) -> tuple[str, Path]:
    """(tenant, mask file): DEPN with default settings (integrated gradients, then the vote) for the first tenant
    of the ci test-bed. The scores file is left next to the mask, as `scores.safetensors`."""
    from depn_serve.core.records import load_records
    from depn_serve.detection import detect_to_file
    from depn_serve.core.selectors import MaskPolicy
    from depn_serve.selection import inputs_from_files, select

    work = tmp_path_factory.mktemp("ci-mask")
    records = ci_testbed / "records.jsonl"
    tenant = load_records(records)[0].tenant
    detect_to_file(ci_testbed / "model", records, work / "scores.safetensors", tenant=tenant)
    mask_path = work / f"{tenant}.safetensors"
    inputs = inputs_from_files(MaskPolicy.own_records(tenant), work / "scores.safetensors")
    select(inputs, "vote").to_mask(inputs).save(mask_path)
    return tenant, mask_path
