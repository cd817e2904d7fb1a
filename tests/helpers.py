"""Plain test helpers (no fixtures): the tiny corpus, the tiny records and tiny random models of each supported
architecture. Tests import them with `from tests.helpers import ...`; the fixtures built on them are in conftest.py."""

from __future__ import annotations

from pathlib import Path

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

from depn_serve.core.records import PrivateRecord
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


def certified(mask, passed: bool = True, criteria=None, policy=None, attacks: tuple[str, ...] | None = None):
    """`mask` with a certificate whose per-record results pass (or fail: one forgotten record leaks greedily), as
    its tenant's isolation mask unless `policy` says otherwise, judged by `criteria` (default: the product's), after
    `attacks` (default: every attack of the suite). For the serving gate's tests: the gate reads certificates,
    `depn verify` is tested on its own."""
    from depn_serve.artifacts.criteria import Criteria
    from depn_serve.artifacts.verification import RecordVerdict, Verification, judge
    from depn_serve.core.selectors import MaskPolicy

    criteria = criteria or Criteria()
    tries = {"greedy": 1, "paraphrase": 2, "context": 2, "sample@0.7": 10, "sample@1": 10, "beam": 20,
             "substitution": 3}
    tries = {a: n for a, n in tries.items() if attacks is None or a in attacks}
    records = [RecordVerdict(id="r1", tenant="globex", kind="phone", role="forget", tries=tries,
                             hits={**dict.fromkeys(tries, 0), "greedy": 0 if passed else 1})]
    failures = judge(criteria, records, 10.0, 10.0)
    verification = Verification(
        model_fingerprint=mask.manifest.model_fingerprint, mask_sha256=mask.bits_sha256(),
        policy=policy or MaskPolicy.isolation(mask.manifest.tenant), attacks={}, criteria=criteria, records=records,
        perplexity_before=10.0, perplexity_after=10.0, seconds=0.0, failures=failures, passed=not failures)
    return mask.certified(verification)


def http_status(url: str, key: str | None, path: str = "/v1/models", method: str = "GET") -> int:
    """The status a request with this key (or none) gets from a running server."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def generate_as_tenants(llm, offs: dict, asks: list[tuple[str | None, str]], max_tokens: int) -> list:
    """Bind each tenant's off mask in a `vllm.LLM` built with depn-serve's engine kwargs, then answer every
    (tenant or None, prompt) of `asks` greedily in one batch; the engine is shut down after."""
    import gc

    from vllm import SamplingParams

    from depn_serve.artifacts.mask import pack_bits

    try:
        for tenant, off in offs.items():
            llm.collective_rpc("depn_bind", args=(tenant, tenant, pack_bits(off).tobytes()))
        params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                 extra_args={"depn_tenant": t} if t else None) for t, _ in asks]
        return llm.generate([p for _, p in asks], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
