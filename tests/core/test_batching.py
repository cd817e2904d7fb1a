from types import SimpleNamespace

import torch

from depn_serve.core.batching import pad, pad_id_of


def test_right_padding_puts_tokens_first():
    ids, attention = pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert ids.dtype == attention.dtype == torch.long


def test_left_padding_ends_every_row_in_the_last_column():
    ids, attention = pad([[5, 6, 7], [8], [9, 10]], pad_id=3, side="left")
    assert ids.tolist() == [[5, 6, 7], [3, 3, 8], [3, 9, 10]]
    assert attention.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_empty_sequences():
    ids, attention = pad([[4, 4], []], pad_id=2)
    assert ids.tolist() == [[4, 4], [2, 2]] and attention.tolist() == [[1, 1], [0, 0]]
    ids, attention = pad([[]], pad_id=2, side="left")
    assert ids.shape == attention.shape == (1, 0)
    ids, attention = pad([], pad_id=2)
    assert ids.shape == attention.shape == (0, 0)


def test_device_argument_moves_both():
    ids, attention = pad([[1]], pad_id=0, device="cpu")
    assert ids.device.type == attention.device.type == "cpu"


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_id_of(SimpleNamespace(pad_token_id=7, eos_token_id=1)) == 7
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=1)) == 1
    assert pad_id_of(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_id_of(SimpleNamespace(pad_token_id=0, eos_token_id=1)) == 0  # 0 is a pad id, not a missing one
