"""The cheap on-device digest and the fingerprint cache built on it, against the full
SHA-256 of every weight (the independent reference)."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "edit",
    ["negate all", "negate two rows", "scale by 2", "scale rows by 1/4", "negate one column"],
)
def test_the_quick_digest_sees_edits_that_integer_sums_cancel(dtype, edit):
    """Edits that leave every integer row and column sum of the bits the same modulo 2**32
    (negating a float adds 2**31 to its word, so whole rows of flips cancel; scaling by a
    power of two adds the same step to every exponent) still change the digest, and so
    the full SHA-256 is taken again: a negated model was served stale activations."""
    torch.manual_seed(0)
    model = nn.Linear(1024, 8).to(dtype)
    base = quick_model_digest(model)
    with torch.no_grad():
        w = model.weight
        if edit == "negate all":
            w.neg_()
        elif edit == "negate two rows":
            w[[1, 5]] = -w[[1, 5]]
        elif edit == "scale by 2":
            w.mul_(2)
        elif edit == "scale rows by 1/4":
            w[:4] *= 0.25
        else:
            w[:, 7] = -w[:, 7]
    assert quick_model_digest(model) != base


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


class _Doubling(nn.Linear):
    """A Linear whose forward differs (same weights, same parameter names)."""

    def forward(self, x):
        return 2 * super().forward(x)


def _swaps():
    """Edits that change what a model computes without touching a weight or buffer."""

    def activation(m):
        m[1] = nn.Tanh()

    def subclass(m):
        doubled = _Doubling(5, 8)
        doubled.load_state_dict(m[0].state_dict())
        m[0] = doubled

    def setting(m):
        m[1] = nn.LeakyReLU(0.5)

    return [activation, subclass, setting]


@pytest.mark.parametrize("swap", _swaps(), ids=lambda f: f.__name__)
def test_architecture_changes_without_weight_changes_change_both_digests(swap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LeakyReLU(0.1), nn.Linear(8, 2))
    x = torch.randn(3, 5)
    before_out = model(x)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    cache = ModelFingerprints()
    full, quick, cached = model_fingerprint(model), quick_model_digest(model), cache(model)
    # a copy with the same structure and weights keeps all three
    twin = nn.Sequential(nn.Linear(5, 8), nn.LeakyReLU(0.1), nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    assert (model_fingerprint(twin), quick_model_digest(twin)) == (full, quick)
    swap(model)
    # the reference: same tensors, other outputs
    after = model.state_dict()
    assert after.keys() == tensors.keys()
    assert all(torch.equal(after[k], v) for k, v in tensors.items())
    assert not torch.allclose(model(x), before_out)
    assert model_fingerprint(model) != full
    assert quick_model_digest(model) != quick
    assert cache(model) == model_fingerprint(model) != cached


class _Config:
    """A plain object with the default repr."""

    def __init__(self, scale, inner=None):
        self.scale = scale
        self.inner = inner


class _Slotted:
    __slots__ = ("scale", "__private")

    def __init__(self, scale, private):
        self.scale = scale
        self.__private = private


def _digest(obj):
    digest = hashlib.sha256()
    described = fp.hash_object(obj, digest)
    return digest.hexdigest(), described


def test_hash_object_describes_plain_objects_by_their_attributes():
    same, described = _digest(_Config(1.0, _Config([1, 2])))
    assert described and _digest(_Config(1.0, _Config([1, 2]))) == (same, True)
    assert _digest(_Config(-1.0, _Config([1, 2])))[0] != same
    assert _digest(_Config(1.0, _Config([1, 3])))[0] != same
    assert _digest(_Slotted(1, torch.ones(2))) == _digest(_Slotted(1, torch.ones(2)))
    assert _digest(_Slotted(1, torch.ones(2)))[0] != _digest(_Slotted(1, torch.zeros(2)))[0]
    assert _digest(_Slotted(1, 2))[0] != _digest(_Slotted(3, 2))[0]
    # a cycle is described, not followed forever
    looped = _Config(1.0)
    looped.inner = looped
    assert _digest(looped)[1]
    # a module counts by its weights, not only by its repr
    torch.manual_seed(0)
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert repr(a) == repr(b) and _digest(a)[0] != _digest(b)[0]
    # what is known only by its address is reported as not described
    assert not _digest(lambda x: x)[1]

    def scale(x):
        return 2 * x

    assert not _digest((torch.ones(1), _Config(scale)))[1]
    assert not _digest(object())[1]


def test_tensor_fingerprint_is_kept_until_a_value_changes(monkeypatch):
    """The SHA-256 of a tensor is computed once and served again while its values stay
    (checked by a cheap digest on its device); any change, also one made through NumPy,
    computes it anew, equal to that of a fresh copy."""
    from proponents import fingerprints

    calls = {"n": 0}
    real = fingerprints.content_digest

    def counting(tensor):
        calls["n"] += 1
        return real(tensor)

    monkeypatch.setattr(fingerprints, "content_digest", counting)
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    first = fingerprints.tensor_fingerprint(x)
    assert calls["n"] == 1
    assert fingerprints.tensor_fingerprint(x) == first and calls["n"] == 1
    original = float(x[31, 4])
    x.numpy()[31, 4] += 1.0
    changed = fingerprints.tensor_fingerprint(x)
    assert changed != first and calls["n"] == 2
    assert changed == fingerprints.tensor_fingerprint(x.clone())  # a fresh copy: computed
    x[31, 4] = original  # the same values again: the same fingerprint
    assert fingerprints.tensor_fingerprint(x) == first


def test_content_digest_sees_every_chunk_and_does_not_depend_on_threads(monkeypatch):
    """A tensor of several 16 MiB chunks, hashed in threads: one changed value in the
    first, a middle or the last chunk changes the digest, the same tensor hashed with a
    single thread gives the same digest, and dtype and shape count."""
    from proponents import fingerprints

    x = torch.randn(5 * (4 << 20) + 3, generator=torch.Generator().manual_seed(0))  # 80 MiB
    first = fingerprints.content_digest(x)
    assert fingerprints.content_digest(x.clone()) == first
    for i in (0, x.numel() // 2, x.numel() - 1):
        y = x.clone()
        y[i] = torch.nextafter(y[i], torch.tensor(float("inf")))  # one ulp
        assert fingerprints.content_digest(y) != first
    monkeypatch.setattr(fingerprints.os, "cpu_count", lambda: 1)
    assert fingerprints.content_digest(x) == first
    assert fingerprints.content_digest(x.view(-1, 1)) != first
    assert fingerprints.content_digest(x.view(torch.int32)) != first


def test_probes_of_another_whole_content_scheme_are_compared_by_their_items():
    from proponents.fingerprints import _WHOLE_PROBE_V1, WHOLE_PROBE, probes_differ

    new_a, new_b = f"{WHOLE_PROBE}items:aaa", f"{WHOLE_PROBE}items:bbb"
    assert probes_differ(new_a, new_b)  # the same scheme: the contents differ
    assert not probes_differ(new_a, new_a)
    assert not probes_differ(f"{_WHOLE_PROBE_V1}items:aaa", new_b)  # not comparable
    assert probes_differ(f"{_WHOLE_PROBE_V1}other:aaa", new_b)  # the items still count
    assert not probes_differ("items", new_a)  # a probe of items only


def _shifter(by: float):
    return lambda h: h + by


class _Scaled(nn.Module):
    def __init__(self, scale=2.0, mode="tanh", steps=(1, 2)):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale, self.mode, self.steps = scale, mode, steps
        self.vocabulary = [f"w{i}" for i in range(500)]  # long: counted by a digest
        self.helper = object()  # no stable text: left out
        self.config = {"t": 1.0, "labels": ["a", "b"]}
        self.temperature = np.float32(1.5)
        self.act = functools.partial(torch.clamp, min=0.0)
        self.shift = _shifter(0.5)
        self.classes = {1, 2}

    def forward(self, x):
        h = self.lin(x) * self.scale
        return torch.tanh(h) if self.mode == "tanh" else torch.sigmoid(h)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: setattr(m, "scale", -1.0),
        lambda m: setattr(m, "mode", "sigmoid"),
        lambda m: setattr(m, "steps", (1, 3)),
        lambda m: m.vocabulary.__setitem__(250, "other"),
        lambda m: m.config.__setitem__("t", 2.0),
        lambda m: m.config["labels"].append("c"),
        lambda m: setattr(m, "temperature", np.float32(2.5)),
        lambda m: setattr(m, "act", functools.partial(torch.clamp, min=-1.0)),
        lambda m: setattr(m, "shift", _shifter(0.25)),
        lambda m: m.classes.add(3),
    ],
    ids=[
        "float",
        "string",
        "tuple",
        "long list",
        "dict",
        "list in a dict",
        "numpy scalar",
        "partial argument",
        "closure value",
        "set",
    ],
)
def test_plain_attributes_count_and_bookkeeping_does_not(edit):
    """A forward may read a module's plain attributes as settings: a change to one changes
    both digests. Twins built alike agree although each holds an object of its own (whose
    text names its address), and switching train/eval mode changes neither (gradients and
    activations are taken in eval mode whatever the mode)."""
    torch.manual_seed(0)
    model = _Scaled()
    twin = _Scaled()
    twin.load_state_dict(model.state_dict())
    full, quick = model_fingerprint(model), quick_model_digest(model)
    assert (model_fingerprint(twin), quick_model_digest(twin)) == (full, quick)
    model.eval()
    assert (model_fingerprint(model), quick_model_digest(model)) == (full, quick)
    edit(model)
    assert model_fingerprint(model) != full
    assert quick_model_digest(model) != quick


def test_texts_of_module_level_functions_stay_as_saved_indexes_hold_them():
    """A module-level function counts by its name alone (its defaults are its code's), as
    in indexes saved before closures and partial arguments counted; a function that calls
    itself from its own closure has a finite text."""
    from proponents.module_settings import plain_text

    assert plain_text(torch.nn.functional.relu) == "<torch.nn.functional.relu>"
    assert plain_text((torch.sigmoid, 2)) == "tuple(<torch._VariableFunctionsClass.sigmoid>,2)"

    def countdown(n):
        return n if n <= 0 else countdown(n - 1)

    text = plain_text(countdown)
    assert text is not None and "countdown" in text and len(text) <= 200


def test_legacy_texts_are_those_indexes_were_saved_with():
    """The texts older indexes hold: NumPy scalars that are Python floats or strings
    (np.float64, np.str_) were written and still count; other NumPy scalars, sets and
    dicts were not; a partial counted by its function's name."""
    import functools

    from proponents.module_settings import plain_text

    assert plain_text(np.float64(0.5), legacy=True) == repr(np.float64(0.5))
    assert plain_text((np.str_("a"), 1), legacy=True) == f"tuple({np.str_('a')!r},1)"
    assert plain_text(np.float32(0.5), legacy=True) is None
    assert plain_text({1, 2}, legacy=True) is None and plain_text({"a": 1}, legacy=True) is None
    partial = functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.1)
    assert plain_text(partial, legacy=True) == "<torch.nn.functional.leaky_relu>"
