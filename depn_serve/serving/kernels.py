"""The neuron masks on the device as bits, and the ops that apply them to each token: a Triton kernel for GPUs
(SiluAndMul and the mask in one pass, or the mask alone) and a torch path for everything else.

Why bits: a bf16 keep row costs 2 bytes per neuron, so 10,000 tenants x 32 layers x 14,336 neurons is 9.2 GB; as
bits it is 0.57 GB, small enough to keep every bound mask resident. Why fused: the mask is then read as 1/16 of
the activation's bytes and applied while the activation is in registers, instead of a gather of a full-width row
and a second elementwise pass over the activation.

Device format (`words`): int32 `[rows, ceil(intermediate / 32)]`; bit j (little order) of word w is neuron
32 * w + j, 1 = KEEP, 0 = switched off; the bits past `intermediate` are zero here and ignored by the readers.
`index`: int32 `[tokens]`, the row of each token. Callers reserve row `IDENTITY_ROW` (all kept) and row
`DENY_ROW` (all off); `reserved_words` builds both.

Backends (`select_backend`): "triton" (`silu_and_mul_masked_triton` in place of SiluAndMul, `mask_triton` for the
mask alone) on CUDA; "torch" elsewhere (`mask_bits_`: each 16 bits of a token's row look up their 16 lanes in a
table and are ANDed into the activation's bits in place, one custom op, opaque to torch.compile because inductor's
own gather code is several times slower on CPU). `keep_rows` (0/1 rows) and `silu_and_mul_masked_torch` are the
plain reference the others are tested against. Triton is optional: this module imports without it (and without
vLLM), and TRITON_INTERPRET=1 runs the kernel on CPU tensors in tests.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

try:  # optional: CPU-only vLLM builds and the CPU test machine may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

IDENTITY_ROW = 0
DENY_ROW = 1
BITS = 32
BLOCK = 1024  # columns per Triton program: a multiple of 32, so a program reads whole words


def words_per_row(intermediate: int) -> int:
    """Int32 words holding one row of `intermediate` bits."""
    return -(-intermediate // BITS)


def _bytes_to_words(keep_bytes: np.ndarray, intermediate: int, invert: bool = False) -> np.ndarray:
    """`[n, ceil(intermediate / 8)]` uint8 bits (little order; keep bits, or off bits with `invert`) -> `[n, words]`
    int32 keep words: one pass writing the (inverted) bytes into a word-padded buffer, the bits past
    `intermediate` zeroed, each 4 bytes read as one little-endian int32."""
    n, width = keep_bytes.shape
    out = np.empty((n, words_per_row(intermediate) * 4), dtype=np.uint8)
    if invert:
        np.invert(keep_bytes, out=out[:, :width])
    else:
        out[:, :width] = keep_bytes
    out[:, width:] = 0
    if intermediate % 8:
        out[:, width - 1] &= (1 << (intermediate % 8)) - 1
    return out.view("<i4").astype(np.int32, copy=False)


def keep_words(off: np.ndarray) -> np.ndarray:
    """Bool `[n, intermediate]`, True = switched off -> int32 `[n, ceil(intermediate / 32)]` keep words."""
    off = np.asarray(off, dtype=bool)
    if off.ndim != 2:
        raise ValueError(f"keep_words: expected a 2-d [rows, intermediate] bool array, got shape {off.shape}")
    return _bytes_to_words(np.packbits(~off, axis=1, bitorder="little"), off.shape[1])


def keep_words_from_packed(packed: np.ndarray, intermediate: int,
                           shard: tuple[int, int] | None = None) -> np.ndarray:
    """The mask file/wire format (`pack_bits`: uint8 `[layers, ceil(intermediate / 8)]`, little order, 1 = OFF)
    -> int32 keep words `[layers, ceil(width / 32)]`, without unpacking to one byte per neuron: the worker calls
    this on every bind. `shard` = `[start, stop)` keeps only a tensor-parallel rank's columns (byte-aligned
    starts stay on the fast path; others unpack)."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != -(-intermediate // 8):
        raise ValueError(f"keep_words_from_packed: expected uint8 [layers, {-(-intermediate // 8)}] for "
                         f"{intermediate} neurons, got {packed.dtype} {packed.shape}")
    start, stop = shard if shard is not None else (0, intermediate)
    if not 0 <= start <= stop <= intermediate:
        raise ValueError(f"keep_words_from_packed: shard {shard} is not inside [0, {intermediate})")
    if start % 8:
        off = np.unpackbits(packed, axis=1, bitorder="little", count=intermediate).astype(bool)
        return keep_words(off[:, start:stop])
    return _bytes_to_words(packed[:, start // 8: -(-stop // 8)], stop - start, invert=True)


def reserved_words(intermediate: int) -> np.ndarray:
    """The two reserved rows, `[2, words]`: row `IDENTITY_ROW` keeps every neuron, row `DENY_ROW` none."""
    off = np.zeros((2, intermediate), dtype=bool)
    off[DENY_ROW] = True
    return keep_words(off)


def keep_rows(words: torch.Tensor, index: torch.Tensor, intermediate: int, dtype: torch.dtype) -> torch.Tensor:
    """Each token's keep row expanded to `[tokens, intermediate]` 0/1 in `dtype` (the torch path's mask): each byte
    of its words looks up its 8 values in a 256 x 8 table, so the one full-size tensor made is the row itself (with
    shifts there were three, of int32). Pure tensor ops (no data-dependent branching, no sync), so it traces under
    torch.compile and CUDA graphs."""
    byte = torch.arange(256, dtype=torch.int32, device=words.device)
    table = ((byte.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=words.device)) & 1).to(dtype)
    codes = words.index_select(0, index).view(torch.uint8).to(torch.int64)  # little-endian: byte 0 = neurons 0-7
    return F.embedding(codes, table).flatten(1)[:, :intermediate]


def silu_and_mul_masked_torch(x: torch.Tensor, words: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up * keep_bit`, x = `[tokens, 2 * intermediate]` (gate first, as vLLM's SiluAndMul): the
    reference and the CPU path; bit-identical to `F.silu(g) * u * keep_row` with a 0/1 row in x's dtype."""
    d = x.shape[-1] // 2
    return F.silu(x[:, :d]) * x[:, d:] * keep_rows(words, index[: x.shape[0]], d, x.dtype)


def keep_table(dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`[65536, 16]` AND masks for `mask_bits_`: row v holds, for each bit j of the 16-bit value v, all ones (keep)
    or zero (off) as a signed integer as wide as `dtype` (2 MB for bf16/fp16)."""
    lanes = {2: torch.int16, 4: torch.int32}.get(torch.empty((), dtype=dtype).element_size())
    if lanes is None or not dtype.is_floating_point:
        raise ValueError(f"keep_table: masks apply to 16- or 32-bit float activations, not {dtype}")
    value = torch.arange(1 << 16, dtype=torch.int32, device=device)
    return (-((value.unsqueeze(-1) >> torch.arange(16, dtype=torch.int32, device=device)) & 1)).to(lanes)


def _mask_bits(x: torch.Tensor, words: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> None:
    if table.shape != (1 << 16, 16) or table.element_size() != x.element_size():
        raise ValueError(f"mask_bits_: table must be keep_table({x.dtype}), got {table.dtype} {tuple(table.shape)}")
    codes = words.index_select(0, index[: x.shape[0]]).view(torch.uint16).to(torch.int32)  # little-endian halves
    x.view(table.dtype).bitwise_and_(F.embedding(codes, table).flatten(1)[:, : x.shape[1]])


_mask_bits_op = torch.library.custom_op("depn_serve::mask_bits_", _mask_bits, mutates_args=("x",))
_mask_bits_op.register_fake(lambda x, words, index, table: None)


def mask_bits_(x: torch.Tensor, words: torch.Tensor, index: torch.Tensor, table: torch.Tensor) -> None:
    """The torch path: `x[t] &= keep bits of row index[t]`, in place (`x`: `[tokens, width]`, `table` from
    `keep_table(x.dtype)`). A dropped neuron becomes +0.0 (a multiply gives -0.0 for a negative value, and NaN for
    an infinite one); every kept value is untouched. Under torch.compile it is one custom op; in eager mode the
    function itself (the dispatcher would add ~25 us a call on CPU)."""
    (_mask_bits_op if torch.compiler.is_compiling() else _mask_bits)(x, words, index, table)


Backend = Literal["triton", "torch"]


def select_backend(device: torch.device) -> Backend:
    """Triton on CUDA, torch elsewhere. DEPN_MASK_BACKEND=triton|torch overrides it (triton off CUDA runs only in
    Triton's interpreter: how the engine's Triton path is tested on CPU)."""
    default = "triton" if device.type == "cuda" and triton is not None else "torch"
    chosen = os.environ.get("DEPN_MASK_BACKEND") or default
    if chosen not in ("triton", "torch"):
        raise ValueError(f"DEPN_MASK_BACKEND: expected 'triton' or 'torch', got {chosen!r}")
    if chosen == "triton" and triton is None:
        raise RuntimeError("DEPN_MASK_BACKEND=triton: triton is not installed")
    return chosen


if triton is not None:

    @triton.jit
    def _masked_act_kernel(x_ptr, out_ptr, words_ptr, index_ptr, d, x_stride, out_stride, words_stride,
                           BLOCK: tl.constexpr, ACT: tl.constexpr, MASKED: tl.constexpr):
        """One program per (token, BLOCK columns), the block as [BLOCK / 32, 32]: one int32 word per row of the
        tile, its bits across the row. ACT: x is [gate | up] and the output silu(gate) * up (else the output is x);
        MASKED=False compiles the mask out (the unmasked baseline)."""
        token = tl.program_id(0).to(tl.int64)
        word = tl.program_id(1) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        bit = tl.arange(0, 32)
        cols = word[:, None] * 32 + bit[None, :]
        inside = cols < d
        x_row = x_ptr + token * x_stride
        if ACT:
            g = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
            up = tl.load(x_row + d + cols, mask=inside, other=0.0)
            # silu in fp32, rounded to x's dtype before the multiply: vLLM's CUDA kernel and F.silu(g) * u do too
            act = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)
            y = act * up.to(tl.float32)
        else:
            y = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        if MASKED:
            row = tl.load(index_ptr + token).to(tl.int64)
            w = tl.load(words_ptr + row * words_stride + word, mask=word * 32 < d, other=0)
            keep = (w[:, None] >> bit[None, :]) & 1
            y = y * keep.to(tl.float32)  # a multiply, not a select: the same zeros (and NaNs) as the torch path
        tl.store(out_ptr + token * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(x: torch.Tensor, words: torch.Tensor | None, index: torch.Tensor | None,
            out: torch.Tensor | None, act: bool = True) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("masked activation Triton kernel: triton is not installed")
    if x.ndim != 2 or (act and x.shape[-1] % 2) or x.stride(-1) != 1:
        raise ValueError(f"masked activation: x must be [tokens, {'2 * ' if act else ''}intermediate] with "
                         f"contiguous rows, got {tuple(x.shape)} strides {x.stride()}")
    tokens, d = x.shape[0], x.shape[1] // 2 if act else x.shape[1]
    if out is None:
        out = torch.empty((tokens, d), dtype=x.dtype, device=x.device)
    elif out.shape != (tokens, d) or out.stride(-1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"masked activation: out must be {x.dtype} [{tokens}, {d}] with contiguous rows, got "
                         f"{out.dtype} {tuple(out.shape)}")
    if tokens == 0:
        return out
    masked = words is not None
    if masked:
        if words.dtype != torch.int32 or words.ndim != 2 or words.shape[1] < words_per_row(d) or \
                words.stride(-1) != 1:
            raise ValueError(f"masked activation: words must be int32 [rows, >= {words_per_row(d)}], got "
                             f"{words.dtype} {tuple(words.shape)}")
        if index.dtype not in (torch.int32, torch.int64) or index.shape[0] < tokens:
            raise ValueError(f"masked activation: index must be int32/int64 [>= {tokens}], got "
                             f"{index.dtype} {tuple(index.shape)}")
    grid = (tokens, triton.cdiv(d, BLOCK))
    _masked_act_kernel[grid](
        x, out, words if masked else x, index if masked else x, d, x.stride(0), out.stride(0),
        words.stride(0) if masked else 0, BLOCK=BLOCK, ACT=act, MASKED=masked,
    )
    return out


def silu_and_mul_masked_triton(x: torch.Tensor, words: torch.Tensor, index: torch.Tensor,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel: each program reads its token's row index once, the words of its column block, and
    zeroes the dropped neurons while writing silu(gate) * up. Row indices are not bounds-checked (as in a gather
    on the device): callers keep them inside `words`."""
    return _launch(x, words, index, out)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The same kernel with the mask compiled out: the fair unmasked baseline for the benchmark."""
    return _launch(x, None, None, out)


def mask_triton(x: torch.Tensor, words: torch.Tensor, index: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`x * keep_bit` in one pass over x (the same kernel without the activation): the mask on the input of
    `down_proj` where the MLP's activation is not vLLM's SiluAndMul."""
    return _launch(x, words, index, out, act=False)


def triton_available() -> bool:
    return triton is not None

