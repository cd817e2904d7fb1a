import itertools
import math

import torch

from depn_serve.core.arch import load_model
from depn_serve.evaluation.exposure import candidate_bits, digit_token_ids, exact_rank, exposure
from depn_serve.evaluation.metrics import perplexity


def test_exact_rank_matches_brute_force(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    digits = digit_token_ids(tok)
    prompt = tok("Her ID number is ")["input_ids"]
    every = torch.tensor([[digits[d] for d in combo] for combo in itertools.product(range(10), repeat=3)])
    bits = candidate_bits(model, prompt, every)
    order = torch.argsort(bits)
    for position in (0, 7, 400):
        secret = every[order[position]].tolist()
        secret_bits = float(bits[order[position]])
        brute = int((bits <= secret_bits + 1e-4).sum())
        assert exact_rank(model, prompt, secret, digits, secret_bits, max_frontier=2000) == brute
    assert exact_rank(model, prompt, every[order[900]].tolist(), digits, float(bits[order[900]]), 50) is None


def test_exposure_exact_and_extrapolated(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    digits = digit_token_ids(tok)
    prompt = tok("Her ID number is ")["input_ids"]
    secret = [digits[d] for d in (1, 2, 3, 4)]
    small = exposure(model, prompt, secret, digits, samples=300, max_frontier=20000, seed_key="x")
    assert small.method == "exact" and 1 <= small.rank <= 10_000
    assert math.isclose(small.exposure, math.log2(10_000) - math.log2(small.rank))
    capped = exposure(model, prompt, secret, digits, samples=300, max_frontier=1, seed_key="x")
    assert capped.method == "extrapolated" and 0 <= capped.exposure <= math.log2(10_000)
    assert capped.extrapolated == small.extrapolated  # same candidates for the same seed key


def test_perplexity_of_uniform_model_is_vocab_size(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ppl = perplexity(model, tok, ["Hello team, the meeting is moved to Monday.", "Regards, Bob"], max_len=5)
    assert math.isclose(ppl, model.config.vocab_size, rel_tol=1e-4)
