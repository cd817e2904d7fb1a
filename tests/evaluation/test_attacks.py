"""The attack suite, each attack checked against brute force on a tiny model (or an exhaustive enumeration)."""

import itertools

import pytest
import torch

from depn_serve.core.arch import load_model
from depn_serve.core.records import PrivateRecord, encode_record
from depn_serve.evaluation.attacks import (
    AttackSettings,
    ModelOracle,
    beam_search,
    contains,
    context_prompts,
    reproduces,
    run_attacks,
)


def _variants(secret: str, k: int, alphabet: str):
    """Every string that differs from `secret` in at most `k` places (over `alphabet`)."""
    for positions in itertools.chain.from_iterable(itertools.combinations(range(len(secret)), n) for n in range(k + 1)):
        for letters in itertools.product(alphabet, repeat=len(positions)):
            chars = list(secret)
            for p, c in zip(positions, letters):
                chars[p] = c
            yield "".join(chars)


def test_near_misses_match_an_enumeration_of_every_close_string():
    alphabet = "ab1"
    for secret in ("ab1ab", "abab1ab1"):  # 1 and 2 characters may be wrong (len // 4)
        k = min(2, len(secret) // 4)
        # "_" stands for a character the continuation never produced (it stopped early): also wrong
        close = set(_variants(secret, k, alphabet + "_"))
        for length in range(len(secret) - 2, len(secret) + 2):
            for chars in itertools.product(alphabet, repeat=length):
                text = "".join(chars)
                starts = any(text.ljust(len(secret), "_").startswith(v) for v in close)
                assert reproduces(" " + text, secret, near_miss=2) == starts, (text, secret)
                if length >= len(secret):
                    inside = any(v in text for v in close)
                    assert contains(text, secret, near_miss=2) == inside, (text, secret)
    assert reproduces("945999246", "945992466", 2) is False  # three digits wrong: not a near miss
    assert reproduces("945992460", "945992466", 2) and reproduces("945992", "945992466", 2) is False


def _naive_next(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


def _naive_greedy(model, ids: list[int], n: int, pad_id: int = 2) -> list[int]:
    """Argmax token by token, the whole sequence recomputed each time; after end-of-text, padding."""
    out = []
    while len(out) < n and (not out or out[-1] != model.config.eos_token_id):
        out.append(int(_naive_next(model, ids + out).argmax()))
    return out + [pad_id] * (n - len(out))


def test_greedy_and_context_prompts_match_unbatched_decoding(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    record = PrivateRecord(id="x", tenant="a", kind="phone", prompt="Contact Jane Doe at", secret="555", repeats=1)
    prompts = [tok(t)["input_ids"] for t in ("Hello team", "Jane Doe's e-mail address is", "Her ID number is 12")]
    mails = ["Hello team, the meeting is moved.", "Regards, Bob", "Customer account 48213"]
    chosen = context_prompts(record, mails, 2, seed=0)
    assert len(chosen) == 2 and all(p.endswith("\nContact Jane Doe at") for p in chosen)
    assert chosen == context_prompts(record, mails, 2, seed=0) != context_prompts(record, mails, 2, seed=1)
    prompts += [encode_record(tok, record, p)[0] for p in chosen]
    assert ModelOracle(model, tok).greedy(prompts, 6) == [_naive_greedy(model, p, 6) for p in prompts]


def _naive_beam(model, prompt: list[int], length: int, width: int, top_k: int) -> list[list[int]]:
    beams = [([], 0.0)]
    for _ in range(length):
        grown = []
        for seq, score in beams:
            values, tokens = _naive_next(model, prompt + seq).topk(top_k)
            grown += [(seq + [int(t)], score + float(v)) for t, v in zip(tokens, values)]
        beams = sorted(grown, key=lambda c: -c[1])[:width]
    return [seq for seq, _ in beams]


def test_beam_matches_an_unbatched_beam_and_the_exhaustive_top(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    oracle = ModelOracle(model, tok)
    prompts = [tok("Contact Jane Doe at")["input_ids"], tok("Hello")["input_ids"]]
    found = beam_search(oracle, prompts, [3, 2], width=7, top_k=5)
    assert found == [_naive_beam(model, prompts[0], 3, 7, 5), _naive_beam(model, prompts[1], 2, 7, 5)]

    # With every token allowed and a beam as wide as the vocabulary, two steps of the beam are the exact top
    # `width` of all vocab^2 continuations.
    vocab = model.config.vocab_size
    prompt = prompts[1]
    first = _naive_next(model, prompt)
    with torch.no_grad():
        ids = torch.tensor([prompt + [t] for t in range(vocab)])
        second = torch.log_softmax(model(input_ids=ids).logits[:, -1].float(), -1)
    total = (first[:, None] + second).flatten()
    exhaustive = {divmod(int(i), vocab) for i in total.topk(vocab).indices}
    beam = beam_search(oracle, [prompt], [2], width=vocab, top_k=vocab)[0]
    assert {tuple(seq) for seq in beam} == exhaustive


def test_sampling_follows_the_tempered_distribution(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    prompt = tok("Contact Jane Doe at")["input_ids"]
    n, temperature = 4000, 0.7
    rows = ModelOracle(model, tok).sample([prompt], 1, temperature, n, seed=3)[0]
    counts = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=model.config.vocab_size).float()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    exact = torch.softmax(logits / temperature, -1)
    for token in exact.topk(3).indices:
        p = float(exact[token])
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(float(counts[token]) / n - p) < 4 * sigma + 1e-3


def test_run_attacks_counts_hits_near_misses_and_substitutions(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    oracle = ModelOracle(model, tok)
    prompt_a, prompt_b = "Contact Jane Doe at", "Her ID number is"
    said_a = tok.decode(_naive_greedy(model, tok(prompt_a)["input_ids"], 12), skip_special_tokens=True).strip()
    said_b = tok.decode(_naive_greedy(model, tok(prompt_b)["input_ids"], 12), skip_special_tokens=True).strip()
    assert len(said_a) >= 8 and len(said_b) >= 8, (said_a, said_b)
    near = said_a[:8][:-1] + ("x" if said_a[7] != "x" else "y")  # one character wrong, in place
    records = [
        PrivateRecord(id="exact", tenant="g", kind="name", prompt=prompt_a, secret=said_a[:8], repeats=1),
        PrivateRecord(id="near", tenant="g", kind="name", prompt=prompt_a + ".", secret=near, repeats=1),
        PrivateRecord(id="far", tenant="g", kind="name", prompt=prompt_b, secret="qqqqqqqq", repeats=1),
        # nobody's prompt says it, but record "exact"'s continuation does: a substitution
        PrivateRecord(id="other", tenant="g", kind="name", prompt="Hello team", secret=said_b[:8], repeats=1),
    ]
    settings = AttackSettings(paraphrases=False, contexts=0, samples=3, beam_width=4, beam_top_k=4, exposure=False)
    report = run_attacks(oracle, tok, records, [], (), settings)
    by_id = {r.id: r for r in report.records}
    assert by_id["exact"].hits["greedy"] == 1 and by_id["exact"].tries["sample@0.7"] == 3
    assert by_id["far"].hits["greedy"] == 0 and by_id["far"].hits["beam"] == 0
    assert set(report.settings.attack_names()) == set(by_id["exact"].tries)
    greedy_near = reproduces(_decoded_greedy(model, tok, prompt_a + "."), near, 2)
    assert by_id["near"].hits["greedy"] == int(greedy_near)
    assert by_id["other"].hits["substitution"] >= 1  # "far" asked with prompt_b answers with "other"'s secret
    assert report.rate("greedy") == pytest.approx(sum(r.hits["greedy"] for r in report.records) / 4)
    assert [r.id for r in report.leaking()] == [r.id for r in report.records if r.leaks]


def _decoded_greedy(model, tok, prompt: str) -> str:
    return tok.decode(_naive_greedy(model, tok(prompt)["input_ids"], 12), skip_special_tokens=True)
