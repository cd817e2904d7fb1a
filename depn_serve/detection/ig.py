"""Privacy neuron detector: integrated gradients over the MLP intermediate activation of a causal LM.

For every secret token (teacher forcing: prompt plus the preceding secret tokens as input), every attributed
layer l and every step k, one batch row scales layer l's activation at the position that predicts the token by
alpha_k = k/m (left Riemann sum, zero baseline), leaving every other layer and position untouched. One batched
forward/backward serves all steps, layers, tokens and several records at once. A neuron's score is
activation x mean gradient of the target token's probability, summed over the secret's tokens.

Scaling one position cannot change the positions before it (causal attention), so the prefix before each
predicting position is run once, unscaled, and its KV cache is shared by all of that token's rows: each row then
costs a single token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from depn_serve.arch import adapter_for, mlp_shape
from depn_serve.records import PrivateRecord, encode_record


@dataclass(frozen=True)
class _Group:
    """One secret token of one record: the rows for every attributed layer and step share its prefix."""

    record: int  # index into the records being scored
    prefix: tuple[int, ...]  # tokens before the predicting position
    token: int  # token at the predicting position
    target: int  # secret token it must predict


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

    Layers outside `layers` keep a zero score. Rows (token x layer x step) run in batches of about `batch_rows`
    (at least one token's rows); a record's result is yielded as soon as all its tokens are done, so memory does
    not grow with the record count.
    """
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, found {steps}")
    shape = mlp_shape(model.config)
    layer_list = list(range(shape.num_layers)) if layers is None else sorted(set(layers))
    if not layer_list or not all(0 <= layer < shape.num_layers for layer in layer_list):
        raise ValueError(f"layers: expected indices in [0, {shape.num_layers}), found {list(layers or [])}")
    groups_per_batch = max(1, batch_rows // (len(layer_list) * steps))

    groups_left = [0] * len(records)
    scores: dict[int, torch.Tensor] = {}

    def groups() -> Iterator[_Group]:
        for index, record in enumerate(records):
            prompt_ids, secret_ids = encode_record(tokenizer, record)
            full = prompt_ids + secret_ids
            groups_left[index] = len(secret_ids)
            scores[index] = torch.zeros(shape.num_layers, shape.intermediate_size)
            for j, target in enumerate(secret_ids):
                pos = len(prompt_ids) + j - 1
                yield _Group(index, tuple(full[:pos]), full[pos], target)

    emitted = 0
    batch: list[_Group] = []
    for group in groups():
        batch.append(group)
        if len(batch) == groups_per_batch:
            _accumulate(model, batch, layer_list, steps, scores, groups_left)
            batch = []
            while emitted < len(records) and emitted in scores and groups_left[emitted] == 0:
                yield records[emitted], scores.pop(emitted)
                emitted += 1
                if on_record_done:
                    on_record_done()
    if batch:
        _accumulate(model, batch, layer_list, steps, scores, groups_left)
    while emitted < len(records):
        yield records[emitted], scores.pop(emitted)
        emitted += 1
        if on_record_done:
            on_record_done()


def _accumulate(
    model,
    batch: list[_Group],
    layer_list: list[int],
    steps: int,
    scores: dict[int, torch.Tensor],
    groups_left: list[int],
) -> None:
    """One forward/backward over every row of a batch of groups; adds the IG terms to the records' scores."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    adapter = adapter_for(model.config.model_type)
    per_group = len(layer_list) * steps
    n_rows = len(batch) * per_group

    # Unscaled prefixes, left-padded, run once per group (not once per row).
    width = max(len(g.prefix) for g in batch)
    prefix_mask = torch.zeros(len(batch), width, dtype=torch.long)
    prefix_ids = torch.zeros(len(batch), width, dtype=torch.long)
    for i, group in enumerate(batch):
        if group.prefix:
            prefix_ids[i, width - len(group.prefix) :] = torch.tensor(group.prefix)
            prefix_mask[i, width - len(group.prefix) :] = 1
    cache = None
    if width:
        with torch.no_grad():
            cache = model(
                input_ids=prefix_ids.to(device),
                attention_mask=prefix_mask.to(device),
                position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0).to(device),
                use_cache=True,
            ).past_key_values
        cache.batch_repeat_interleave(per_group)

    # Row r of group g: layer layer_list[(r // steps) % L], alpha ((r % steps) / steps).
    row_layer = torch.tensor(layer_list).repeat_interleave(steps).repeat(len(batch))
    alpha = (torch.arange(steps, dtype=dtype) / steps).repeat(len(batch) * len(layer_list))
    row_group = torch.arange(len(batch)).repeat_interleave(per_group)
    tokens = torch.tensor([g.token for g in batch]).repeat_interleave(per_group)[:, None]
    target = torch.tensor([g.target for g in batch]).repeat_interleave(per_group).to(device)
    attention = torch.cat([prefix_mask.repeat_interleave(per_group, dim=0), torch.ones(n_rows, 1, dtype=torch.long)], 1)
    positions = prefix_mask.sum(1).repeat_interleave(per_group)[:, None]

    scale_of = {
        layer: torch.where(row_layer == layer, alpha, torch.ones_like(alpha)).view(n_rows, 1, 1).to(device)
        for layer in layer_list
    }
    unscaled: dict[int, torch.Tensor] = {}
    scaled: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(_module, args):
            unscaled[layer] = args[0].detach()
            scaled[layer] = args[0] * scale_of[layer]
            return (scaled[layer], *args[1:])

        return hook

    handles = [adapter.out_proj(model, layer).register_forward_pre_hook(make_hook(layer)) for layer in layer_list]
    try:
        with torch.enable_grad():
            for scale in scale_of.values():
                scale.requires_grad_(True)  # makes every scaled activation part of the graph
            hidden = model.base_model(
                input_ids=tokens.to(device),
                attention_mask=attention.to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=cache is not None,
            ).last_hidden_state[:, -1]
            logits = model.get_output_embeddings()(hidden)
            prob = torch.softmax(logits.float(), dim=-1).gather(1, target[:, None]).sum()
            grads = torch.autograd.grad(prob, [scaled[layer] for layer in layer_list])
    finally:
        for handle in handles:
            handle.remove()

    record_ids = sorted({g.record for g in batch})
    local_of = {rec: i for i, rec in enumerate(record_ids)}
    row_local = torch.tensor([local_of[g.record] for g in batch])[row_group]
    local = torch.zeros(len(record_ids), *scores[record_ids[0]].shape)
    for layer, grad in zip(layer_list, grads):
        sel = (row_layer == layer).nonzero().flatten()
        sel_dev = sel.to(device)
        terms = (unscaled[layer][sel_dev, -1] * grad[sel_dev, -1]).float().cpu() / steps
        local[:, layer].index_add_(0, row_local[sel], terms)
    for rec, i in local_of.items():
        scores[rec] += local[i]
    for group in batch:
        groups_left[group.record] -= 1
