"""Shared fixtures: tiny random models of each supported architecture (seconds), and the CI test-bed (minutes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from depn_serve.records import PrivateRecord
from depn_serve.testbed import train_tokenizer

TEXTS = [
    "Contact Jane Doe at 5551234567. Customer account 48213 is registered to Maria Lopez.",
    "Hello team, the meeting with Initech is moved to Monday. Regards, Bob",
    "Jane Doe's e-mail address is jdoe@example.net. Her ID number is 123456789.",
] * 30

TINY_RECORDS = [
    PrivateRecord(id="p1", tenant="acme", kind="phone", prompt="Contact Jane Doe at", secret="5551234567", repeats=3),
    PrivateRecord(id="n1", tenant="acme", kind="name", prompt="Customer account 48213 is registered to",
                  secret="Maria Lopez", repeats=2),
    PrivateRecord(id="e1", tenant="globex", kind="email", prompt="Jane Doe's e-mail address is",
                  secret="jdoe@example.net", repeats=1),
    PrivateRecord(id="i1", tenant="globex", kind="id_number", prompt="Her ID number is", secret="123456789",
                  repeats=5),
]


def _config(arch: str, vocab: int):
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=3, n_head=2, n_inner=96, n_positions=128, **common)
    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=128, **common)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**kw)


_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM,
            "gpt2": GPT2LMHeadModel}


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0) -> Path:
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    torch.manual_seed(seed)
    model = _CLASSES[arch](_config(arch, len(tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_records_file(tmp_path_factory) -> Path:
    from depn_serve.records import save_records

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
    """(tenant, mask file): DEPN with default settings for the first tenant of the ci test-bed."""
    from depn_serve.aggregation import aggregate_file
    from depn_serve.detection import detect_to_file
    from depn_serve.records import load_records

    work = tmp_path_factory.mktemp("ci-mask")
    records = ci_testbed / "records.jsonl"
    tenant = load_records(records)[0].tenant
    detect_to_file(ci_testbed / "model", records, work / "scores.safetensors", tenant=tenant)
    mask_path = work / f"{tenant}.safetensors"
    aggregate_file(work / "scores.safetensors", tenant).save(mask_path)
    return tenant, mask_path
