"""The selection registry on a tiny model: every method ranks, cuts a prefix and saves a mask with its provenance."""

import pytest
import torch
from pydantic import BaseModel

from depn_serve.core.selectors import MaskPolicy
from depn_serve.artifacts.mask import NeuronMask, first_n
from depn_serve.artifacts.scores import ScoresFile
from depn_serve.core.errors import DepnError
from depn_serve.core.fingerprint import model_fingerprint
from depn_serve.core.records import write_texts
from depn_serve.detection import DetectSettings, detect_to_file
from depn_serve.selection import DEFAULT_METHOD, METHODS, SelectionInputs, inputs_from_files, select
from depn_serve.selection.base import default_size
from depn_serve.selection.fit import FitSettings
from depn_serve.selection.vote import DEFAULT_THRESHOLD, VoteSettings, tally_votes
from tests.helpers import TEXTS

TENANT = "acme"  # two of the four tiny records; the other two are the records to keep


@pytest.fixture(scope="module")
def scores_path(tiny_model_dir, tiny_records_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("registry") / "scores.safetensors"
    detect_to_file(tiny_model_dir, tiny_records_file, path, settings=DetectSettings(steps=2))
    return path


@pytest.fixture(scope="module")
def inputs(scores_path, tiny_model_dir, tiny_records_file):
    keep_text = scores_path.parent / "keep.txt"
    write_texts(TEXTS[:3], keep_text)
    inputs = inputs_from_files(MaskPolicy.own_records(TENANT), scores_path, tiny_model_dir, tiny_records_file,
                               keep_text)
    assert sorted(inputs.target_ids) == ["n1", "p1"] and [r.id for r in inputs.keep_records] == ["e1", "i1"]
    return inputs


def _quick(name: str) -> BaseModel:
    """The method's default settings; the fit with few steps, so the test stays fast."""
    return FitSettings(steps=3, rounds=1) if name == "fit" else METHODS[name].settings()


def test_registry_entries():
    assert DEFAULT_METHOD == "fit" == next(iter(METHODS))
    assert {m.provenance for m in METHODS.values()} >= {"depn-fit", "depn-vote", "random"}
    for name, method in METHODS.items():
        assert method.name == name and method.description.strip()
        assert issubclass(method.settings, BaseModel) and isinstance(method.settings(), method.settings)
        assert set(method.needs) <= set(SelectionInputs.__dataclass_fields__)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_selects_a_prefix_of_its_order_and_saves_a_mask(name, inputs, tiny_model_dir, tmp_path):
    method = METHODS[name]
    settings = _quick(name)
    dims = inputs.shape.dims
    chosen = select(inputs, name, settings)
    n = chosen.info["top_z"]
    assert chosen.method is method and chosen.settings == settings and chosen.label == method.provenance
    assert chosen.off.dtype == torch.bool and tuple(chosen.off.shape) == dims
    assert torch.equal(chosen.off, first_n(chosen.order, n, dims))
    assert chosen.order.unique().numel() == chosen.order.numel()  # no neuron ranked twice
    if name != "fit":  # the fit's own size is its fitted count; every other method's is 1 % of the MLP
        assert n == default_size(inputs.shape)
    assert chosen.summary().startswith(f"{method.provenance}: {chosen.neurons} neurons")

    sized = select(inputs, name, settings, size=5)
    assert sized.info["top_z"] == 5 and sized.neurons == 5
    assert torch.equal(sized.order, chosen.order)  # the size only cuts the same ranking
    assert torch.equal(sized.off, first_n(sized.order, 5, dims))

    path = tmp_path / f"{name}.safetensors"
    sized.to_mask(inputs).save(path)
    loaded = NeuronMask.load(path)
    assert torch.equal(loaded.off, sized.off) and loaded.manifest.neuron_count == 5
    assert loaded.manifest.tenant == TENANT
    provenance = loaded.manifest.provenance
    assert provenance.method == method.provenance and provenance.records == 2
    assert provenance.records_sha256 == inputs.records_sha256 is not None
    assert provenance.detector["steps"] == 2 and provenance.aggregator["top_z"] == 5
    loaded.check_model(model_fingerprint(tiny_model_dir), inputs.shape)


@pytest.mark.parametrize("threshold", [DEFAULT_THRESHOLD, 0.5])
def test_vote_of_size_z_is_the_z_most_voted_neurons(scores_path, inputs, threshold):
    scores = ScoresFile(scores_path)
    tally = tally_votes((t for _, t in scores.iter_scores(scores.record_ids(TENANT))), threshold)
    votes, summed = tally.votes.flatten().tolist(), tally.summed.flatten().tolist()
    # Most votes first, ties by the higher summed score, then by the lower index; never a neuron without a vote.
    ranked = sorted((i for i in range(len(votes)) if votes[i] > 0), key=lambda i: (-votes[i], -summed[i], i))
    assert len(ranked) > 5, "too few voted neurons for this test to mean anything"
    for z in (1, 5, len(ranked), len(ranked) + 50):
        chosen = select(inputs, "vote", VoteSettings(threshold=threshold), size=z)
        expected = torch.zeros(len(votes), dtype=torch.bool)
        expected[ranked[:z]] = True
        assert torch.equal(chosen.off.flatten(), expected), z
        assert chosen.neurons == min(z, len(ranked)) and not (chosen.off & (tally.votes == 0)).any()
        assert chosen.info["voters"] == tally.voters


def test_unknown_method_names_the_known_ones(inputs):
    with pytest.raises(DepnError, match="'nope'") as err:
        select(inputs, "nope")
    assert all(repr(name) in str(err.value) for name in METHODS)


def test_missing_inputs_and_bad_size_are_refused(scores_path, inputs):
    scores_only = inputs_from_files(MaskPolicy.own_records(TENANT), scores_path)
    with pytest.raises(DepnError, match=r"'fit' needs .*model"):
        select(scores_only, "fit", FitSettings(steps=1))
    with pytest.raises(DepnError, match=r"'kn' needs .*model"):
        select(scores_only, "kn")
    no_scores = SelectionInputs(shape=inputs.shape, fingerprint=inputs.fingerprint, target_ids=inputs.target_ids)
    with pytest.raises(DepnError, match=r"'vote' needs scores"):
        select(no_scores, "vote")
    assert select(no_scores, "random").neurons == default_size(inputs.shape)  # needs nothing
    with pytest.raises(DepnError, match="positive"):
        select(inputs, "vote", size=0)
