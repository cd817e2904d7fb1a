"""Knowledge-neurons-style attribution, the baseline DEPN's integrated gradients are compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from depn_serve.core.arch import hooked, mlp_shape
from depn_serve.core.batching import pad, pad_id_of
from depn_serve.core.records import PrivateRecord, encode_record


def activation_x_gradient(model, tokenizer, records: Sequence[PrivateRecord], batch: int = 16) -> torch.Tensor:
    """`[num_layers, intermediate_size]`: activation x gradient of log P(secret | prompt) at the unscaled point,
    summed over the secret's tokens and the records (one forward and backward pass, no path integral)."""
    shape = mlp_shape(model.config)
    device = next(model.parameters()).device
    total = torch.zeros(shape.dims, dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}

    def gate(layer: int, activation: torch.Tensor) -> torch.Tensor:
        # d loss / d gate at gate = 1 is activation x gradient, position by position, with every path intact.
        captured[layer] = torch.ones_like(activation, requires_grad=True)
        return activation * captured[layer]

    with hooked(model, {layer: (lambda x, layer=layer: gate(layer, x)) for layer in range(shape.num_layers)}):
        for start in range(0, len(records), batch):
            encoded = [encode_record(tokenizer, r) for r in records[start : start + batch]]
            ids, attention = pad([p + s for p, s in encoded], pad_id_of(tokenizer), device=device)
            at = torch.zeros(ids.shape, dtype=torch.bool, device=device)  # positions that predict a secret token
            for i, (prompt, secret) in enumerate(encoded):
                at[i, len(prompt) - 1 : len(prompt) + len(secret) - 1] = True
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
            next_ids = torch.roll(ids, -1, dims=1)
            logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)[at].sum().backward()
            for layer, grad_gate in captured.items():
                total[layer] += grad_gate.grad[at].sum(0).double().cpu()
            captured.clear()
    return total.float()
