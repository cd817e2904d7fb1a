"""Packed keep words and the masked SiluAndMul (no vLLM): the bit format against numpy's, the torch path bit-exact
against the product the server computes today, the Triton kernel under Triton's CPU interpreter, and a smoke run
of the kernel benchmark.

The interpreter (TRITON_INTERPRET=1, read when triton is imported) runs in a subprocess. It handles bf16 loads and
stores, but casts fp32 -> bf16 by truncation, not round-to-nearest-even as the GPU does, so in the interpreter the
bf16 kernel is within 2 bf16 ulps of the reference (rtol 1.6e-2), not bit-identical; float32 and float16 differ
from torch only in the last bits of exp (numpy's vs torch's), hence the tight tolerances. The mask logic itself is
checked exactly in every dtype: masked kernel == unmasked kernel * keep row, dropped neurons exactly 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depn_serve.artifacts.mask import pack_bits
from depn_serve.serving import kernels as k

ROOT = Path(__file__).resolve().parents[2]
WIDTHS = [1, 12, 33, 100, 512, 1030]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _off(rows: int, width: int, seed: int = 0) -> np.ndarray:
    """Random off masks of several densities, plus an all-kept and an all-off row."""
    rng = np.random.default_rng(seed)
    off = rng.random((rows, width)) < rng.random((rows, 1))
    off[0], off[-1] = False, True
    return off


def _decode(words: np.ndarray, width: int) -> np.ndarray:
    """Keep bits back from the words, through numpy's own little-order unpacking."""
    return np.unpackbits(words.astype("<i4").view(np.uint8), axis=1, bitorder="little", count=width).astype(bool)


@pytest.mark.parametrize("width", WIDTHS)
def test_keep_words_match_numpy_bits_and_the_wire_format(width):
    off = _off(9, width)
    words = k.keep_words(off)
    assert words.dtype == np.int32 and words.shape == (9, k.words_per_row(width))
    assert np.array_equal(_decode(words, width), ~off)
    assert np.array_equal(_decode(words, words.shape[1] * 32)[:, width:], np.zeros((9, words.shape[1] * 32 - width)))
    packed = pack_bits(torch.from_numpy(off))
    assert np.array_equal(k.keep_words_from_packed(packed, width), words)


def test_reserved_rows_are_identity_then_deny():
    for width in WIDTHS:
        rows = k.reserved_words(width)
        assert np.array_equal(_decode(rows, width)[k.IDENTITY_ROW], np.ones(width, bool))
        assert np.array_equal(_decode(rows, width)[k.DENY_ROW], np.zeros(width, bool))
        assert np.array_equal(rows, k.keep_words(np.array([[False] * width, [True] * width])))


@pytest.mark.parametrize("shard", [(0, 512), (256, 512), (64, 100), (3, 77), (500, 512), (10, 10)])
def test_a_shard_of_the_wire_format_is_the_shard_of_the_mask(shard):
    off = _off(4, 512, seed=1)
    got = k.keep_words_from_packed(pack_bits(torch.from_numpy(off)), 512, shard)
    assert np.array_equal(got, k.keep_words(off[:, shard[0]: shard[1]]))


def test_a_packed_mask_of_the_wrong_width_or_type_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        k.keep_words_from_packed(np.zeros((2, 4), np.uint8), 33)
    with pytest.raises(ValueError, match="uint8"):
        k.keep_words_from_packed(np.zeros((2, 5), np.int32), 40)
    with pytest.raises(ValueError, match="shard"):
        k.keep_words_from_packed(np.zeros((2, 5), np.uint8), 40, (8, 48))


def _table(width: int, rows: int = 6, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(off of every row, int32 words on torch), rows 0 and 1 the reserved identity and deny rows."""
    off = np.concatenate([[np.zeros(width, bool), np.ones(width, bool)], _off(rows - 2, width, seed)])
    return off, torch.from_numpy(k.keep_words(off))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [12, 33, 100, 1030])
@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
def test_the_torch_path_is_bit_identical_to_the_current_product(dtype, width, tokens):
    off, words = _table(width)
    gen = torch.Generator().manual_seed(width + tokens)
    index = torch.randint(0, len(off), (tokens,), generator=gen, dtype=torch.int32)
    index[:2] = torch.tensor([0, 1])[:tokens]
    x = (torch.randn(tokens, 2 * width, generator=gen) * 4).to(dtype)
    keep_row = torch.from_numpy(~off)[index.long()].to(dtype)
    expected = F.silu(x[:, :width]) * x[:, width:] * keep_row
    got = k.silu_and_mul_masked_torch(x, words, index)
    assert got.dtype == dtype and torch.equal(got, expected)


def test_the_torch_path_reads_only_the_first_tokens_of_a_longer_index_buffer():
    off, words = _table(40)
    x = torch.randn(3, 80)
    index = torch.tensor([2, 1, 0, 5, 5], dtype=torch.int32)  # a padded, persistent buffer
    expected = F.silu(x[:, :40]) * x[:, 40:] * torch.from_numpy(~off)[[2, 1, 0]].float()
    assert torch.equal(k.silu_and_mul_masked_torch(x, words, index), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [1, 16, 70, 1030])
def test_the_in_place_and_is_the_product_with_the_keep_row(dtype, width):
    off, words = _table(width)
    x = (torch.randn(4, width) * 4).to(dtype)
    x[0, 0] = -3.0  # a dropped negative value becomes +0.0, where the product gives -0.0 (equal as numbers)
    index = torch.tensor([1, 0, 2, 5, 9, 9], dtype=torch.int32)  # longer than the batch, like the engine's buffer
    want = x * torch.from_numpy(~off)[[1, 0, 2, 5]].to(dtype)
    k.mask_bits_(x, words, index, k.keep_table(dtype, "cpu"))
    assert torch.equal(x, want) and x[0].eq(0).all()


def test_the_in_place_and_refuses_a_table_for_another_width():
    off, words = _table(40)
    with pytest.raises(ValueError, match="keep_table"):
        k.mask_bits_(torch.randn(2, 40), words, torch.zeros(2, dtype=torch.int32),
                     k.keep_table(torch.bfloat16, "cpu"))
    with pytest.raises(ValueError, match="16- or 32-bit float"):
        k.keep_table(torch.int32, "cpu")


def test_the_in_place_and_is_one_opaque_op_under_torch_compile():
    """Inside vLLM's compiled forward the op stays one custom op (inductor's gather code is slower on CPU) and its
    write to the activation is kept (it mutates its input, declared to the compiler)."""
    off, words = _table(100)
    table = k.keep_table(torch.float32, "cpu")
    weight = torch.randn(8, 100)
    index = torch.tensor([2, 3, 4, 5, 0], dtype=torch.int32)

    def down(x):
        x = x * 2
        k.mask_bits_(x, words, index, table)
        return F.linear(x, weight)

    x = torch.randn(5, 100)
    want = F.linear(x * 2 * torch.from_numpy(~off)[[2, 3, 4, 5, 0]].float(), weight)
    torch.testing.assert_close(torch.compile(down, fullgraph=True, dynamic=True)(x), want)


def test_the_torch_path_traces_as_one_graph():
    """No data-dependent Python (no .item(), no branching on values): dynamo traces it without a graph break."""
    off, words = _table(100)
    x = torch.randn(5, 200)
    index = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)
    compiled = torch.compile(k.silu_and_mul_masked_torch, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, words, index), k.silu_and_mul_masked_torch(x, words, index))


def _interpreter_checks() -> None:
    """Run in a subprocess with TRITON_INTERPRET=1 (see the module docstring); prints a JSON summary."""
    torch.set_num_threads(1)
    kernel = type(k._masked_act_kernel).__name__
    assert kernel == "InterpretedFunction", f"triton is not in interpreter mode: the kernel is a {kernel}"
    tolerance = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}
    cases = 0
    for dtype, (rtol, atol) in tolerance.items():
        for width in [12, 33, 100, 1030, 2100]:  # not multiples of 32, and past one or two 1024-column blocks
            off, words = _table(width, seed=width)
            for tokens in [0, 1, 7]:
                gen = torch.Generator().manual_seed(tokens * width)
                index = torch.randint(0, len(off), (tokens,), generator=gen, dtype=torch.int32)
                index[:2] = torch.tensor([0, 1])[:tokens]
                x = torch.randn(tokens, 2 * width, generator=gen) * 4
                x[:, 0], x[:, 1] = -100.0, 100.0  # exp overflows to inf, and underflows
                x = x.to(dtype)
                out = torch.full((tokens, width), float("nan"), dtype=dtype)
                masked = k.silu_and_mul_masked_triton(x, words, index, out=out)
                plain = k.silu_and_mul_triton(x)
                keep = torch.from_numpy(~off)[index.long()].to(dtype)
                assert masked is out and masked.dtype == dtype and masked.shape == (tokens, width)
                assert torch.equal(masked, plain * keep), (dtype, width, tokens)
                assert masked[keep == 0].eq(0).all(), (dtype, width, tokens)
                reference = F.silu(x[:, :width]) * x[:, width:]
                torch.testing.assert_close(plain, reference, rtol=rtol, atol=atol)
                torch.testing.assert_close(masked, k.silu_and_mul_masked_torch(x, words, index), rtol=rtol, atol=atol)
                # The mask alone (on down_proj's input, as the engine applies it on CUDA): exact, a multiply by 0/1.
                assert torch.equal(k.mask_triton(x[:, :width], words, index), x[:, :width] * keep)
                cases += 1
    print(json.dumps({"kernel": kernel, "cases": cases}))


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k_: v for k_, v in os.environ.items() if k_ != "TRITON_INTERPRET"}
    environ.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=120)


@needs_triton
def test_the_triton_kernel_matches_the_reference_in_the_interpreter():
    done = _run(["-c", "import tests.serving.test_kernels as t; t._interpreter_checks()"], TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"kernel": "InterpretedFunction", "cases": 3 * 5 * 3}


@needs_triton
def test_the_kernel_benchmark_runs_on_cpu_in_the_interpreter(tmp_path):
    """It sets TRITON_INTERPRET itself for --device cpu, and checks the kernel before it times it."""
    out = tmp_path / "kernel.json"
    done = _run(["-m", "depn_serve.bench.kernel", "--tokens", "1,4", "--intermediate", "96", "--masks", "8",
                 "--rounds", "2", "--device", "cpu", "--json", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tokens |" in done.stdout and "packed bits" in done.stdout
    report = json.loads(out.read_text())
    assert [r["tokens"] for r in report["results"]] == [1, 4]
    assert report["memory_bytes"] == {"packed_bits": 8 * 32 * 3 * 4, "bf16_rows": 8 * 32 * 96 * 2}
    for result in report["results"]:
        assert set(result["median_us"]) == {"triton_unmasked", "triton_masked", "triton_mask", "torch_unmasked",
                                            "torch_bits", "torch_rows"}
        assert result["ratio_ci95"][0] <= result["ratio_mean"] <= result["ratio_ci95"][1]


def test_the_kernels_and_the_benchmark_import_without_vllm_pydantic_or_triton():
    """The GPU benchmark machine has neither vLLM nor pydantic, and CPU-only servers may lack triton."""
    code = ("import sys; sys.modules.update({m: None for m in ('vllm', 'pydantic', 'triton')}); "
            "import depn_serve.serving.kernels as k, depn_serve.bench.kernel; assert not k.triton_available()")
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where the device tool lends one)")
def test_the_cuda_mask_kernel_compiles_and_replays_in_a_cuda_graph():
    """The engine's CUDA path for the mask alone as vLLM runs it: `mask_triton` inside a compiled forward
    (inductor), captured in a CUDA graph, with the index buffer updated in place between replays."""
    off, words_np = _table(14336, rows=66)
    words = words_np.cuda()
    index = torch.zeros(64, dtype=torch.int32, device="cuda")
    weight = torch.randn(512, 14336, device="cuda", dtype=torch.bfloat16) / 100
    x = torch.randn(64, 14336, device="cuda", dtype=torch.bfloat16)

    def down(inp):
        return F.linear(k.mask_triton(inp, words, index), weight)

    def reference():
        masked_input = x * k.keep_rows(words, index, 14336, x.dtype)
        return F.linear(masked_input, weight), masked_input

    compiled = torch.compile(down, fullgraph=True)
    for _ in range(3):
        compiled(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x)
    for seed in range(3):
        index.copy_(torch.randint(0, 66, (64,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        want, masked_input = reference()
        assert torch.equal(k.mask_triton(x, words, index), masked_input)
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_the_backend_is_torch_off_cuda_unless_overridden(monkeypatch):
    monkeypatch.delenv("DEPN_MASK_BACKEND", raising=False)
    assert k.select_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("DEPN_MASK_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DEPN_MASK_BACKEND: expected 'triton' or 'torch'"):
        k.select_backend(torch.device("cpu"))
    monkeypatch.setenv("DEPN_MASK_BACKEND", "triton")
    if k.triton_available():
        assert k.select_backend(torch.device("cpu")) == "triton"
    else:
        with pytest.raises(RuntimeError, match="triton is not installed"):
            k.select_backend(torch.device("cpu"))
