"""Fast checks of the test-bed's corpus and tokenizer (no training: the slow test builds the full ci test-bed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from depn_serve.core.records import encode_record, load_records, read_texts, save_records, write_texts
from depn_serve.testbed import generate_corpus, train_tokenizer
from depn_serve.testbed.corpus import KINDS, MAX_REPEATS
from depn_serve.testbed.profiles import profile_spec


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(7, "ci")


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.train_emails, profile_spec("ci").vocab_size)


def test_same_seed_same_records_file(tmp_path: Path, corpus) -> None:
    again = generate_corpus(7, "ci")
    save_records(corpus.records, tmp_path / "a.jsonl")
    save_records(again.records, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert again.train_emails == corpus.train_emails
    assert again.valid_emails == corpus.valid_emails
    assert load_records(tmp_path / "a.jsonl") == corpus.records


def test_other_seed_other_records(corpus) -> None:
    other = generate_corpus(8, "ci")
    assert [r.secret for r in other.records] != [r.secret for r in corpus.records]
    assert other.train_emails != corpus.train_emails


def test_tenants_are_disjoint_and_cover_every_kind(corpus) -> None:
    spec = profile_spec("ci")
    assert {r.tenant for r in corpus.records} == set(spec.tenants)
    assert len({r.id for r in corpus.records}) == len(corpus.records)
    for tenant in spec.tenants:
        assert {r.kind for r in corpus.records if r.tenant == tenant} == set(KINDS)
    owned = {}
    for record in corpus.records:
        assert owned.setdefault(record.prompt, record.tenant) == record.tenant
    assert len({r.prompt for r in corpus.records}) == len(corpus.records), "a prompt must determine its secret"


def test_records_are_well_formed(corpus) -> None:
    for record in corpus.records:
        assert record.prompt[-1].isalpha() or record.prompt[-1] == ":"
        assert not record.secret.endswith(".")
        assert len(record.paraphrases) >= 2
        if record.kind == "phone":
            assert record.secret.isdigit() and len(record.secret) == 10
        if record.kind == "id_number":
            assert record.secret.isdigit() and len(record.secret) == 9
        if record.kind == "email":
            assert "@" in record.secret


def test_repeats_span_one_to_twenty_and_match_the_corpus(corpus) -> None:
    for kind in KINDS:
        repeats = {r.repeats for r in corpus.records if r.kind == kind}
        assert min(repeats) == 1 and max(repeats) == MAX_REPEATS
        assert any(5 <= n <= 15 for n in repeats)
    text = "\n\n".join(corpus.train_emails)
    for record in corpus.records:
        assert text.count(f"{record.text}.") == record.repeats
        assert sum(f"{record.text}." in email for email in corpus.train_emails) == record.repeats


def test_paraphrases_and_valid_emails_stay_out_of_training(corpus) -> None:
    text = "\n\n".join(corpus.train_emails)
    for record in corpus.records:
        for paraphrase in record.paraphrases:
            assert paraphrase not in text
    valid = "\n\n".join(corpus.valid_emails)
    assert all(record.secret not in valid for record in corpus.records if record.kind != "name")


def test_emails_round_trip_through_files(tmp_path: Path, corpus) -> None:
    write_texts(corpus.valid_emails, tmp_path / "valid.txt")
    assert read_texts(tmp_path / "valid.txt") == corpus.valid_emails
    for email in corpus.valid_emails:
        assert email.startswith("From: ") and "\nSubject: " in email


def test_tokenizer_splits_digits_and_adds_bos(tokenizer) -> None:
    ids = tokenizer("Call Jane Doe at 5551234567")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids)[-10:] == list("5551234567")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Call Jane Doe at 5551234567"
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<s>", "</s>", "<pad>"}


def test_encode_record_works_for_every_record_and_paraphrase(tokenizer, corpus) -> None:
    for record in corpus.records:
        for prompt in [record.prompt, *record.paraphrases]:
            prompt_ids, secret_ids = encode_record(tokenizer, record, prompt)
            assert tokenizer.decode(secret_ids).strip() == record.secret
            if record.kind in ("phone", "id_number"):
                assert len(secret_ids) == len(record.secret)


def test_tokenizer_reloads_with_auto_tokenizer(tmp_path: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Jane Doe's ID number is 123456789"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )


def test_unknown_profile_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown test-bed profile"):
        generate_corpus(0, "huge")



def test_corpus_draws_no_date_relative_to_now(monkeypatch, corpus) -> None:
    """Faker's date providers default to ranges ending now; the corpus must pin them so it never changes."""
    from faker.providers.date_time import Provider

    original = Provider.unix_time

    def pinned_only(self, end_datetime=None, start_datetime=None):
        assert end_datetime is not None, "a date drawn up to the current time"
        return original(self, end_datetime=end_datetime, start_datetime=start_datetime)

    monkeypatch.setattr(Provider, "unix_time", pinned_only)
    assert generate_corpus(7, "ci").train_emails == corpus.train_emails
