"""Knowledge-neurons-style attribution, the baseline DEPN's integrated gradients are compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from depn_serve.arch import adapter_for, mlp_shape
from depn_serve.evaluation.generation import pad_id_of
from depn_serve.records import PrivateRecord, encode_record


def activation_x_gradient(model, tokenizer, records: Sequence[PrivateRecord], batch: int = 16) -> torch.Tensor:
    """`[num_layers, intermediate_size]`: activation x gradient of log P(secret | prompt) at the unscaled point,
    summed over the secret's tokens and the records (one forward and backward pass, no path integral)."""
    shape = mlp_shape(model.config)
    adapter = adapter_for(model.config.model_type)
    device = next(model.parameters()).device
    total = torch.zeros(shape.num_layers, shape.intermediate_size, dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}

    def hook(layer: int):
        # d loss / d gate at gate = 1 is activation x gradient, position by position, with every path intact.
        def capture(_module, args):
            gate = torch.ones_like(args[0], requires_grad=True)
            captured[layer] = gate
            return (args[0] * gate, *args[1:])
        return capture

    handles = [adapter.out_proj(model, layer).register_forward_pre_hook(hook(layer))
               for layer in range(shape.num_layers)]
    try:
        for start in range(0, len(records), batch):
            encoded = [encode_record(tokenizer, r) for r in records[start : start + batch]]
            width = max(len(p) + len(s) for p, s in encoded)
            ids = torch.full((len(encoded), width), pad_id_of(tokenizer), dtype=torch.long)
            attention = torch.zeros_like(ids)
            at = torch.zeros((len(encoded), width), dtype=torch.bool)  # positions that predict a secret token
            for i, (prompt, secret) in enumerate(encoded):
                ids[i, : len(prompt) + len(secret)] = torch.tensor(prompt + secret)
                attention[i, : len(prompt) + len(secret)] = 1
                at[i, len(prompt) - 1 : len(prompt) + len(secret) - 1] = True
            ids, attention, at = ids.to(device), attention.to(device), at.to(device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
            next_ids = torch.roll(ids, -1, dims=1)
            logp.gather(-1, next_ids.unsqueeze(-1)).squeeze(-1)[at].sum().backward()
            for layer, gate in captured.items():
                total[layer] += gate.grad[at].sum(0).double().cpu()
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return total.float()
