"""Batched greedy decoding on the HF side: the reference for extraction and for the vLLM equivalence check."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from depn_serve.core.batching import pad, pad_id_of
from depn_serve.core.records import PrivateRecord, encode_record


@torch.no_grad()
def greedy_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, batch_size: int = 64
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (left-padded batches; rows that hit EOS are padded)."""
    return [rows[0] for rows in _generate(model, prompts, max_new_tokens, pad_id, batch_size, {"do_sample": False})]


@torch.no_grad()
def sample_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, temperature: float, samples: int,
    seed: int = 0, batch_size: int = 16,
) -> list[list[list[int]]]:
    """`samples` continuations per prompt, sampled from the full distribution at `temperature` (seeded)."""
    torch.manual_seed(seed)
    options = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
               "num_return_sequences": samples}
    return _generate(model, prompts, max_new_tokens, pad_id, batch_size, options)


def _generate(model, prompts, max_new_tokens: int, pad_id: int, batch_size: int, options: dict
              ) -> list[list[list[int]]]:
    device = next(model.parameters()).device
    per_prompt = options.get("num_return_sequences", 1)
    out: list[list[list[int]]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = pad(chunk, pad_id, side="left", device=device)
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **options,
        )[:, ids.shape[1]:].tolist()
        out.extend(generated[i : i + per_prompt] for i in range(0, len(generated), per_prompt))
    return out


def greedy_extraction(model, tokenizer, records: Sequence[PrivateRecord], prompts: Sequence[str] | None = None
                      ) -> list[bool]:
    """Whether greedy decoding after each record's prompt reproduces its secret token for token."""
    encoded = [
        encode_record(tokenizer, rec, None if prompts is None else prompts[i]) for i, rec in enumerate(records)
    ]
    longest = max(len(secret) for _, secret in encoded)
    continuations = greedy_generate(model, [p for p, _ in encoded], longest, pad_id_of(tokenizer))
    return [cont[: len(secret)] == secret for cont, (_, secret) in zip(continuations, encoded)]
