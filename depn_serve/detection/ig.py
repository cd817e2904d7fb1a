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
from pydantic import BaseModel, ConfigDict, Field

from depn_serve.core.arch import hooked, mlp_shape
from depn_serve.core.batching import pad
from depn_serve.core.errors import DepnError
from depn_serve.core.records import PrivateRecord, encode_record


class DetectSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(20, ge=1, description="integrated-gradient steps (m)")
    layers: list[int] | None = Field(None, description="layers to attribute (default: all)")
    batch_rows: int = Field(512, ge=1, description="rows (token x layer x step) per forward pass")
    shard_records: int = Field(64, ge=1, description="records per shard: no batch spans two shards, so shards "
                                                     "scored apart (on a cluster) give the very same scores")


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
    settings: DetectSettings | None = None,
    on_record_done: Callable[[], None] | None = None,
) -> Iterator[tuple[PrivateRecord, torch.Tensor]]:
    """Yield (record, float32 scores `[num_layers, intermediate_size]`) in record order.

    Layers outside `settings.layers` keep a zero score. Rows (token x layer x step) run in batches of about
    `settings.batch_rows` (at least one token's rows) that never cross a shard boundary (`settings.shard_records`);
    a record's result is yielded as soon as all its tokens are done, so memory does not grow with the record count.
    """
    settings = settings or DetectSettings()
    steps = settings.steps
    shape = mlp_shape(model.config)
    layer_list = list(range(shape.num_layers)) if settings.layers is None else sorted(set(settings.layers))
    if not layer_list or not all(0 <= layer < shape.num_layers for layer in layer_list):
        raise DepnError(f"layers: expected indices in [0, {shape.num_layers}), found {settings.layers}")
    groups_per_batch = max(1, settings.batch_rows // (len(layer_list) * steps))

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
        if batch and group.record % settings.shard_records == 0 and group.record != batch[-1].record:
            _accumulate(model, batch, layer_list, steps, scores, groups_left)  # a shard starts: flush
            batch = []
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
    per_group = len(layer_list) * steps
    n_rows = len(batch) * per_group

    # Unscaled prefixes, left-padded, run once per group (not once per row).
    prefix_ids, prefix_mask = pad([g.prefix for g in batch], 0, side="left")
    width = prefix_ids.shape[1]
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

    def scale(layer: int, activation: torch.Tensor) -> torch.Tensor:
        unscaled[layer] = activation.detach()
        scaled[layer] = activation * scale_of[layer]
        return scaled[layer]

    with hooked(model, {layer: (lambda x, layer=layer: scale(layer, x)) for layer in layer_list}), torch.enable_grad():
        for factor in scale_of.values():
            factor.requires_grad_(True)  # makes every scaled activation part of the graph
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
