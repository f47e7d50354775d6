"""The cheap on-device digest and the fingerprint cache built on it, against the full
SHA-256 of every weight (the independent reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import proponents.fingerprints as fp
from proponents.fingerprints import ModelFingerprints, model_fingerprint, quick_model_digest


class Mixed(nn.Module):
    """Parameters and buffers of every storage width, sizes on and off the 1,024 grid."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(64, 40)  # 2,560 weights: two full rows and a tail
        self.halves = nn.Parameter(torch.randn(7, 3).half())
        self.bf = nn.Parameter(torch.randn(5).bfloat16())
        self.register_buffer("count", torch.arange(6, dtype=torch.int64))
        self.register_buffer("mask", torch.tensor([True, False, True]))  # 3 bytes
        self.register_buffer("codes", torch.arange(5, dtype=torch.uint8))
        self.register_buffer("wide", torch.randn(3, 1024, dtype=torch.float64))
        # a view that starts half-way into a 32-bit word of its storage
        self.register_buffer("offset", torch.randn(11).half()[1:9])
        # large enough to be summed on its own rather than in the group of small tensors
        self.register_buffer("large", torch.randn(300_001))


def _flip_bit(tensor: torch.Tensor, index: int, bit: int) -> None:
    """Flip one stored bit behind autograd's back (no version counter moves)."""
    raw = tensor.data.reshape(-1).view(torch.uint8).numpy()
    raw[index] ^= 1 << bit


@pytest.mark.parametrize(
    "name",
    ["big.weight", "big.bias", "halves", "bf", "count", "mask", "codes", "wide", "offset", "large"],
)
def test_every_single_bit_flip_changes_the_quick_digest(name):
    torch.manual_seed(0)
    model = Mixed()
    tensor = {**dict(model.named_parameters()), **dict(model.named_buffers())}[name]
    before_quick, before_full = quick_model_digest(model), model_fingerprint(model)
    n_bytes = tensor.numel() * tensor.element_size()
    g = torch.Generator().manual_seed(1)
    for index in {0, n_bytes - 1, *torch.randint(0, n_bytes, (6,), generator=g).tolist()}:
        bit = int(torch.randint(0, 8, (1,), generator=g))
        if tensor.dtype == torch.bool and bit:
            continue  # a bool keeps its value in bit 0
        _flip_bit(tensor, index, bit)
        assert model_fingerprint(model) != before_full  # the reference sees the change
        assert quick_model_digest(model) != before_quick, (name, index, bit)
        _flip_bit(tensor, index, bit)
        assert quick_model_digest(model) == before_quick
    assert model_fingerprint(model) == before_full


def test_the_quick_digest_sees_moved_values_and_layout_changes():
    torch.manual_seed(0)
    model = Mixed()
    base = quick_model_digest(model)
    same = Mixed()
    same.load_state_dict(model.state_dict())
    assert quick_model_digest(same) == base
    w = model.big.weight.data
    w[[0, 1]] = w[[1, 0]]  # two rows swapped: same values, other places
    assert quick_model_digest(model) != base
    w[[0, 1]] = w[[1, 0]]
    assert quick_model_digest(model) == base
    flat = w.view(-1)
    flat[[5, 1029]] = flat[[1029, 5]]  # one column apart in the grid
    assert quick_model_digest(model) != base
    flat[[5, 1029]] = flat[[1029, 5]]
    model.register_buffer("extra", torch.zeros(1))
    assert quick_model_digest(model) != base
    del model.extra
    assert quick_model_digest(model) == base
    assert quick_model_digest(model.double()) != base


def test_the_cache_always_answers_the_full_hash_and_hashes_only_after_changes(monkeypatch):
    torch.manual_seed(0)
    model = Mixed()
    calls = {"n": 0}
    full = fp.model_fingerprint

    def counted(m):
        calls["n"] += 1
        return full(m)

    monkeypatch.setattr(fp, "model_fingerprint", counted)
    cache = ModelFingerprints()
    edits = [
        lambda: None,
        lambda: model.big.weight.data.add_(1e-7),  # no version bump
        lambda: None,
        lambda: _flip_bit(model.wide, 17, 3),
        lambda: model.load_state_dict(Mixed().state_dict()),
        lambda: None,
        lambda: setattr(model.big, "bias", nn.Parameter(model.big.bias.detach().clone())),
    ]
    expected_hashes = [1, 2, 2, 3, 4, 4, 4]  # a replaced tensor with equal values: no rehash
    for edit, n in zip(edits, expected_hashes):
        edit()
        assert cache(model) == full(model)
        assert calls["n"] == n


def test_tensors_without_plain_storage_are_always_hashed_in_full(monkeypatch):
    model = nn.Linear(3, 2)
    model.register_buffer("sparse", torch.eye(3).to_sparse())
    assert quick_model_digest(model) is None
    cache = ModelFingerprints()
    first = cache(model)
    model.sparse = (torch.eye(3) * 2).to_sparse()
    assert cache(model) == model_fingerprint(model) != first
