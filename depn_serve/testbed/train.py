"""From-scratch Llama training on packed e-mails, sized to a fixed step budget so a seed fixes the weights."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import LlamaConfig, LlamaForCausalLM

from depn_serve.core.errors import DepnError
from depn_serve.testbed.profiles import ProfileSpec


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    final_loss: float  # mean over the last steps, less noisy than the very last batch


def make_model(spec: ProfileSpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> LlamaForCausalLM:
    if spec.hidden // spec.heads < 32:
        raise DepnError("head size must be at least 32 (vLLM attention kernels)")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(torch.float32)


def packed_blocks(docs: Sequence[Sequence[int]], block_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless stream of `block_size` windows over the documents, reshuffled every epoch.

    The tail of one epoch continues into the next, so no tokens are dropped and every block is full.
    """
    buffer: list[int] = []
    order = list(range(len(docs)))
    while True:
        rng.shuffle(order)
        for i in order:
            buffer.extend(docs[i])
            while len(buffer) >= block_size:
                yield buffer[:block_size]
                buffer = buffer[block_size:]


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor`: ending the budget at a low rate settles memorized secrets."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: LlamaForCausalLM,
    docs: Sequence[Sequence[int]],
    spec: ProfileSpec,
    seed: int,
    progress: bool,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_steps: frozenset[int] = frozenset(),
) -> TrainResult:
    """Train in place; `checkpoint(step)` runs after each step in `checkpoint_steps` (it must not touch the RNG)."""
    torch.manual_seed(seed)
    blocks = packed_blocks(docs, spec.block_size, random.Random(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, spec.warmup_steps, spec.steps)
    )
    model.train()
    losses: list[float] = []
    start = time.monotonic()
    with Progress(
        TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(), disable=not progress,
    ) as bar:
        task = bar.add_task("train", total=spec.steps, loss=float("nan"))
        for step in range(1, spec.steps + 1):
            batch = torch.tensor([next(blocks) for _ in range(spec.batch_size)], dtype=torch.long)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(task, advance=1, loss=loss.item())
            if checkpoint is not None and step in checkpoint_steps:
                model.eval()
                checkpoint(step)
                model.train()
    model.eval()
    tail = losses[-20:]
    return TrainResult(steps=spec.steps, seconds=time.monotonic() - start, final_loss=sum(tail) / len(tail))
