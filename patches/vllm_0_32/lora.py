"""A fix for vLLM 0.32's CPU LoRA ops: a request without an adapter must not run with another request's.

The torch ops the CPU platform uses for LoRA (`vllm/lora/ops/torch_ops`) gather each token's adapter with its slot
index, and tokens of requests without an adapter carry -1, which Python indexing reads as the last slot: in a batch
mixing both, the requests without an adapter ran with the adapter in the last slot (with the default
`max_loras=1`, the one adapter loaded). Seen here with a random peft adapter: a plain request answered exactly as
the merged model. The GPU kernels skip -1 tokens; so do these ops once wrapped: the output rows of those tokens are
left as they were. (Reported upstream as vllm-project/vllm#48421, not in 0.32.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def _skipping_no_adapter(op: Callable) -> Callable:
    """`op` for the tokens with an adapter; the rows of tokens with index -1 keep their values. No data-dependent
    branch, so it traces under torch.compile like the op itself."""

    @functools.wraps(op)
    def wrapped(inputs, weights, output_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor, *args, **kwargs):
        if output_tensor.shape[0] != lora_indices_tensor.shape[0]:  # not a row per token: nothing to keep apart
            return op(inputs, weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        before = output_tensor.clone()
        op(inputs, weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
        output_tensor.copy_(torch.where((lora_indices_tensor < 0).unsqueeze(-1), before, output_tensor))

    return wrapped


def install() -> None:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        fixed = _skipping_no_adapter(getattr(lora_ops, name))
        setattr(lora_ops, name, fixed)  # the prefill (sgmv) ops call these through the module
        setattr(punica_cpu, name, fixed)  # the decode path imported them by name
