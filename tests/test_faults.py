"""Interrupted calls, interrupted writes and damaged files.

* KeyboardInterrupt or an exception raised inside the model at any point of a call
  leaves the model exactly as it was (weights, buffers, ``requires_grad``, ``.grad``,
  train/eval mode of every submodule) and the object usable: the next call gives the
  result an uninterrupted object gives.
* A store interrupted while it is written is afterwards either complete or absent,
  never half there: the next reader gets the old entry, or builds a new one.
* A truncated checkpoint or store file is reported by its file name.

Two processes building the same activation store at once are covered by
test_similarity.py::test_two_processes_building_the_same_store.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from conftest import ForwardWatch, assert_unchanged, model_snapshot
from proponents import SimilarityInfluence, TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.errors import (
    CheckpointLoadError,
    IndexMismatchError,
    IndexNotFoundError,
)
from proponents.store import ArrayStore, StoreRebuildWarning

N = 9


class Net(nn.Module):
    """Linear, BatchNorm (buffers), Dropout (mode-dependent) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


@pytest.fixture
def setup(tmp_path):
    """A model in a state the library must not touch, its data and 3 checkpoints."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    paths = []
    for c in range(3):
        other = Net()
        with torch.no_grad():
            other.bn.running_mean.normal_(generator=g)
            other.bn.running_var.uniform_(0.5, 2.0, generator=g)
        paths.append(tmp_path / f"ckpt-{c}.pt")
        torch.save(
            {"model_state_dict": other.state_dict(), "learning_rate": 0.1 * (c + 1)}, paths[-1]
        )
    model = Net()
    model.train()
    model.bn.eval()  # mixed modes must come back mixed
    model.fc1.bias.requires_grad_(False)
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 0.5)
    x = torch.randn(N + 3, 5, generator=g)
    y = torch.randint(0, 3, (N + 3,), generator=g)
    train = TensorDataset(x[:N], y[:N])
    return model, train, (x[N:],), y[N:], paths


def snapshot(model: nn.Module) -> dict:
    snap = model_snapshot(model)
    snap["grads"] = {
        n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
    }
    return snap


def assert_restored(model: nn.Module, snap: dict) -> None:
    assert_unchanged(model, snap)
    for n, p in model.named_parameters():
        want = snap["grads"][n]
        assert (p.grad is None) == (want is None), n
        if want is not None:
            assert torch.equal(p.grad, want), n


class Tripwire(ForwardWatch):
    """Raises ``error`` from the ``at``-th forward call of ``module`` on.

    A KeyboardInterrupt is raised once (a user pressing Ctrl-C); any other error is
    raised on every later call too, like a model that really fails (a single failure
    inside ``vmap`` is retried by the per-example loop, by design).
    """

    def __init__(self, module: nn.Module, error: BaseException, at: int) -> None:
        super().__init__(module)
        self.error, self.at = error, at
        self.once = isinstance(error, KeyboardInterrupt)

    def hit(self) -> None:
        if self.calls == self.at or (not self.once and 0 < self.at < self.calls):
            raise self.error


def count_forwards(module: nn.Module, run: Callable[[], object]) -> int:
    wire = Tripwire(module, RuntimeError("never"), at=-1)
    try:
        run()
    finally:
        wire.remove()
    return wire.calls


# Each operation: (build the object, call it); the call is what gets interrupted.
def _tracincp(model, train, paths):
    return TracInCP(
        model, train, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=4
    )


def _fast(model, train, paths):
    return TracInCPFast(
        model, "fc2", train, paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4
    )


def _randproj(model, train, paths, **kw):
    return TracInCPFastRandProj(
        model,
        "fc2",
        train,
        paths,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=4,
        projection_dim=5,
        seed=3,
        **kw,
    )


OPERATIONS = {
    "TracInCP.influence": (_tracincp, lambda obj, x, y: obj.influence(x, y)),
    "TracInCP.self_influence": (_tracincp, lambda obj, x, y: obj.self_influence()),
    "TracInCPFast.influence": (_fast, lambda obj, x, y: obj.influence(x, y)),
    "TracInCPFast.self_influence": (_fast, lambda obj, x, y: obj.influence()),
    "TracInCPFastRandProj.influence": (_randproj, lambda obj, x, y: obj.influence(x, y, k=None)),
}
ERRORS = {
    "KeyboardInterrupt": lambda: KeyboardInterrupt(),
    "model error": lambda: RuntimeError("the model failed"),
}


# Where the call is interrupted: the first, a middle or the last forward pass of the model.
WHEN = [
    ("first", "model error"),
    ("middle", "KeyboardInterrupt"),
    ("middle", "model error"),
    ("last", "KeyboardInterrupt"),
]
VMAP_RETRY = "ignore:.*vmap could not run this model:RuntimeWarning"


@pytest.mark.filterwarnings(VMAP_RETRY)
@pytest.mark.parametrize(("where", "error"), WHEN)
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_interrupted_call_restores_the_model_and_leaves_the_object_usable(
    setup, operation, where, error
):
    model, train, x, y, paths = setup
    make, call = OPERATIONS[operation]
    clean = call(make(model, train, paths), x, y)
    probe = make(model, train, paths)
    total = count_forwards(model.fc2, lambda: call(probe, x, y))
    at = {"first": 1, "middle": total // 2 + 1, "last": total}[where]
    snap = snapshot(model)
    obj = make(model, train, paths)
    wire = Tripwire(model.fc2, ERRORS[error](), at)
    with pytest.raises(type(ERRORS[error]())):
        call(obj, x, y)
    wire.remove()
    assert wire.calls >= at
    assert_restored(model, snap)
    torch.testing.assert_close(call(obj, x, y), clean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("error", list(ERRORS))
def test_interrupted_randproj_construction_restores_the_model(setup, error):
    model, train, x, y, paths = setup
    total = count_forwards(model.fc2, lambda: _randproj(model, train, paths))
    snap = snapshot(model)
    wire = Tripwire(model.fc2, ERRORS[error](), total // 2 + 1)
    with pytest.raises(type(ERRORS[error]())):
        _randproj(model, train, paths)
    wire.remove()
    assert_restored(model, snap)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_checkpoint_that_fails_to_load_midway_restores_the_model(setup, position):
    model, train, x, y, paths = setup
    good = paths[position].read_bytes()
    paths[position].write_bytes(good[: len(good) // 3])
    snap = snapshot(model)
    for run in (
        lambda: _tracincp(model, train, paths).influence(x, y),
        lambda: _fast(model, train, paths).self_influence(),
        lambda: _randproj(model, train, paths),
    ):
        with pytest.raises(CheckpointLoadError, match=f"ckpt-{position}.pt"):
            run()
        assert_restored(model, snap)


def test_truncated_safetensors_checkpoint_is_named(setup, tmp_path):
    model, train, x, y, paths = setup
    folder = tmp_path / "st"
    folder.mkdir()
    for i, p in enumerate(paths):
        state = torch.load(p, weights_only=True)["model_state_dict"]
        save_file(state, str(folder / f"step-{i}.safetensors"), metadata={"lr": "0.1"})
    cut = folder / "step-1.safetensors"
    cut.write_bytes(cut.read_bytes()[:-17])
    snap = snapshot(model)
    with pytest.raises(CheckpointLoadError, match="step-1.safetensors"):
        _tracincp(model, train, folder).influence(x, y)
    assert_restored(model, snap)


# ------------------------------------------------------------------ the activation store


def _similarity(model, train, root, layers=("fc1", "fc2")):
    return SimilarityInfluence(model, list(layers), train, root, batch_size=2)


def _store_files(root: Path) -> list[str]:
    folder = root / "src"
    return sorted(f for f in os.listdir(folder) if f != ".lock") if folder.exists() else []


def _assert_store_consistent(root: Path) -> None:
    """No temporary files, and every array file belongs to a manifest (and exists)."""
    files = _store_files(root)
    assert not [f for f in files if f.startswith(".tmp")], files
    referenced = set()
    for manifest in (f for f in files if f.endswith(".json")):
        content = json.loads((root / "src" / manifest).read_text())
        referenced |= {a["file"] for a in content["arrays"].values()}
    assert referenced == {f for f in files if f.endswith(".npy")}, files


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for layer in a:
        assert torch.equal(a[layer][0], b[layer][0])
        torch.testing.assert_close(a[layer][1], b[layer][1])


@pytest.mark.parametrize(("where", "error"), WHEN)
def test_interrupted_store_build_leaves_nothing_behind(setup, tmp_path, where, error):
    model, train, x, y, paths = setup
    clean = _similarity(model, train, tmp_path / "clean").influence(x[0], top_k=3)
    root = tmp_path / "acts"
    total = count_forwards(
        model.fc2,
        lambda: _similarity(model, train, root).influence(x[0], top_k=3, load_src_from_disk=False),
    )
    for f in _store_files(root):
        (root / "src" / f).unlink()
    snap = snapshot(model)
    at = {"first": 2, "middle": total // 2 + 1, "last": total}[where]  # call 1: the test batch
    wire = Tripwire(model.fc2, ERRORS[error](), at)
    sim = _similarity(model, train, root)
    with pytest.raises(type(ERRORS[error]())):
        sim.influence(x[0], top_k=3)
    wire.remove()
    assert_restored(model, snap)
    assert _store_files(root) == []  # absent: no manifest, no array, no temporary file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing damaged to warn about: a plain build
        _same(sim.influence(x[0], top_k=3), clean)
    _assert_store_consistent(root)


def test_interrupt_after_the_store_is_written_leaves_it_complete(setup, tmp_path, monkeypatch):
    model, train, x, y, paths = setup
    root = tmp_path / "acts"
    sim = _similarity(model, train, root)

    def interrupted(self, scorer):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(SimilarityInfluence, "_finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sim.influence(x[0], top_k=3)
    _assert_store_consistent(root)
    assert len([f for f in _store_files(root) if f.endswith(".json")]) == 2
    forwards = count_forwards(model, lambda: sim.influence(x[0], top_k=3))
    assert forwards == 1  # the test batch only: the complete store is reused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(
            sim.influence(x[0], top_k=3),
            _similarity(model, train, tmp_path / "clean").influence(x[0], top_k=3),
        )


def _interrupt_manifest_writes(monkeypatch, after: int) -> None:
    """Let ``after`` manifest writes through, then raise KeyboardInterrupt on the next."""
    original = ArrayStore._write_manifest
    seen = {"n": 0}

    def write(self, key, manifest):
        if seen["n"] >= after:
            raise KeyboardInterrupt
        seen["n"] += 1
        original(self, key, manifest)

    monkeypatch.setattr(ArrayStore, "_write_manifest", write)


@pytest.mark.parametrize("after", [0, 1])
def test_interrupted_commit_keeps_each_entry_old_or_new(setup, tmp_path, monkeypatch, after):
    model, train, x, y, paths = setup
    root = tmp_path / "acts"
    sim = _similarity(model, train, root)
    old = sim.influence(x[0], top_k=3)
    before = {f: (root / "src" / f).read_bytes() for f in _store_files(root) if f.endswith("json")}
    with torch.no_grad():
        model.fc1.weight.mul_(-1)  # the stored activations are now stale
    with monkeypatch.context() as patch:
        _interrupt_manifest_writes(patch, after)
        with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreRebuildWarning)
            sim.influence(x[0], top_k=3)
    # fc1 (written first) is new when one manifest got through, fc2 is still the old one
    manifests = {f: (root / "src" / f).read_bytes() for f in before}
    assert (manifests["fc1.json"] == before["fc1.json"]) == (after == 0)
    assert manifests["fc2.json"] == before["fc2.json"]
    for f in before:
        json.loads(manifests[f])  # complete JSON, referring to files that exist:
    entry, why = ArrayStore(root / "src").load("fc2", json.loads(before["fc2.json"])["meta"])
    assert why is None and entry is not None
    entry.close()
    # the next call rebuilds what is stale and cleans up the orphans of the interrupted commit
    with pytest.warns(StoreRebuildWarning, match="model"):
        new = sim.influence(x[0], top_k=3)
    _assert_store_consistent(root)
    _same(new, _similarity(model, train, tmp_path / "clean").influence(x[0], top_k=3))
    assert not torch.equal(new["fc2"][0], old["fc2"][0]) or not torch.equal(
        new["fc2"][1], old["fc2"][1]
    )


def test_truncated_store_file_is_named_in_the_rebuild_warning(setup, tmp_path):
    model, train, x, y, paths = setup
    root = tmp_path / "acts"
    sim = _similarity(model, train, root, layers=("fc1",))
    want = sim.influence(x[0], top_k=3)
    (name,) = [f for f in _store_files(root) if f.endswith("activations.npy")]
    path = root / "src" / name
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.warns(StoreRebuildWarning, match=name.replace(".", r"\.")):
        _same(sim.influence(x[0], top_k=3), want)


# ------------------------------------------------------------ the TracInCPFastRandProj index


def test_interrupted_index_save_keeps_the_old_index_or_none(setup, tmp_path, monkeypatch):
    model, train, x, y, paths = setup
    loss = nn.CrossEntropyLoss(reduction="sum")
    index = tmp_path / "index"
    first = _randproj(model, train, paths)
    with monkeypatch.context() as patch:
        _interrupt_manifest_writes(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            first.save(index)
    with pytest.raises(IndexNotFoundError, match="index"):  # absent
        TracInCPFastRandProj.load(index, model, paths, loss, train_dataset=train)
    first.save(index)
    second = TracInCPFastRandProj(
        model, "fc2", train, paths, loss_fn=loss, batch_size=4, projection_dim=5, seed=4
    )
    with monkeypatch.context() as patch:
        _interrupt_manifest_writes(patch, 0)
        with pytest.raises(KeyboardInterrupt):
            second.save(index)
    loaded = TracInCPFastRandProj.load(index, model, paths, loss, train_dataset=train)
    assert loaded.seed == 3  # the old index, whole
    torch.testing.assert_close(loaded.embeddings, first.embeddings)
    torch.testing.assert_close(loaded.influence(x, y, k=None), first.influence(x, y, k=None))
    second.save(index)  # a later save replaces it and leaves no orphans
    assert TracInCPFastRandProj.load(index, model, paths, loss).seed == 4
    files = [f for f in os.listdir(index) if f.endswith(".npy")]
    assert len(files) == 1 and not [f for f in os.listdir(index) if f.startswith(".tmp")]


@pytest.mark.parametrize("damage", ["array", "manifest"])
def test_truncated_index_file_is_named(setup, tmp_path, damage):
    model, train, x, y, paths = setup
    loss = nn.CrossEntropyLoss(reduction="sum")
    index = tmp_path / "index"
    _randproj(model, train, paths).save(index)
    if damage == "array":
        (name,) = [f for f in os.listdir(index) if f.endswith(".npy")]
    else:
        name = "tracin-index.json"
    path = index / name
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) - 11])
    with pytest.raises(IndexMismatchError, match=name.replace(".", r"\.")):
        TracInCPFastRandProj.load(index, model, paths, loss, train_dataset=train)
