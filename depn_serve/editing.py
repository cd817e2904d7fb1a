"""Reference editing on a HF model: multiply the activation entering the MLP output projection by a 0/1 row.

This is the definition of "applying a mask"; the vLLM path must reproduce it bit for bit in greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from depn_serve.arch import adapter_for


@contextmanager
def masked(model, off: torch.Tensor) -> Iterator[None]:
    """Within the block, neurons where `off[layer, neuron]` is True output zero into the MLP output projection."""
    adapter = adapter_for(model.config.model_type)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    keep = (~off.to(torch.bool)).to(dtype=dtype, device=device)
    handles = []
    for layer in range(keep.shape[0]):
        if bool(off[layer].any()):
            row = keep[layer]
            handles.append(
                adapter.out_proj(model, layer).register_forward_pre_hook(
                    lambda _m, args, row=row: (args[0] * row, *args[1:])
                )
            )
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
