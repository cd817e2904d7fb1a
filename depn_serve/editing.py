"""Reference editing on a HF model: multiply the activation entering the MLP output projection by a 0/1 row.

This is the definition of "applying a mask"; the vLLM path must reproduce it bit for bit in greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from depn_serve.core.arch import hooked


@contextmanager
def masked(model, off: torch.Tensor) -> Iterator[None]:
    """Within the block, neurons where `off[layer, neuron]` is True output zero into the MLP output projection."""
    param = next(model.parameters())
    keep = (~off.to(torch.bool)).to(dtype=param.dtype, device=param.device)
    with hooked(model, {layer: (lambda x, row=keep[layer]: x * row) for layer in range(len(keep)) if off[layer].any()}):
        yield
