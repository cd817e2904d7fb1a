import pytest
import torch
from pydantic import ValidationError

from depn_serve.artifacts.scores import ScoresError
from depn_serve.core.arch import hooked, load_model
from depn_serve.core.records import encode_record
from depn_serve.detection import DetectSettings, ScoresFile, detect, detect_to_file
from tests.helpers import TINY_RECORDS, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def _probs_with_zeroed(model, ids, layer=None, pos=None):
    def zero(x):
        x = x.clone()
        x[0, pos] = 0
        return x

    with hooked(model, {} if layer is None else {layer: zero}), torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return probs


@pytest.mark.parametrize("layer", [0, 2])
def test_ig_completeness(tiny, layer):
    """Sum of one layer's attributions = sum over secret tokens of P(a) - P(layer zeroed at that position)."""
    model, tok = tiny
    record = TINY_RECORDS[0]
    prompt, secret = encode_record(tok, record)
    ids = prompt + secret
    base = _probs_with_zeroed(model, ids)
    expected = 0.0
    for j, target in enumerate(secret):
        pos = len(prompt) + j - 1
        expected += float(base[pos, target] - _probs_with_zeroed(model, ids, layer, pos)[pos, target])
    errors = []
    for steps in (5, 100):
        (_, score), = detect(model, tok, [record], DetectSettings(steps=steps, layers=[layer]))
        errors.append(abs(float(score[layer].sum()) - expected))
        assert not score[[i for i in range(3) if i != layer]].any()
    assert errors[1] <= errors[0] + 1e-9  # the Riemann error shrinks with more steps
    assert errors[1] <= 0.02 * abs(expected) + 1e-7


def test_all_layers_in_one_pass_equals_one_layer_at_a_time(tiny):
    model, tok = tiny
    together = {r.id: s for r, s in detect(model, tok, TINY_RECORDS, DetectSettings(steps=8, batch_rows=200))}
    for layer in range(3):
        alone = {r.id: s for r, s in detect(model, tok, TINY_RECORDS,
                                                  DetectSettings(steps=8, layers=[layer], batch_rows=37))}
        for rid, score in together.items():
            torch.testing.assert_close(alone[rid][layer], score[layer], rtol=1e-4, atol=1e-8)
    assert all(s.abs().sum() > 0 for s in together.values())


def test_batching_does_not_change_scores(tiny):
    model, tok = tiny
    a = [s for _, s in detect(model, tok, TINY_RECORDS, DetectSettings(steps=4, batch_rows=1000))]
    b = [s for _, s in detect(model, tok, TINY_RECORDS, DetectSettings(steps=4, batch_rows=7))]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2"])
def test_other_architectures(tmp_path, arch):
    model, tok = load_model(make_tiny_model(tmp_path, arch))
    (_, score), = detect(model, tok, TINY_RECORDS[:1], DetectSettings(steps=3))
    assert score.shape[0] == 3 and score.abs().sum() > 0


def test_scores_file_roundtrip(tmp_path, tiny_model_dir, tiny_records_file):
    out = tmp_path / "scores.safetensors"
    manifest = detect_to_file(tiny_model_dir, tiny_records_file, out, tenant="globex",
                              settings=DetectSettings(steps=3, layers=[1, 2]))
    assert set(manifest.record_tenants) == {"e1", "i1"}
    scores = ScoresFile(out)
    assert scores.manifest.layers == [1, 2] and scores.manifest.steps == 3
    for rid, tensor in scores.iter_scores(scores.record_ids("globex")):
        assert tensor.shape == (3, 96) and not tensor[0].any() and tensor[1:].abs().sum() > 0
    with pytest.raises(ScoresError, match=r"no scored records of tenant 'acme'; tenants present: \['globex'\]"):
        scores.record_ids("acme")
    scores.check_model(tiny_model_dir)


def test_settings_are_validated():
    with pytest.raises(ValidationError, match="steps"):
        DetectSettings(steps=0)
    with pytest.raises(ValidationError, match="batch_size"):
        DetectSettings(batch_size=8)  # no such setting
