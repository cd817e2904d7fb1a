"""Padding token-id sequences into a batch: one pad id for every HF-side computation, and one helper per side.

Right padding suits teacher-forced passes (positions line up from the start); left padding suits generation and
anything that reads the last position (every row ends at the same column).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-text token, else 0 (padded positions are masked out anyway)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return tok_id
    return 0


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", device=None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both long `[len(seqs), longest]`, padded on `side` ("right" or "left")."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if not seq:
            continue
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.tensor(seq)
        attention[row, cols] = 1
    return (ids, attention) if device is None else (ids.to(device), attention.to(device))
