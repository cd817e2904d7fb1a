"""Build the test-bed: corpus -> tokenizer -> trained Llama -> memorization report, all under one output folder.

Layout of `out`: model/ (HF model and tokenizer), records.jsonl, train.txt, valid.txt, testbed.json, and with
`checkpoints` > 0 checkpoints/step-NNNNN/ (model and tokenizer at evenly spaced training steps, for studies).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from depn_serve.core.fileio import atomic_write_text
from depn_serve.core.records import PrivateRecord, encode_record, save_records, write_texts
from depn_serve.evaluation.generation import greedy_extraction
from depn_serve.evaluation.metrics import perplexity
from depn_serve.testbed.corpus import KINDS, generate_corpus
from depn_serve.testbed.profiles import ProfileName, profile_spec
from depn_serve.testbed.tokenizer import train_tokenizer
from depn_serve.testbed.train import make_model, train


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSize(_Frozen):
    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int
    params: int


class CorpusSize(_Frozen):
    train_emails: int
    train_tokens: int
    valid_emails: int
    records_per_tenant: dict[str, int]
    records_per_kind: dict[str, int]


class TrainingStats(_Frozen):
    steps: int
    seconds: float
    final_loss: float
    valid_perplexity: float


class Memorization(_Frozen):
    """Share of records whose secret greedy decoding reproduces exactly."""

    overall: float
    per_kind: dict[str, float]
    phone: float
    paraphrase: float  # with each record's first held-out carrier: how far memorization generalizes


class TestbedInfo(_Frozen):
    __test__ = False  # not a pytest class despite the name

    profile: Literal["ci", "default"]
    seed: int
    build_seconds: float
    model: ModelSize
    corpus: CorpusSize
    training: TrainingStats
    memorization: Memorization


def build_testbed(
    out: Path,
    profile: ProfileName,
    seed: int,
    progress: bool = True,
    checkpoints: int = 0,
    model_size: dict[str, int] | None = None,
) -> TestbedInfo:
    """Build a small Llama that memorized the private records of a synthetic e-mail corpus (CPU, deterministic).

    `checkpoints` saves that many intermediate models (the last one is the final model itself); `model_size`
    overrides the profile's hidden / layers / intermediate / heads, same corpus and training budget.
    """
    start = time.monotonic()
    spec = profile_spec(profile)
    if model_size:
        spec = dataclasses.replace(spec, **model_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = generate_corpus(seed, spec)
    save_records(corpus.records, out / "records.jsonl")
    write_texts(corpus.train_emails, out / "train.txt")
    write_texts(corpus.valid_emails, out / "valid.txt")

    tokenizer = train_tokenizer(corpus.train_emails, spec.vocab_size)
    for record in corpus.records:  # fails early if a prompt does not tokenize as a prefix of its record
        for prompt in [record.prompt, *record.paraphrases]:
            encode_record(tokenizer, record, prompt)
    eos = tokenizer.eos_token_id
    train_docs = [tokenizer(text)["input_ids"] + [eos] for text in corpus.train_emails]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(seed)
        model = make_model(spec, len(tokenizer), tokenizer.bos_token_id, eos, tokenizer.pad_token_id)
        steps = frozenset(round(k * spec.steps / checkpoints) for k in range(1, checkpoints))

        def save(step: int) -> None:
            model.save_pretrained(out / "checkpoints" / f"step-{step:05d}")
            tokenizer.save_pretrained(out / "checkpoints" / f"step-{step:05d}")

        result = train(model, train_docs, spec, seed, progress, save, steps)
        valid_ppl = perplexity(model, tokenizer, corpus.valid_emails)
        memorization = _memorization(model, tokenizer, corpus.records)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")

    info = TestbedInfo(
        profile=profile,
        seed=seed,
        build_seconds=round(time.monotonic() - start, 1),
        model=ModelSize(
            hidden=spec.hidden,
            layers=spec.layers,
            intermediate=spec.intermediate,
            heads=spec.heads,
            vocab=len(tokenizer),
            params=sum(p.numel() for p in model.parameters()),
        ),
        corpus=CorpusSize(
            train_emails=len(train_docs),
            train_tokens=sum(len(d) for d in train_docs),
            valid_emails=len(corpus.valid_emails),
            records_per_tenant=dict(Counter(r.tenant for r in corpus.records)),
            records_per_kind=dict(Counter(r.kind for r in corpus.records)),
        ),
        training=TrainingStats(
            steps=result.steps,
            seconds=round(result.seconds, 1),
            final_loss=round(result.final_loss, 4),
            valid_perplexity=round(valid_ppl, 3),
        ),
        memorization=memorization,
    )
    atomic_write_text(out / "testbed.json", info.model_dump_json(indent=2) + "\n")
    return info


def load_testbed_info(path: Path) -> TestbedInfo:
    """Read `testbed.json`; `path` may also be the test-bed folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "testbed.json"
    return TestbedInfo.model_validate_json(path.read_text(encoding="utf-8"))


def _memorization(model, tokenizer, records: list[PrivateRecord]) -> Memorization:
    hits = greedy_extraction(model, tokenizer, records)
    paraphrase_hits = greedy_extraction(model, tokenizer, records, [r.paraphrases[0] for r in records])
    per_kind = {
        kind: _rate([hit for hit, r in zip(hits, records) if r.kind == kind]) for kind in KINDS
    }
    return Memorization(
        overall=_rate(hits), per_kind=per_kind, phone=per_kind["phone"], paraphrase=_rate(paraphrase_hits)
    )


def _rate(hits: list[bool]) -> float:
    return round(sum(hits) / len(hits), 4) if hits else 0.0
