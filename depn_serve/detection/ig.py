"""Privacy neuron detector: integrated gradients over the MLP intermediate activation of a causal LM.

For every secret token (teacher forcing: prompt plus the preceding secret tokens as input), every attributed
layer l and every step k, one batch row scales layer l's activation at the position that predicts the token by
alpha_k = k/m (left Riemann sum, zero baseline), leaving every other layer and position untouched. One batched
forward/backward serves all steps, layers, tokens and several records at once. A neuron's score is
activation x mean gradient of the target token's probability, summed over the secret's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from depn_serve.arch import adapter_for, mlp_shape
from depn_serve.records import PrivateRecord, encode_record


@dataclass(frozen=True)
class _Row:
    record: int  # index into the records being scored
    ids: tuple[int, ...]  # prompt + secret tokens up to and including the target
    pos: int  # position whose output predicts `target`
    target: int
    layer: int
    alpha: float


def detect(
    model,
    tokenizer,
    records: Sequence[PrivateRecord],
    *,
    steps: int = 20,
    layers: Sequence[int] | None = None,
    batch_rows: int = 512,
    on_record_done: Callable[[], None] | None = None,
) -> Iterator[tuple[PrivateRecord, torch.Tensor]]:
    """Yield (record, float32 scores `[num_layers, intermediate_size]`) in record order.

    Layers outside `layers` keep a zero score. Records are scored in batches of up to `batch_rows` rows; a
    record's result is yielded as soon as all its rows are done, so memory does not grow with the record count.
    """
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, found {steps}")
    shape = mlp_shape(model.config)
    layer_list = list(range(shape.num_layers)) if layers is None else sorted(set(layers))
    if not layer_list or not all(0 <= layer < shape.num_layers for layer in layer_list):
        raise ValueError(f"layers: expected indices in [0, {shape.num_layers}), found {list(layers or [])}")

    rows_left = [0] * len(records)
    scores: dict[int, torch.Tensor] = {}

    def rows() -> Iterator[_Row]:
        for index, record in enumerate(records):
            prompt_ids, secret_ids = encode_record(tokenizer, record)
            full = prompt_ids + secret_ids
            rows_left[index] = len(secret_ids) * len(layer_list) * steps
            scores[index] = torch.zeros(shape.num_layers, shape.intermediate_size)
            for j, target in enumerate(secret_ids):
                pos = len(prompt_ids) + j - 1
                for layer in layer_list:
                    for k in range(steps):
                        yield _Row(index, tuple(full[: pos + 1]), pos, target, layer, k / steps)

    next_to_emit = 0
    batch: list[_Row] = []
    for row in rows():
        batch.append(row)
        if len(batch) == batch_rows:
            _accumulate(model, batch, layer_list, steps, scores, rows_left)
            batch = []
            while next_to_emit < len(records) and rows_left[next_to_emit] == 0 and next_to_emit in scores:
                yield records[next_to_emit], scores.pop(next_to_emit)
                next_to_emit += 1
                if on_record_done:
                    on_record_done()
    if batch:
        _accumulate(model, batch, layer_list, steps, scores, rows_left)
    while next_to_emit < len(records):
        yield records[next_to_emit], scores.pop(next_to_emit)
        next_to_emit += 1
        if on_record_done:
            on_record_done()


def _accumulate(
    model,
    batch: list[_Row],
    layer_list: list[int],
    steps: int,
    scores: dict[int, torch.Tensor],
    rows_left: list[int],
) -> None:
    """One forward/backward over a batch of rows; adds each row's IG term to its record's scores."""
    device = next(model.parameters()).device
    adapter = adapter_for(model.config.model_type)
    width = max(len(r.ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    attn = torch.zeros(len(batch), width, dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, : len(row.ids)] = torch.tensor(row.ids)
        attn[i, : len(row.ids)] = 1
    row_idx = torch.arange(len(batch))
    pos = torch.tensor([r.pos for r in batch])
    target = torch.tensor([r.target for r in batch], device=device)
    row_layer = torch.tensor([r.layer for r in batch])

    dtype = next(model.parameters()).dtype
    scale_of: dict[int, torch.Tensor] = {}
    for layer in layer_list:
        selected = row_layer == layer
        if selected.any():
            scale = torch.ones(len(batch), width, 1, dtype=dtype)
            scale[row_idx[selected], pos[selected], 0] = torch.tensor(
                [r.alpha for r, s in zip(batch, selected.tolist()) if s], dtype=dtype
            )
            scale_of[layer] = scale.to(device).requires_grad_(True)

    unscaled: dict[int, torch.Tensor] = {}
    scaled: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, args):
            unscaled[layer] = args[0].detach()
            scaled[layer] = args[0] * scale_of[layer]
            return (scaled[layer], *args[1:])

        return hook

    handles = [adapter.out_proj(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in scale_of]
    try:
        with torch.enable_grad():
            hidden = model.base_model(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
            logits = model.get_output_embeddings()(hidden[row_idx.to(device), pos.to(device)])
            prob = torch.softmax(logits.float(), dim=-1).gather(1, target[:, None]).sum()
            layers_done = list(scale_of)
            grads = torch.autograd.grad(prob, [scaled[layer] for layer in layers_done])
    finally:
        for handle in handles:
            handle.remove()

    record_ids = sorted({r.record for r in batch})
    local_of = {rec: i for i, rec in enumerate(record_ids)}
    row_local = torch.tensor([local_of[r.record] for r in batch])
    local = torch.zeros(len(record_ids), *scores[record_ids[0]].shape)
    for layer, grad in zip(layers_done, grads):
        sel = (row_layer == layer).nonzero().flatten()
        sel_dev, p = sel.to(device), pos[sel].to(device)
        terms = (unscaled[layer][sel_dev, p] * grad[sel_dev, p]).float().cpu() / steps
        local[:, layer].index_add_(0, row_local[sel], terms)
    for rec, i in local_of.items():
        scores[rec] += local[i]
    for row in batch:
        rows_left[row.record] -= 1
