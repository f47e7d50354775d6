"""Tests for finding, loading, labelling and fingerprinting checkpoints."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file, save_model
from torch import nn

from conftest import assert_close, make_case, reference_scores
from proponents import TracInCP
from proponents.checkpoints import (
    CHECKPOINT_EXTENSIONS,
    checkpoint_fingerprint,
    checkpoint_label,
    learning_rate_from_load_func,
    load_flexible_state_dict,
    resolve_checkpoints,
)
from proponents.errors import (
    ArgumentTypeError,
    CheckpointLoadError,
    CheckpointNotFoundError,
    ProponentsError,
)

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    """A tiny model with parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class Tied(nn.Module):
    """A model whose output layer shares its weight with the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


class HasLrParam(nn.Module):
    """A model with a top-level parameter literally named ``lr``."""

    def __init__(self) -> None:
        super().__init__()
        self.lr = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(2, 2)


class Wrapper(nn.Module):
    """A model with a real submodule named ``module`` (a prefix that must not be stripped)."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)


def seeded_net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_()
        net.bn.running_var.uniform_(0.5, 1.5)
        net.bn.num_batches_tracked.fill_(seed + 1)
    return net


def assert_same_state(model: nn.Module, reference: nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key].to(got[key].dtype)), key


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# load_flexible_state_dict: formats and learning rates
# --------------------------------------------------------------------------------------------


def test_plain_state_dict_file_loads_and_defaults_lr_to_one(tmp_path: Path) -> None:
    source, model = seeded_net(1), seeded_net(2)
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    lr = load_flexible_state_dict(model, path)
    assert lr == 1.0 and isinstance(lr, float)
    assert_same_state(model, source)


def test_str_path_is_accepted(tmp_path: Path) -> None:
    source, model = seeded_net(1), seeded_net(2)
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)
    assert load_flexible_state_dict(model, str(path)) == 1.0
    assert_same_state(model, source)


@pytest.mark.parametrize("nest_key", ["model_state_dict", "state_dict", "model"])
@pytest.mark.parametrize(
    ("lr_key", "lr_value", "expected"),
    [
        ("learning_rate", 0.25, 0.25),
        ("lr", 0.5, 0.5),
        ("learning_rate", torch.tensor(0.125), 0.125),
        ("lr", torch.tensor([3.0], dtype=torch.float64), 3.0),
        ("learning_rate", 2, 2.0),
        (None, None, 1.0),
    ],
)
def test_nested_state_dict_with_learning_rate(
    tmp_path: Path, nest_key: str, lr_key: str | None, lr_value: object, expected: float
) -> None:
    source, model = seeded_net(3), seeded_net(4)
    payload: dict[str, object] = {nest_key: source.state_dict(), "epoch": 7}
    if lr_key is not None:
        payload[lr_key] = lr_value
    path = tmp_path / "nested.ckpt"
    torch.save(payload, path)
    lr = load_flexible_state_dict(model, path)
    assert isinstance(lr, float) and lr == expected
    assert_same_state(model, source)


def test_nested_twice_with_optimizer_state_beside_it(tmp_path: Path) -> None:
    source, model = seeded_net(3), seeded_net(4)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    payload = {
        "model": {"state_dict": source.state_dict()},
        "optimizer_state_dict": optimizer.state_dict(),
        "learning_rate": 0.1,
    }
    path = tmp_path / "deep.pt"
    torch.save(payload, path)
    assert load_flexible_state_dict(model, path) == pytest.approx(0.1)
    assert_same_state(model, source)


def test_learning_rate_key_prefers_learning_rate_over_lr(tmp_path: Path) -> None:
    source = seeded_net(1)
    path = tmp_path / "both.pt"
    torch.save({"state_dict": source.state_dict(), "lr": 9.0, "learning_rate": 0.5}, path)
    assert load_flexible_state_dict(seeded_net(2), path) == 0.5


def test_flat_state_dict_with_learning_rate_beside_weights(tmp_path: Path) -> None:
    source, model = seeded_net(5), seeded_net(6)
    flat = dict(source.state_dict())
    flat["learning_rate"] = 0.03
    path = tmp_path / "flat.pt"
    torch.save(flat, path)
    assert load_flexible_state_dict(model, path) == pytest.approx(0.03)
    assert_same_state(model, source)


def test_model_entry_named_lr_is_a_weight_not_a_learning_rate() -> None:
    torch.manual_seed(0)
    source, model = HasLrParam(), HasLrParam()
    with torch.no_grad():
        source.lr.fill_(0.7)
    assert load_flexible_state_dict(model, source.state_dict()) == 1.0
    assert model.lr.item() == pytest.approx(0.7)


@pytest.mark.parametrize("value", [np.float64(0.1), np.float32(0.25), np.int64(2)])
def test_numpy_scalar_learning_rate_loads_without_touching_torch_allowlist(
    tmp_path: Path, value: np.generic
) -> None:
    source, model = seeded_net(1), seeded_net(2)
    path = tmp_path / "np_lr.pt"
    torch.save({"model_state_dict": source.state_dict(), "learning_rate": value}, path)
    # torch keeps its allowlist in a set, so compare contents, not order
    allowlist_before = sorted(map(repr, torch.serialization.get_safe_globals()))
    lr = load_flexible_state_dict(model, path)
    assert isinstance(lr, float) and lr == pytest.approx(float(value))
    assert_same_state(model, source)
    assert sorted(map(repr, torch.serialization.get_safe_globals())) == allowlist_before


def test_numpy_array_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "np_array.pt"
    torch.save({"state_dict": seeded_net(1).state_dict(), "lr": np.array([0.1])}, path)
    with pytest.raises(CheckpointLoadError, match="refuses to unpickle"):
        load_flexible_state_dict(seeded_net(2), path)


@pytest.mark.parametrize("content", [b"This is a README", b"PK junk", b"import torch\n"])
def test_a_text_or_damaged_file_is_called_unreadable_not_unsafe(tmp_path: Path, content) -> None:
    """A file that is not a pickle at all (the unpickler stops at a byte no pickle has
    there) is reported as unreadable or damaged, not as holding code to refuse."""
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointLoadError, match="could not be read") as info:
        load_flexible_state_dict(seeded_net(1), path)
    assert "refuses to unpickle" not in str(info.value)


def test_legacy_serialization_format_loads(tmp_path: Path) -> None:
    source, model = seeded_net(1), seeded_net(2)
    path = tmp_path / "legacy.pt"
    torch.save(
        {"model_state_dict": source.state_dict(), "lr": 0.2},
        path,
        _use_new_zipfile_serialization=False,
    )
    assert load_flexible_state_dict(model, path) == pytest.approx(0.2)
    assert_same_state(model, source)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [(None, 1.0), ({"learning_rate": "0.05"}, 0.05), ({"lr": "2e-3", "epoch": "3"}, 2e-3)],
)
def test_safetensors_file_with_and_without_lr_metadata(
    tmp_path: Path, metadata: dict[str, str] | None, expected: float
) -> None:
    source, model = seeded_net(7), seeded_net(8)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path), metadata=metadata)
    assert load_flexible_state_dict(model, path) == pytest.approx(expected)
    assert_same_state(model, source)


def test_safetensors_with_tied_weights_stored_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source, model = Tied(), Tied()
    path = tmp_path / "tied.safetensors"
    save_model(source, str(path))
    assert load_flexible_state_dict(model, path) == 1.0
    assert torch.equal(model.emb.weight, source.emb.weight)
    assert model.out.weight is model.emb.weight


def test_loaded_mapping_is_accepted_and_left_unchanged() -> None:
    source, model = seeded_net(9), seeded_net(10)
    payload = {"model_state_dict": OrderedDict(source.state_dict()), "learning_rate": 0.4}
    keys_before = list(payload["model_state_dict"])
    assert load_flexible_state_dict(model, payload) == pytest.approx(0.4)
    assert_same_state(model, source)
    assert list(payload) == ["model_state_dict", "learning_rate"]
    assert list(payload["model_state_dict"]) == keys_before


def test_flat_loaded_mapping_keeps_its_learning_rate_entry() -> None:
    flat = dict(seeded_net(1).state_dict())
    flat["lr"] = 0.5
    assert load_flexible_state_dict(seeded_net(2), flat) == 0.5
    assert "lr" in flat


# --------------------------------------------------------------------------------------------
# Prefixes, devices and dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_wrapper_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    source, model = seeded_net(11), seeded_net(12)
    prefixed = OrderedDict((prefix + k, v) for k, v in source.state_dict().items())
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": prefixed, "lr": 0.1}, path)
    assert load_flexible_state_dict(model, path) == pytest.approx(0.1)
    assert_same_state(model, source)


def test_real_dataparallel_and_compile_state_dicts_load() -> None:
    source = seeded_net(13)
    for wrapped in (nn.DataParallel(source), torch.compile(source)):
        model = seeded_net(14)
        state = wrapped.state_dict()
        assert all(k.startswith(("module.", "_orig_mod.")) for k in state)
        load_flexible_state_dict(model, state)
        assert_same_state(model, source)


def test_plain_checkpoint_loads_into_compiled_model() -> None:
    source, target = seeded_net(15), seeded_net(16)
    compiled = torch.compile(target)
    load_flexible_state_dict(compiled, source.state_dict())
    assert_same_state(target, source)


def test_model_with_real_module_submodule_keeps_its_prefix() -> None:
    torch.manual_seed(0)
    source, model = Wrapper(), Wrapper()
    load_flexible_state_dict(model, source.state_dict())
    assert torch.equal(model.module.weight, source.module.weight)
    # The same model saved from inside DataParallel has a doubled prefix.
    model = Wrapper()
    load_flexible_state_dict(model, nn.DataParallel(source).state_dict())
    assert torch.equal(model.module.weight, source.module.weight)


@pytest.mark.parametrize(
    ("saved", "model_dtype"), [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_floating_tensors_are_cast_to_the_model_dtype(
    tmp_path: Path, saved: torch.dtype, model_dtype: torch.dtype
) -> None:
    source = seeded_net(17).to(saved)
    model = seeded_net(18).to(model_dtype)
    path = tmp_path / "dtype.pt"
    torch.save(source.state_dict(), path)
    load_flexible_state_dict(model, path)
    assert model.fc1.weight.dtype == model_dtype
    assert model.bn.num_batches_tracked.dtype == torch.int64
    torch.testing.assert_close(model.fc1.weight, source.fc1.weight.to(model_dtype))


def test_explicit_device_argument_is_used() -> None:
    source, model = seeded_net(1), seeded_net(2)
    assert load_flexible_state_dict(model, source.state_dict(), device="cpu") == 1.0
    assert_same_state(model, source)


def test_a_cuda_device_this_machine_lacks_is_named() -> None:
    """``device="cuda:N"`` beyond the machine's devices (any CUDA device on a CPU-only
    build) is a typed error naming the value; torch's own was an AssertionError."""
    from proponents.errors import InvalidArgumentError

    source, model = seeded_net(1), seeded_net(2)
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(InvalidArgumentError, match=rf"device '{missing}'.*CUDA device"):
        load_flexible_state_dict(model, source.state_dict(), device=missing)
    assert not torch.equal(model.fc1.weight, source.fc1.weight)  # nothing was loaded


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpoint_loads_into_cuda_model(tmp_path: Path) -> None:
    source = seeded_net(1)
    model = seeded_net(2).cuda()
    path = tmp_path / "cpu.pt"
    torch.save({"state_dict": source.state_dict(), "lr": torch.tensor(0.5)}, path)
    assert load_flexible_state_dict(model, path) == 0.5
    assert model.fc1.weight.device.type == "cuda"
    assert_same_state(model.cpu(), source)


def test_model_with_only_buffers_or_nothing() -> None:
    buffers_only = nn.BatchNorm1d(3, affine=False)
    source = nn.BatchNorm1d(3, affine=False)
    with torch.no_grad():
        source.running_mean.fill_(2.0)
    load_flexible_state_dict(buffers_only, source.state_dict())
    assert torch.equal(buffers_only.running_mean, source.running_mean)
    assert load_flexible_state_dict(nn.ReLU(), {"learning_rate": 0.5}) == 0.5


# --------------------------------------------------------------------------------------------
# load_flexible_state_dict: errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_norm_layer_without_its_batch_counter_loads(tmp_path: Path, suffix: str) -> None:
    """Checkpoints without ``num_batches_tracked`` (pre-0.4.1 PyTorch, or filtered out)
    load, as ``load_state_dict`` allows: every other entry as stored, the counter zero,
    and forward passes in both modes equal those of the full checkpoint."""
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 2))

    source = build()
    source.train()
    for _ in range(3):
        source(torch.randn(8, 5))  # running statistics and a counter of 3
    full = tmp_path / f"full{suffix}"
    lean = tmp_path / f"lean{suffix}"
    state = source.state_dict()
    without = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if suffix == ".pt":
        torch.save(state, full)
        torch.save(without, lean)
    else:
        save_file(dict(state), str(full))
        save_file(without, str(lean))
    reference, model = build(), build()
    model[1].num_batches_tracked.fill_(7)  # the model's own count is not kept
    assert load_flexible_state_dict(reference, full) == 1.0
    assert load_flexible_state_dict(model, lean) == 1.0
    assert int(model[1].num_batches_tracked) == 0
    for key, value in without.items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(6, 5)
    for train in (False, True):
        reference.train(train)
        model.train(train)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_mismatch_lists_missing_and_unexpected_keys_and_file(tmp_path: Path) -> None:
    state = OrderedDict(seeded_net(1).state_dict())
    del state["fc2.bias"]
    state["head.weight"] = torch.zeros(2, 2)
    path = tmp_path / "ckpt-mismatch.pt"
    torch.save(state, path)
    model = seeded_net(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointLoadError) as info:
        load_flexible_state_dict(model, path)
    message = str(info.value)
    assert "ckpt-mismatch.pt" in message
    assert "missing" in message and "'fc2.bias'" in message
    assert "unexpected" in message and "'head.weight'" in message
    assert "Net" in message
    # Nothing was copied into the model.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_mismatch_for_loaded_object_says_checkpoint_object() -> None:
    with pytest.raises(CheckpointLoadError, match="checkpoint object") as info:
        load_flexible_state_dict(seeded_net(1), {"other.weight": torch.zeros(1)})
    assert "'other.weight'" in str(info.value) and "'fc1.weight'" in str(info.value)


def test_long_key_lists_are_truncated() -> None:
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(20)])
    with pytest.raises(CheckpointLoadError) as info:
        load_flexible_state_dict(model, {f"x{i}": torch.zeros(1) for i in range(30)})
    message = str(info.value)
    assert "missing keys (40" in message and "and 30 more" in message
    assert "unexpected keys (30" in message and "and 20 more" in message
    assert "'x0'" in message and "'x29'" not in message


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    state = OrderedDict(seeded_net(1).state_dict())
    state["fc1.weight"] = torch.zeros(5, 3)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointLoadError) as info:
        load_flexible_state_dict(seeded_net(2), path)
    message = str(info.value)
    assert "shape.pt" in message and "'fc1.weight'" in message
    assert "(5, 3)" in message and "(4, 3)" in message


def test_extra_prefix_gets_a_hint() -> None:
    state = {f"net.{k}": v for k, v in seeded_net(1).state_dict().items()}
    with pytest.raises(CheckpointLoadError, match="extra 'net.' prefix"):
        load_flexible_state_dict(seeded_net(2), state)


@pytest.mark.parametrize(
    "make",
    [
        lambda good: good[: len(good) // 2],  # truncated zip
        lambda good: b"",  # empty file
        lambda good: b"hello, this is not a checkpoint\n",  # text
        lambda good: bytes(range(7, 200, 3)),  # binary noise
    ],
    ids=["truncated", "empty", "text", "noise"],
)
def test_unreadable_file_is_reported_by_name(tmp_path: Path, make) -> None:  # noqa: ANN001
    good_path = tmp_path / "good.pt"
    torch.save(seeded_net(1).state_dict(), good_path)
    bad = write_bytes(tmp_path / "ckpt-broken.pt", make(good_path.read_bytes()))
    with pytest.raises(CheckpointLoadError, match="ckpt-broken.pt"):
        load_flexible_state_dict(seeded_net(2), bad)


def test_empty_file_says_so(tmp_path: Path) -> None:
    empty = write_bytes(tmp_path / "zero.pt", b"")
    with pytest.raises(CheckpointLoadError, match=r"zero.pt' is empty"):
        load_flexible_state_dict(seeded_net(1), empty)


def test_truncated_safetensors_is_reported_by_name(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file(seeded_net(1).state_dict(), str(good))
    bad = write_bytes(tmp_path / "cut.safetensors", good.read_bytes()[:40])
    with pytest.raises(CheckpointLoadError, match="cut.safetensors"):
        load_flexible_state_dict(seeded_net(2), bad)


def test_missing_file_raises_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        load_flexible_state_dict(seeded_net(1), missing)
    with pytest.raises(FileNotFoundError):
        load_flexible_state_dict(seeded_net(1), str(missing))


def test_directory_path_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointLoadError, match="is a directory"):
        load_flexible_state_dict(seeded_net(1), tmp_path)


class _RunsCode:
    """Pickles to a call of ``os.system`` that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch '{self.marker}'",))


class _OpensFile:
    """Pickles to a call of ``open`` that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


class _PlainObject:
    """An ordinary user class: harmless, but not plain data."""


@pytest.mark.parametrize("payload_kind", ["system", "open"])
def test_pickle_that_would_run_code_is_refused(tmp_path: Path, payload_kind: str) -> None:
    marker = tmp_path / "PWNED"
    evil = _RunsCode(marker) if payload_kind == "system" else _OpensFile(marker)
    state = dict(seeded_net(1).state_dict())
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": state, "learning_rate": 0.1, "payload": evil}, path)
    assert not marker.exists()
    model = seeded_net(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointLoadError) as info:
        load_flexible_state_dict(model, path)
    message = str(info.value)
    assert "evil.pt" in message
    assert "refuses to unpickle arbitrary objects" in message
    assert "state_dict()" in message and "safetensors" in message
    assert not marker.exists()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    # The payload is live: an unrestricted unpickle does run it (inside tmp_path).
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickled_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"state_dict": seeded_net(1).state_dict(), "extra": _PlainObject()}, path)
    with pytest.raises(CheckpointLoadError, match="refuses to unpickle") as info:
        load_flexible_state_dict(seeded_net(2), path)
    assert "_PlainObject" in str(info.value)


def test_whole_pickled_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(seeded_net(1), path)
    with pytest.raises(CheckpointLoadError, match="refuses to unpickle"):
        load_flexible_state_dict(seeded_net(2), path)


@pytest.mark.parametrize(
    "bad_lr",
    [
        float("nan"),
        float("inf"),
        torch.tensor(float("-inf")),
        "0.1",
        [0.1, 0.2],
        True,
        torch.tensor([0.1, 0.2]),
    ],
    ids=["nan", "inf", "tensor-inf", "str", "list", "bool", "two-element"],
)
def test_bad_learning_rate_is_an_error(bad_lr: object) -> None:
    payload = {"state_dict": seeded_net(1).state_dict(), "learning_rate": bad_lr}
    with pytest.raises(CheckpointLoadError, match="learning rate"):
        load_flexible_state_dict(seeded_net(2), payload)


def test_learning_rate_stored_as_none_counts_as_absent() -> None:
    state = seeded_net(1).state_dict()
    assert load_flexible_state_dict(seeded_net(2), {"state_dict": state, "lr": None}) == 1.0
    payload = {"state_dict": state, "learning_rate": None, "lr": 0.3}
    assert load_flexible_state_dict(seeded_net(2), payload) == pytest.approx(0.3)


def test_bad_safetensors_lr_metadata_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(seeded_net(1).state_dict(), str(path), metadata={"learning_rate": "fast"})
    with pytest.raises(CheckpointLoadError, match="not a number"):
        load_flexible_state_dict(seeded_net(2), path)
    save_file(seeded_net(1).state_dict(), str(path), metadata={"lr": "nan"})
    with pytest.raises(CheckpointLoadError, match="not finite"):
        load_flexible_state_dict(seeded_net(2), path)


@pytest.mark.parametrize(
    "returned",
    ["0.1", " 1e-3 ", b"0.1", True, False, np.bool_(True), torch.tensor(True), np.array(False)],
    ids=["str", "padded-str", "bytes", "true", "false", "numpy-bool", "tensor-bool", "array-bool"],
)
def test_load_func_returning_text_or_bool_is_refused_like_a_stored_one(returned: object) -> None:
    """A checkpoints_load_func that returns its learning rate as text or as a boolean gets
    a CheckpointLoadError naming the value, the checkpoint and what to return, as the
    default loader does for the same value stored in a checkpoint (before: "0.1" was
    taken as 0.1 and True as 1.0 without a word)."""
    with pytest.raises(CheckpointLoadError) as info:
        learning_rate_from_load_func(returned, "ckpt-3.pt", "TracInCP")
    message = str(info.value)
    assert message.startswith("TracInCP: checkpoints_load_func returned")
    assert "ckpt-3.pt" in message and "real number" in message and "None" in message
    assert ("text" if isinstance(returned, (str, bytes)) else "boolean") in message
    stored = {"state_dict": seeded_net(1).state_dict(), "learning_rate": returned}
    if not isinstance(returned, (bytes, np.ndarray, np.generic)):  # cannot be stored safely
        with pytest.raises(CheckpointLoadError, match="learning rate"):
            load_flexible_state_dict(seeded_net(2), stored)


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (None, 1.0),
        (0.1, 0.1),
        (3, 3.0),
        (-0.5, -0.5),
        (0.0, 0.0),
        (np.float32(0.25), 0.25),
        (np.int64(2), 2.0),
        (np.array(0.5), 0.5),
        (torch.tensor(0.125), 0.125),
        (torch.tensor([0.5]), 0.5),
        (torch.tensor(2, dtype=torch.int32), 2.0),
    ],
    ids=lambda v: type(v).__name__,
)
def test_load_func_numbers_are_still_accepted(returned: object, expected: float) -> None:
    """Every number a checkpoints_load_func could return before is still read the same:
    Python and NumPy numbers, 0-d arrays, one-element tensors, and None for 1.0."""
    got = learning_rate_from_load_func(returned, "ckpt-0.pt", "TracInCP")
    assert type(got) is float and got == pytest.approx(expected)


@pytest.mark.parametrize(
    "returned",
    [float("nan"), torch.tensor(float("inf")), [0.1], torch.tensor([0.1, 0.2]), 1 + 2j, object()],
    ids=["nan", "tensor-inf", "list", "two-element", "complex", "object"],
)
def test_load_func_non_numbers_and_non_finite_values_are_refused(returned: object) -> None:
    """What was refused before stays refused, with the checkpoint named."""
    with pytest.raises(CheckpointLoadError, match="ckpt-1.pt"):
        learning_rate_from_load_func(returned, "ckpt-1.pt", "TracInCPFast")


def test_tracincp_refuses_a_load_func_that_returns_text(tmp_path: Path) -> None:
    """End to end: TracInCP with a checkpoints_load_func that loads the weights but returns
    the learning rate "0.1" raises CheckpointLoadError naming the returned text (before:
    the scores were computed with a learning rate of 0.1)."""
    case = make_case("mlp", tmp_path / "ck")

    def load(model: nn.Module, ckpt: object) -> str:
        load_flexible_state_dict(model, ckpt)  # type: ignore[arg-type]
        return "0.1"

    tracin = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        checkpoints_load_func=load,
        loss_fn=case.loss_fn("none"),
    )
    with pytest.raises(CheckpointLoadError, match="returned the text '0.1'"):
        tracin.influence(case.test_inputs, case.test_labels)


def test_file_holding_a_non_mapping_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointLoadError, match="holds a list, not a state dict"):
        load_flexible_state_dict(seeded_net(1), path)


def test_wrong_argument_types() -> None:
    with pytest.raises(ArgumentTypeError):
        load_flexible_state_dict(seeded_net(1), 42)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError):
        load_flexible_state_dict("not a model", {})  # type: ignore[arg-type]


def test_all_errors_are_proponents_errors(tmp_path: Path) -> None:
    with pytest.raises(ProponentsError):
        load_flexible_state_dict(seeded_net(1), tmp_path / "missing.pt")
    with pytest.raises(ProponentsError):
        resolve_checkpoints(tmp_path)


# --------------------------------------------------------------------------------------------
# resolve_checkpoints
# --------------------------------------------------------------------------------------------


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_in_natural_order_other_files_ignored(tmp_path: Path) -> None:
    for name in ["ckpt-10.pt", "ckpt-2.pt", "ckpt-1.pt", "notes.txt", "config.json", "ckpt-3.PT"]:
        touch(tmp_path / name)
    touch(tmp_path / "final.safetensors")
    touch(tmp_path / "a.pth")
    touch(tmp_path / "b.ckpt")
    touch(tmp_path / "c.bin")
    (tmp_path / "sub.pt").mkdir()  # a directory, not a file
    touch(tmp_path / "sub.pt" / "inner.pt")
    got = resolve_checkpoints(tmp_path)
    assert all(isinstance(p, str) for p in got)
    assert [Path(p).name for p in got] == [
        "a.pth",
        "b.ckpt",
        "c.bin",
        "ckpt-1.pt",
        "ckpt-2.pt",
        "ckpt-3.PT",
        "ckpt-10.pt",
        "final.safetensors",
    ]
    assert resolve_checkpoints(str(tmp_path)) == got


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=12, unique=True))
def test_natural_order_follows_numbers(steps: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for step in steps:
            touch(Path(folder) / f"epoch{step}_model.pt")
        got = [Path(p).name for p in resolve_checkpoints(folder)]
    assert got == [f"epoch{step}_model.pt" for step in sorted(steps)]


def test_extensions_constant() -> None:
    assert set(CHECKPOINT_EXTENSIONS) == {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}


def test_list_and_tuple_keep_given_order(tmp_path: Path) -> None:
    paths = [touch(tmp_path / name) for name in ["c.pt", "a.pt", "b-10.pt", "b-2.pt"]]
    assert resolve_checkpoints(paths) == paths
    as_text = [str(p) for p in paths]
    assert resolve_checkpoints(tuple(as_text)) == as_text


def test_list_with_missing_path_names_it(tmp_path: Path) -> None:
    real = touch(tmp_path / "a.pt")
    with pytest.raises(CheckpointNotFoundError, match="ghost.pt"):
        resolve_checkpoints([real, tmp_path / "ghost.pt"])


def test_single_file_is_a_one_element_list(tmp_path: Path) -> None:
    path = touch(tmp_path / "only.ckpt")
    assert resolve_checkpoints(path) == [path]
    assert resolve_checkpoints(str(path)) == [str(path)]


def test_iterator_of_loaded_objects_is_materialised_once() -> None:
    states = [seeded_net(i).state_dict() for i in range(3)]
    consumed = []

    def generate():  # noqa: ANN202
        for state in states:
            consumed.append(1)
            yield state

    got = resolve_checkpoints(generate())
    assert got == states and len(consumed) == 3
    assert all(a is b for a, b in zip(got, states, strict=True))
    for state in got:
        model = seeded_net(99)
        load_flexible_state_dict(model, state)


def test_iterator_of_paths(tmp_path: Path) -> None:
    paths = [touch(tmp_path / f"{i}.pt") for i in (3, 1, 2)]
    assert resolve_checkpoints(iter(paths)) == paths
    assert resolve_checkpoints(map(str, paths)) == [str(p) for p in paths]
    with pytest.raises(CheckpointNotFoundError, match="missing.pt"):
        resolve_checkpoints(iter([paths[0], tmp_path / "missing.pt"]))


def test_single_loaded_mapping_is_one_checkpoint() -> None:
    state = seeded_net(0).state_dict()
    assert resolve_checkpoints(state) == [state]


def test_glob_pattern(tmp_path: Path) -> None:
    for name in ["run-10.pt", "run-9.pt", "other-1.pt"]:
        touch(tmp_path / name)
    got = resolve_checkpoints(str(tmp_path / "run-*.pt"))
    assert [Path(p).name for p in got] == ["run-9.pt", "run-10.pt"]
    with pytest.raises(CheckpointNotFoundError, match="pattern"):
        resolve_checkpoints(str(tmp_path / "zzz-*.pt"))


def test_empty_directory_names_it_and_the_extensions(tmp_path: Path) -> None:
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoints(empty)
    message = str(info.value)
    assert "empty_run" in message and "*.pt" in message and "*.safetensors" in message
    touch(empty / "readme.md")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint files"):
        resolve_checkpoints(empty)


def test_files_a_directory_is_not_read_from_that_may_be_checkpoints_are_named(
    tmp_path: Path,
) -> None:
    """Checkpoints saved as e1.pth.tar (PyTorch's ImageNet example) are not taken from a
    directory: the error names them and how to pass them; in a directory of 1.ckpt,
    2.pkl and 3.pt the .pkl is left out with a warning naming it (before: silently,
    summing over fewer checkpoints); a readme or a JSON config beside them is no cause
    for either."""
    tars = tmp_path / "imagenet[1]"  # the pattern suggested escapes the brackets
    tars.mkdir()
    for name in ("e1.pth.tar", "e2.pth.tar", "README", "LICENSE"):
        touch(tars / name)
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoints(tars)
    message = str(info.value)
    assert "e1.pth.tar" in message and "README" not in message and "LICENSE" not in message
    pattern = re.search(r"a pattern such as '([^']*)'", message)
    assert pattern is not None, message
    assert [Path(p).name for p in resolve_checkpoints(pattern.group(1))] == [
        "e1.pth.tar",
        "e2.pth.tar",
    ]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("1.ckpt", "2.pkl", "3.pt", "config.json", "README", "tokenizer.model"):
        touch(mixed / name)
    with pytest.warns(UserWarning, match=r"using 2 checkpoint.*2\.pkl") as record:
        got = resolve_checkpoints(mixed)
    assert [Path(p).name for p in got] == ["1.ckpt", "3.pt"]
    assert not any(n in str(record[0].message) for n in ("config", "README", "tokenizer"))
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("1.pt", "2.pt", "config.json", "README.md"):
        touch(plain / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(resolve_checkpoints(plain)) == 2


@pytest.mark.parametrize("empty", [[], (), iter([])], ids=["list", "tuple", "iterator"])
def test_empty_sequences_are_errors(empty: object) -> None:
    with pytest.raises(CheckpointNotFoundError, match="empty"):
        resolve_checkpoints(empty)


def test_missing_path_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does_not_exist"):
        resolve_checkpoints(str(tmp_path / "does_not_exist"))
    with pytest.raises(FileNotFoundError):
        resolve_checkpoints(tmp_path / "does_not_exist")


@pytest.mark.parametrize(
    "bad", [3, 2.5, None, torch.zeros(3), b"bytes", nn.Linear(1, 1)], ids=lambda v: type(v).__name__
)
def test_wrong_type_is_argument_type_error(bad: object) -> None:
    with pytest.raises(ArgumentTypeError, match="checkpoints must be"):
        resolve_checkpoints(bad)
    with pytest.raises(TypeError):
        resolve_checkpoints(bad)


APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "


def test_directory_ignores_hidden_and_appledouble_files(tmp_path: Path) -> None:
    """Names starting with '.' in a checkpoint directory (a macOS '._1.pt' AppleDouble
    file, a dotfile '.1.pt') are ignored like other non-checkpoint files; a directory
    holding only such names is an error that says they were ignored; a list or a single
    path naming a hidden file is taken as given (before: '._1.pt' became the first
    checkpoint and failed to load as "not a PyTorch checkpoint")."""
    for name in ["1.pt", "2.pt", ".1.pt", ".hidden.safetensors"]:
        torch.save(seeded_net(1).state_dict(), tmp_path / name)
    touch(tmp_path / "._1.pt", APPLEDOUBLE)
    touch(tmp_path / "._2.pt", APPLEDOUBLE)
    got = resolve_checkpoints(tmp_path)
    assert [Path(p).name for p in got] == ["1.pt", "2.pt"]
    for path in got:
        load_flexible_state_dict(seeded_net(2), path)
    explicit = [tmp_path / ".1.pt", tmp_path / "2.pt"]
    assert resolve_checkpoints(explicit) == explicit
    assert resolve_checkpoints(tmp_path / ".1.pt") == [tmp_path / ".1.pt"]

    only_hidden = tmp_path / "only_hidden"
    only_hidden.mkdir()
    touch(only_hidden / "._1.pt", APPLEDOUBLE)
    with pytest.raises(CheckpointNotFoundError, match=r"starting with '\.'.*\._1\.pt"):
        resolve_checkpoints(only_hidden)


def test_glob_ignores_hidden_matches(tmp_path: Path) -> None:
    """A glob pattern that matches names starting with '.' ignores them as a directory
    does, and says so when nothing else matches (before: '.*.pt' or '*' under a hidden
    prefix returned the hidden files as checkpoints)."""
    for name in ["run-1.pt", ".run-2.pt", "._run-1.pt"]:
        touch(tmp_path / name)
    assert [Path(p).name for p in resolve_checkpoints(str(tmp_path / "*.pt"))] == ["run-1.pt"]
    with pytest.raises(CheckpointNotFoundError, match="starting with '.' are ignored"):
        resolve_checkpoints(str(tmp_path / ".*.pt"))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_broken_link_in_directory_or_glob_is_an_error_naming_it(tmp_path: Path) -> None:
    """A checkpoint-named symbolic link whose target is missing (an unmounted volume) or
    that loops is a CheckpointNotFoundError naming the link, its target and the fix, in
    a directory and in a pattern's matches; a working link is used and a hidden broken
    link is ignored (before: the broken '3.pt' was dropped without a word, so the scores
    summed over 2 of 3 checkpoints)."""
    for name in ["1.pt", "2.pt"]:
        touch(tmp_path / name)
    os.symlink(tmp_path / "2.pt", tmp_path / "2b.pt")
    os.symlink(tmp_path / "._gone.pt", tmp_path / "._3.pt")
    assert [Path(p).name for p in resolve_checkpoints(tmp_path)] == ["1.pt", "2.pt", "2b.pt"]

    os.symlink("/mnt/not-mounted/3.pt", tmp_path / "3.pt")
    for source in (tmp_path, str(tmp_path / "*.pt")):
        with pytest.raises(CheckpointNotFoundError) as info:
            resolve_checkpoints(source)
        message = str(info.value)
        assert "'3.pt'" in message and "broken symbolic link" in message
        assert "/mnt/not-mounted/3.pt" in message and "remove the link" in message

    looping = tmp_path / "loop"
    looping.mkdir()
    touch(looping / "1.pt")
    os.symlink(looping / "4.pt", looping / "4.pt")
    with pytest.raises(CheckpointNotFoundError, match="'4.pt'.*broken symbolic link"):
        resolve_checkpoints(looping)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_named_like_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    """A FIFO named '2.pt' in a checkpoint directory is a CheckpointLoadError naming it
    (before: it was dropped without a word)."""
    touch(tmp_path / "1.pt")
    os.mkfifo(tmp_path / "2.pt")
    with pytest.raises(CheckpointLoadError, match="'2.pt'.*not a regular file"):
        resolve_checkpoints(tmp_path)


def test_tracincp_scores_a_directory_with_an_appledouble_file(tmp_path: Path) -> None:
    """End to end: a checkpoint directory with a macOS '._ckpt-0.pt' beside its
    checkpoints gives TracInCP the reference scores of the checkpoints alone (before: a
    CheckpointLoadError for '._ckpt-0.pt')."""
    case = make_case("mlp", tmp_path / "ck")
    touch(tmp_path / "ck" / "._ckpt-0.pt", APPLEDOUBLE)
    tracin = TracInCP(case.model, case.dataset, str(tmp_path / "ck"), loss_fn=case.loss_fn("none"))
    assert_close(tracin.influence(case.test_inputs, case.test_labels), reference_scores(case))


def test_natural_order_compares_runs_as_documented(tmp_path: Path) -> None:
    """The natural order the docs state, pinned: digit runs by value, text runs as whole
    strings ignoring case, a text run before a digit run (so 'last.pt' comes before
    '1.pt' and 'ckpt-10.pt' before 'ckpt-final.pt'), ties by the exact name."""
    names = ["10.pt", "2.pt", "1.pt", "01.pt", "last.pt", "ckpt-final.pt", "ckpt-10.pt"]
    names += ["ckpt-2.pt", "b.pt", "B.pt", "epoch.pt", "epoch10.pt"]
    for name in names:
        touch(tmp_path / name)
    assert [Path(p).name for p in resolve_checkpoints(tmp_path)] == [
        "B.pt",
        "b.pt",
        "ckpt-2.pt",
        "ckpt-10.pt",
        "ckpt-final.pt",
        "epoch10.pt",
        "epoch.pt",
        "last.pt",
        "01.pt",
        "1.pt",
        "2.pt",
        "10.pt",
    ]


# --------------------------------------------------------------------------------------------
# checkpoint_label
# --------------------------------------------------------------------------------------------


def test_labels(tmp_path: Path) -> None:
    assert checkpoint_label(tmp_path / "ckpt-7.pt", 0) == "ckpt-7.pt"
    assert checkpoint_label(str(tmp_path / "x" / "w.safetensors"), 4) == "w.safetensors"
    assert checkpoint_label({"a": torch.zeros(1)}, 3) == "checkpoint object #3"


# --------------------------------------------------------------------------------------------
# checkpoint_fingerprint
# --------------------------------------------------------------------------------------------


def test_file_fingerprint_is_sha256_of_bytes_and_tracks_content(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save(seeded_net(1).state_dict(), path)
    first = checkpoint_fingerprint(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint_fingerprint(str(path)) == first
    assert checkpoint_fingerprint(path) == first
    torch.save(seeded_net(2).state_dict(), path)
    assert checkpoint_fingerprint(path) != first


def test_large_file_fingerprint_is_streamed_correctly(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    path = write_bytes(tmp_path / "big.bin", data)
    assert checkpoint_fingerprint(path) == hashlib.sha256(data).hexdigest()


def test_directory_fingerprint_tracks_contents(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    touch(folder / "config.json", b"{}")
    touch(folder / "weights" / "model.bin", b"abc")
    first = checkpoint_fingerprint(folder)
    assert checkpoint_fingerprint(folder) == first
    touch(folder / "weights" / "model.bin", b"abd")
    assert checkpoint_fingerprint(folder) != first


def test_missing_path_fingerprint_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        checkpoint_fingerprint(tmp_path / "gone.pt")


def test_mapping_fingerprint_is_stable_and_content_sensitive() -> None:
    state = OrderedDict(seeded_net(1).state_dict())
    base = checkpoint_fingerprint(state)
    assert len(base) == 64 and int(base, 16) >= 0
    # Same content, fresh copies and another key order: same digest.
    assert checkpoint_fingerprint(seeded_net(1).state_dict()) == base
    assert checkpoint_fingerprint(OrderedDict(reversed(list(state.items())))) == base
    assert checkpoint_fingerprint({k: v.clone() for k, v in state.items()}) == base

    changed = OrderedDict(state)
    changed["fc1.weight"] = state["fc1.weight"].clone()
    changed["fc1.weight"][0, 0] += 1e-3
    assert checkpoint_fingerprint(changed) != base

    recast = OrderedDict(state)
    recast["fc2.bias"] = state["fc2.bias"].double()
    assert checkpoint_fingerprint(recast) != base

    reshaped = OrderedDict(state)
    reshaped["fc1.weight"] = state["fc1.weight"].reshape(3, 4)
    assert checkpoint_fingerprint(reshaped) != base

    renamed = OrderedDict(state)
    renamed["fc1.weights"] = renamed.pop("fc1.weight")
    assert checkpoint_fingerprint(renamed) != base


def test_nested_mapping_fingerprint_includes_learning_rate() -> None:
    state = seeded_net(1).state_dict()
    a = checkpoint_fingerprint({"model_state_dict": state, "learning_rate": 0.1})
    b = checkpoint_fingerprint({"model_state_dict": state, "learning_rate": 0.2})
    assert a != b
    assert a == checkpoint_fingerprint({"learning_rate": 0.1, "model_state_dict": state})


def test_fingerprint_of_special_tensors() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert checkpoint_fingerprint({"w": base.t()}) == checkpoint_fingerprint(
        {"w": base.t().contiguous()}
    )
    bf16 = checkpoint_fingerprint({"w": base.to(torch.bfloat16)})
    assert bf16 == checkpoint_fingerprint({"w": base.to(torch.bfloat16)})
    assert bf16 != checkpoint_fingerprint({"w": base.to(torch.float16)})
    flags = checkpoint_fingerprint({"m": torch.tensor([True, False])})
    assert flags != checkpoint_fingerprint({"m": torch.tensor([True, True])})
    assert checkpoint_fingerprint({"s": torch.tensor(2.0)}) != checkpoint_fingerprint(
        {"s": torch.tensor([2.0])}
    )
    complex_values = torch.tensor([1 + 2j, 3 - 1j])
    assert checkpoint_fingerprint({"c": complex_values.conj()}) == checkpoint_fingerprint(
        {"c": complex_values.conj().resolve_conj()}
    )
    assert checkpoint_fingerprint({"e": torch.empty(0, 3)}) != checkpoint_fingerprint(
        {"e": torch.empty(3, 0)}
    )


# ------------------------------------------------------------------ memory-mapped reads


def _mapped_files() -> str:
    with open("/proc/self/maps") as handle:
        return handle.read()


def _spy_on_torch_load(monkeypatch) -> list[bool]:
    import proponents.checkpoints as ckpts

    calls: list[bool] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(bool(kwargs.get("mmap")))
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpts.torch, "load", spy)
    return calls


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_zip_checkpoints_are_mapped_and_let_go_legacy_ones_read(tmp_path, monkeypatch):
    """A zip-format file is read through a memory map, gives the values an ordinary
    read gives, and leaves no mapping behind; a legacy-format file is read normally."""
    import gc

    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(30, 20), nn.BatchNorm1d(20), nn.Linear(20, 4))
    source[1].running_mean.normal_()
    for legacy in (False, True):
        path = tmp_path / f"{'legacy' if legacy else 'zip'}.pt"
        optimizer = torch.optim.Adam(source.parameters())
        source(torch.randn(5, 30)).sum().backward()
        optimizer.step()  # optimizer state beside the weights, which the model never uses
        torch.save(
            {"model_state_dict": source.state_dict(), "optimizer": optimizer.state_dict()},
            path,
            _use_new_zipfile_serialization=not legacy,
        )
        calls = _spy_on_torch_load(monkeypatch)
        model = nn.Sequential(nn.Linear(30, 20), nn.BatchNorm1d(20), nn.Linear(20, 4))
        assert load_flexible_state_dict(model, path) == 1.0
        monkeypatch.undo()
        assert calls == ([False] if legacy else [True])
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
        gc.collect()
        assert str(path) not in _mapped_files()


class _RenormingEmbedding(nn.Module):
    """An embedding with ``max_norm``: its forward rescales rows of the weight in place."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6, max_norm=0.5)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(1))


@pytest.mark.skipif(
    not hasattr(torch.serialization, "get_default_mmap_options"),
    reason="this torch has no mmap options",
)
def test_shared_mmap_default_never_lets_a_forward_write_into_the_checkpoint(tmp_path):
    """With ``torch.load``'s mappings set to ``MAP_SHARED`` process-wide, a mapped load
    would hand the model file-backed weights, and an embedding's in-place ``max_norm``
    rescale would be written into the user's checkpoint. Such a file is read the
    ordinary way: its bytes and modification time are unchanged, and the scores equal
    those under the default copy-on-write mapping."""
    import mmap

    from proponents import TracInCPFast

    torch.manual_seed(0)
    source = _RenormingEmbedding()
    with torch.no_grad():
        source.emb.weight.mul_(10)  # every row far above max_norm
    path = tmp_path / "renorm.pt"
    torch.save(source.state_dict(), path)
    before, stat = path.read_bytes(), path.stat()
    data = torch.utils.data.TensorDataset(torch.randint(0, 12, (10, 4)), torch.randint(0, 3, (10,)))

    def self_influence() -> torch.Tensor:
        model = _RenormingEmbedding()
        tracin = TracInCPFast(
            model,
            "fc",
            data,
            [str(path)],
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=4,
        )
        return tracin.self_influence()

    reference = self_influence()
    previous = torch.serialization.get_default_mmap_options()
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        calls = []
        real = torch.load

        def spy(*args, **kwargs):
            calls.append(bool(kwargs.get("mmap")))
            return real(*args, **kwargs)

        torch.load = spy
        try:
            shared = self_influence()
        finally:
            torch.load = real
    finally:
        torch.serialization.set_default_mmap_options(previous)
    assert calls and not any(calls)
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    torch.testing.assert_close(shared, reference, rtol=0, atol=0)


def test_an_archive_whose_record_does_not_fit_its_tensor_is_refused(tmp_path):
    """A mapped ``torch.load`` does not compare a storage's size with its record: a
    checkpoint whose pickle claims twice the bytes its weight's record holds loads
    through a map (reading into the next record) but not through an ordinary read. It
    must be refused, and the model left as it was."""
    import zipfile

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn(2048))
            self.b = nn.Parameter(torch.randn(100_000))

    torch.manual_seed(0)
    model = Two()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):  # the first BININT2 2048 is a's numel
                assert b"M\x00\x08" in data
                data = data.replace(b"M\x00\x08", b"M\x00\x10", 1)
            dst.writestr(info, data)
    mapped = torch.load(bad, weights_only=True, mmap=True)  # what the map alone accepts
    assert mapped["a"].untyped_storage().nbytes() == 2 * 2048 * 4
    del mapped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointLoadError, match="bad.pt"):
        load_flexible_state_dict(model, bad)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert load_flexible_state_dict(Two(), good) == 1.0


def test_a_checkpoint_with_a_sparse_buffer_loads(tmp_path):
    """A sparse tensor has no single storage to check against the archive, so the file is
    read the ordinary way; its buffer (and the dense weights) arrive intact."""
    torch.manual_seed(0)
    source = nn.Linear(3, 2)
    source.register_buffer("adjacency", (torch.eye(3) * 2).to_sparse())
    path = tmp_path / "sparse.pt"
    torch.save(source.state_dict(), path)
    model = nn.Linear(3, 2)
    model.register_buffer("adjacency", torch.zeros(3, 3).to_sparse())
    assert load_flexible_state_dict(model, path) == 1.0
    assert torch.equal(model.adjacency.to_dense(), torch.eye(3) * 2)
    assert torch.equal(model.weight, source.weight) and torch.equal(model.bias, source.bias)
