"""Contrastive mask fit and the knowledge-neurons baseline: mechanics on a tiny model, specificity on the ci
test-bed."""

import pytest
import torch
from click.testing import CliRunner

from depn_serve.core.selectors import MaskPolicy
from depn_serve.cli import main
from depn_serve.core.arch import hooked, load_model
from depn_serve.core.records import encode_record, read_texts
from depn_serve.detection.baseline import activation_x_gradient
from depn_serve.editing import masked
from depn_serve.evaluation.generation import greedy_extraction
from depn_serve.evaluation.metrics import perplexity
from depn_serve.selection import inputs_from_files, select
from depn_serve.selection.fit import FitSettings, fit_gates, fitted_count, gate_order, keep_texts_for
from tests.helpers import TEXTS, TINY_RECORDS


def test_gate_order_lowest_first_ties_by_score():
    gates = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.0, 0.9]])
    tiebreak = torch.tensor([[9.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    # gates 0.0 at flat 1 (score 1) and 3 (score 5): 3 first; then 0.3 (2), 0.9 (5); unmoved gates by score
    assert gate_order(gates, tiebreak).tolist() == [3, 1, 2, 5, 0, 4]
    assert fitted_count(gates) == 3  # the fitted mask: gates below one half, the first three of that order


def test_keep_texts_drop_any_text_with_a_target_secret():
    targets = [r for r in TINY_RECORDS if r.tenant == "acme"]
    texts = ["call 5551234567 now", "nothing private", "Maria Lopez signed"]
    assert keep_texts_for(texts, targets) == ["nothing private"]


def test_activation_x_gradient_is_the_first_order_effect_of_scaling_a_neuron(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    record = TINY_RECORDS[0]
    scores = activation_x_gradient(model, tokenizer, [record])
    assert scores.shape == (3, 96) and scores.abs().sum() > 0
    layer, neuron = divmod(int(scores.abs().argmax()), 96)
    prompt, secret = encode_record(tokenizer, record)

    def secret_logp(scale: float) -> float:
        # scale the neuron only where the secret's tokens are predicted, as the attribution does
        factor = torch.ones(1, len(prompt) + len(secret), 96)
        factor[0, len(prompt) - 1 : -1, neuron] = scale
        with hooked(model, {layer: lambda x: x * factor}), torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + secret])).logits[0], -1)
        return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(secret))

    eps = 1e-3
    finite = (secret_logp(1 + eps) - secret_logp(1 - eps)) / (2 * eps)
    assert finite == pytest.approx(float(scores[layer, neuron]), rel=1e-2, abs=1e-4)


def test_fit_mechanics_on_a_tiny_model(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    targets = [r for r in TINY_RECORDS if r.tenant == "acme"]
    keep = [r for r in TINY_RECORDS if r.tenant != "acme"]
    settings = FitSettings(steps=5, lr=0.2, floor=1e-4, sparsity=0, rounds=1)
    gates, result = fit_gates(model, tokenizer, targets, keep, TEXTS[1:2], settings)
    assert gates.shape == (3, 96) and float(gates.min()) >= 0 and float(gates.max()) <= 1
    assert len(result.trace) == 5 and result.trace[-1].forget < result.trace[0].forget
    assert all(p.requires_grad is False for p in model.parameters())  # the model itself is never trained
    # no hook left behind: the model computes what it computed before the fit
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    fresh, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_fit_method_needs_its_inputs(tmp_path):
    scores = tmp_path / "scores.safetensors"
    scores.write_bytes(b"x")
    result = CliRunner().invoke(main, ["aggregate", str(scores), "--tenant", "acme", "--out", str(tmp_path / "m")])
    assert result.exit_code != 0
    assert "--method fit needs --keep-text, --model, --records" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_fitted_mask_is_specific_on_the_ci_testbed(ci_testbed, ci_mask):
    """The fitted mask cuts the target's greedy extraction at least in half and leaves the other tenant's far
    less touched than DEPN's vote mask does (README, "Specificity": the vote mask cuts both alike)."""
    tenant, mask_path = ci_mask
    # Targets: the tenant's records; kept: every other tenant's; ordinary text: train.txt (minus the targets'
    # secrets); ties broken by the tenant's summed integrated-gradient scores.
    inputs = inputs_from_files(MaskPolicy.own_records(tenant), mask_path.parent / "scores.safetensors",
                               ci_testbed / "model", ci_testbed / "records.jsonl", ci_testbed / "train.txt")
    model, tokenizer, targets, others = inputs.model, inputs.tokenizer, inputs.targets, inputs.keep_records
    assert targets and others and all(r.tenant == tenant for r in targets)
    assert not any(r.tenant == tenant for r in others)
    result = select(inputs, "fit", FitSettings(steps=120, rounds=1))
    off, order = result.off, result.order
    assert result.label == "depn-fit" and result.neurons > 0
    assert order.numel() == off.numel() and bool(off.flatten()[order[: int(off.sum())]].all())

    def rate(rs):
        return sum(greedy_extraction(model, tokenizer, rs)) / len(rs)

    valid = read_texts(ci_testbed / "valid.txt")  # never seen by the fit
    before_t, before_o, before_ppl = rate(targets), rate(others), perplexity(model, tokenizer, valid)
    with masked(model, off):
        after_t, after_o, after_ppl = rate(targets), rate(others), perplexity(model, tokenizer, valid)
    print(f"fit: {int(off.sum())} neurons in {result.seconds:.0f} s; {tenant} {before_t:.2f} -> {after_t:.2f}, "
          f"others {before_o:.2f} -> {after_o:.2f}, perplexity {before_ppl:.2f} -> {after_ppl:.2f}")
    assert after_t <= before_t / 2
    assert before_o - after_o <= 0.15  # the vote mask costs the other tenant 0.50 here
    assert after_ppl <= before_ppl * 1.02


_PEAK_RSS_SCRIPT = """
import json, resource, sys, time
from depn_serve.core.arch import load_model
from depn_serve.core.records import load_records, read_texts
from depn_serve.selection.fit import FitSettings, fit_gates
model_dir, records, text, n = sys.argv[1:5]
model, tokenizer = load_model(model_dir)
everything = load_records(records)
forget = [r for r in everything if r.tenant == "bulk"][: int(n)]
keep = [r for r in everything if r.tenant != "bulk"]
started = time.perf_counter()
gates, result = fit_gates(model, tokenizer, forget, keep, read_texts(text)[:50], FitSettings(steps=4, rounds=1))
print(json.dumps({"records": len(forget), "seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
def test_a_fit_over_10000_records_runs_in_the_memory_of_its_batch(ci_testbed, tmp_path):
    """Memory is bounded by the minibatch: the peak RSS of a fit over 10,000 records to forget is within a few
    per cent of one over 100 (each run in its own process; the figures are printed)."""
    import json
    import random
    import subprocess
    import sys

    from depn_serve.core.records import PrivateRecord, load_records, save_records

    rng = random.Random(0)
    bulk = [PrivateRecord(id=f"b{i:05d}", tenant="bulk", kind="phone", prompt=f"Contact customer {i} at",
                          secret="".join(rng.choice("0123456789") for _ in range(10)), repeats=0)
            for i in range(10_000)]
    path = tmp_path / "records.jsonl"
    save_records([*load_records(ci_testbed / "records.jsonl"), *bulk], path)
    runs = {}
    for n in (100, 10_000):
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(ci_testbed / "model"), str(path),
                              str(ci_testbed / "train.txt"), str(n)], capture_output=True, text=True, check=True)
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"fit, 4 steps of 64 records: {runs}")
    assert runs[10_000]["records"] == 10_000
    assert runs[10_000]["peak_rss_mb"] <= 1.10 * runs[100]["peak_rss_mb"]
