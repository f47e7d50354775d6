"""A saved TracInCPFastRandProj index: concurrent and failing saves, damaged or edited
files, and loads with another model or load function.

Each test builds a small index, does something to it (or to its save), and compares what
``load`` then serves with what the original object (or exact search over the same
embeddings) answers.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import save_checkpoints
from proponents import FaissNearestNeighbors, SimilarityInfluence, TracInCPFastRandProj
from proponents.checkpoints import load_flexible_state_dict
from proponents.errors import CheckpointChangedError, IndexMismatchError, StoreError
from proponents.neighbors import faiss_backend
from proponents.store import StoreRebuildWarning, _checksum

LOSS = nn.CrossEntropyLoss(reduction="sum")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))


def _case(tmp_path, n_train=40):
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(n_train + 6, 6), torch.randint(0, 5, (n_train + 6,))
    paths = save_checkpoints(model, tmp_path, [0.5, 1.5], torch.Generator().manual_seed(1), "c")
    return model, TensorDataset(x[:n_train], y[:n_train]), x[n_train:], y[n_train:], paths


def _index(model, train, paths, seed=0, **kw):
    kw.setdefault("projection_dim", 8)
    return TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=LOSS, batch_size=16, seed=seed, **kw
    )


def _exact_top(index, xt, yt, k=4):
    return index.influence((xt,), yt, k=None).topk(k, dim=1).indices


def _load(path, model, paths, train, **kw):
    return TracInCPFastRandProj.load(path, model, paths, LOSS, train_dataset=train, **kw)


def _resign(path, edit):
    """Edit the index manifest in ``path`` and give it a valid checksum again."""
    manifest = path / "tracin-index.json"
    content = json.loads(manifest.read_text())
    edit(content)
    content["checksum"] = _checksum(content)
    manifest.write_text(json.dumps(content))


def test_concurrent_saves_to_one_path_follow_each_other(tmp_path, monkeypatch):
    """Two threads saving different indexes (Faiss backends) to one path: the second
    save starts writing only once the first has finished, and the path then holds one
    whole index, which loads without a warning and answers as exact search over its
    embeddings (before: one save's search file beside the other's embeddings was served
    silently, and the other save failed with a bare FileNotFoundError)."""
    model, train, xt, yt, paths = _case(tmp_path)
    a = _index(model, train, paths, seed=1, nearest_neighbors=FaissNearestNeighbors())
    b = _index(model, train, paths, seed=2, nearest_neighbors=FaissNearestNeighbors())
    original = faiss_backend.FaissNearestNeighbors._write_index
    inside: list[str] = []
    overlapped = threading.Event()

    def slow_write(self, path):
        inside.append("a" if self is a.nearest_neighbors else "b")
        if len(inside) > 1 and inside[-2] == "open":
            overlapped.set()
        inside.append("open")
        original(self, path)
        threading.Event().wait(0.3)  # long enough for the other save to try to start
        inside.append("closed")

    monkeypatch.setattr(faiss_backend.FaissNearestNeighbors, "_write_index", slow_write)
    errors: list[BaseException] = []

    def save(index):
        try:
            index.save(tmp_path / "index")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(i,)) for i in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not overlapped.is_set(), inside
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = _load(tmp_path / "index", model, paths, train)
    winner = a if loaded.seed == 1 else b
    assert torch.equal(loaded.embeddings, winner.embeddings)
    assert torch.equal(loaded.influence((xt,), yt, k=4).indices, _exact_top(winner, xt, yt))
    leftovers = [f for f in os.listdir(tmp_path / "index" / "neighbors") if "tmp" in f]
    assert leftovers == []


def test_a_save_that_fails_in_the_search_files_leaves_the_old_index(tmp_path, monkeypatch):
    """A disk error while writing the backend's file: a StoreError naming the directory,
    no temporary file left, and the embeddings saved before still there and served
    (before: a bare OSError, raised after the new embeddings had replaced the old)."""
    model, train, xt, yt, paths = _case(tmp_path)
    old = _index(model, train, paths, seed=1, nearest_neighbors=FaissNearestNeighbors())
    old.save(tmp_path / "index")
    new = _index(model, train, paths, seed=2, nearest_neighbors=FaissNearestNeighbors())

    def full_disk(self, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss_backend.FaissNearestNeighbors, "_write_index", full_disk)
    with pytest.raises(StoreError, match="No space left on device"):
        new.save(tmp_path / "index")
    monkeypatch.undo()
    assert [f for f in os.listdir(tmp_path / "index" / "neighbors") if "tmp" in f] == []
    with warnings.catch_warnings(record=True):  # the search structure may be rebuilt
        warnings.simplefilter("always")
        loaded = _load(tmp_path / "index", model, paths, train)
    assert loaded.seed == 1 and torch.equal(loaded.embeddings, old.embeddings)
    assert torch.equal(loaded.influence((xt,), yt, k=4).indices, _exact_top(old, xt, yt))


def test_search_files_that_do_not_fit_the_embeddings_beside_them_are_rebuilt(tmp_path, monkeypatch):
    """The backend's files were written but the embeddings then failed: load sees that
    the search structure describes other data, warns and rebuilds it, and answers as
    exact search over the embeddings it holds."""
    model, train, xt, yt, paths = _case(tmp_path)
    old = _index(model, train, paths, seed=1, nearest_neighbors=FaissNearestNeighbors())
    old.save(tmp_path / "index")
    new = _index(model, train, paths, seed=2, nearest_neighbors=FaissNearestNeighbors())
    from proponents.store import EntryWriter

    def fail(self, name, rows):
        raise StoreError("cannot write: disk full")

    monkeypatch.setattr(EntryWriter, "append", fail)
    with pytest.raises(StoreError):
        new.save(tmp_path / "index")
    monkeypatch.undo()
    with pytest.warns(RuntimeWarning, match="different data"):
        loaded = _load(tmp_path / "index", model, paths, train)
    assert torch.equal(loaded.embeddings, old.embeddings)
    assert torch.equal(loaded.influence((xt,), yt, k=4).indices, _exact_top(old, xt, yt))


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m["meta"].pop("final_fc_layer"), "no field 'final_fc_layer'"),
        (lambda m: m["meta"].update(seed=None), "field 'seed' is None, not an integer"),
        (lambda m: m["meta"].update(dataset_length="40"), "'dataset_length' is '40'"),
        (lambda m: m["meta"].update(projection_dim=-1), "'projection_dim' is -1"),
        (lambda m: m["meta"].update(learning_rates=["x"]), "'learning_rates'"),
        (
            lambda m: m["arrays"].update(other=m["arrays"].pop("embeddings")),
            r"lacks the array\(s\) \['embeddings'\]",
        ),
    ],
)
def test_an_edited_and_re_signed_manifest_is_refused_by_name(tmp_path, edit, words):
    """A manifest whose checksum was recomputed after an edit (anyone can) but whose
    fields are missing or of the wrong kind: IndexMismatchError naming the field
    (before: KeyError, TypeError or ValueError from deep inside load)."""
    model, train, _, _, paths = _case(tmp_path)
    _index(model, train, paths).save(tmp_path / "index")
    _resign(tmp_path / "index", edit)
    with pytest.raises(IndexMismatchError, match=words):
        _load(tmp_path / "index", model, paths, train)


def test_embeddings_whose_bytes_changed_are_refused(tmp_path):
    """Two rows of the saved embeddings swapped in the file (header, shape and size
    unchanged): refused as damaged (before: served, with other proponents)."""
    model, train, _, _, paths = _case(tmp_path)
    _index(model, train, paths).save(tmp_path / "index")
    (name,) = [f for f in os.listdir(tmp_path / "index") if f.endswith("embeddings.npy")]
    array = np.load(tmp_path / "index" / name)
    array[[0, 1]] = array[[1, 0]]
    np.save(tmp_path / "index" / name, array)
    with pytest.raises(IndexMismatchError, match="checksum differs"):
        _load(tmp_path / "index", model, paths, train)


def test_load_refuses_a_model_of_another_architecture(tmp_path):
    """The same weights in a model with Tanh where the index's had ReLU: refused, naming
    the module (before: served, with scores off by up to 3.5). The same architecture
    built again (another object) loads, and so does an index saved before architectures
    were recorded."""
    model, train, xt, yt, paths = _case(tmp_path)
    index = _index(model, train, paths)
    index.save(tmp_path / "index")
    with pytest.raises(IndexMismatchError, match=r"model: .*module 3: '1: Tanh\(\)' now, '1: ReLU"):
        _load(
            tmp_path / "index",
            nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5)),
            paths,
            train,
        )
    again = _load(tmp_path / "index", _model(), paths, train)
    torch.testing.assert_close(
        again.influence((xt,), yt, k=None), index.influence((xt,), yt, k=None)
    )
    _resign(tmp_path / "index", lambda m: m["meta"].pop("architecture"))
    old = _load(tmp_path / "index", _model(), paths, train)
    assert torch.equal(old.embeddings, index.embeddings)


def _lr_times(factor):
    def load(model, checkpoint):
        return factor * load_flexible_state_dict(model, checkpoint)

    return load


def test_queries_refuse_learning_rates_other_than_the_embeddings(tmp_path):
    """A load function that gives other learning rates than the index was embedded with,
    after load or between construction and a query: CheckpointChangedError naming the
    checkpoint (before: the test side was scaled by other rates, scores off by up to
    33×). The same rates answer as the original index."""
    model, train, xt, yt, paths = _case(tmp_path)
    index = _index(model, train, paths, checkpoints_load_func=_lr_times(2.0))
    index.save(tmp_path / "index")
    wrong = _load(tmp_path / "index", model, paths, train)  # the default load function
    with pytest.raises(CheckpointChangedError, match="learning rate 0.5 for checkpoint 1"):
        wrong.influence((xt,), yt, k=3)
    right = _load(tmp_path / "index", model, paths, train, checkpoints_load_func=_lr_times(2.0))
    torch.testing.assert_close(
        right.influence((xt,), yt, k=None), index.influence((xt,), yt, k=None)
    )
    rates = iter([1.0, 1.0, 3.0, 1.0])  # the second checkpoint changes after embedding

    def drifting(model, checkpoint):
        load_flexible_state_dict(model, checkpoint)
        return next(rates)

    drifted = _index(model, train, paths, checkpoints_load_func=drifting)
    with pytest.raises(CheckpointChangedError, match="learning rate 3.0 for checkpoint 1"):
        drifted.influence((xt,), yt, k=3)


def test_a_similarity_entry_without_its_norms_is_rebuilt(tmp_path):
    """A stored source entry whose re-signed manifest lists no norms array: rebuilt with
    a StoreRebuildWarning saying what it lacks, with the results of a fresh build
    (before: KeyError 'norms')."""
    torch.manual_seed(0)
    model = _model()
    source = TensorDataset(torch.randn(30, 6), torch.zeros(30))
    xt = torch.randn(4, 6)
    sim = SimilarityInfluence(model, "0", source, tmp_path / "acts", batch_size=8)
    want = sim.influence(xt, top_k=5)["0"]
    (manifest,) = (tmp_path / "acts").rglob("src/*.json")
    content = json.loads(manifest.read_text())
    content["arrays"].pop("norms")
    content["checksum"] = _checksum(content)
    manifest.write_text(json.dumps(content))
    fresh = SimilarityInfluence(model, "0", source, tmp_path / "acts", batch_size=8)
    with pytest.warns(StoreRebuildWarning, match="lacks the array"):
        got = fresh.influence(xt, top_k=5)["0"]
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_load_refuses_a_model_whose_unprinted_settings_differ(tmp_path):
    """An index built with nn.TransformerEncoderLayer(norm_first=False) loaded into one
    with norm_first=True (same weights, same printed architecture, other gradients):
    refused, naming the setting (before: loaded, scores off by up to 5.8). The same
    settings load, and so does an index saved before settings were recorded."""

    def encoder(norm_first):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=8, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        return nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3))

    model = encoder(False)
    x, y = torch.randn(30, 3, 4), torch.randint(0, 3, (30,))
    train = TensorDataset(x, y)
    paths = save_checkpoints(model, tmp_path, [1.0], torch.Generator().manual_seed(1), "c")
    index = _index(model, train, paths)
    index.save(tmp_path / "index")
    with pytest.raises(IndexMismatchError, match=r"settings differ.*0\.norm_first=True now"):
        _load(tmp_path / "index", encoder(True), paths, train)
    again = _load(tmp_path / "index", encoder(False), paths, train)
    torch.testing.assert_close(
        again.influence((x[:4],), y[:4], k=None), index.influence((x[:4],), y[:4], k=None)
    )
    _resign(tmp_path / "index", lambda m: m["meta"].pop("module_attributes"))
    old = _load(tmp_path / "index", encoder(False), paths, train)
    assert torch.equal(old.embeddings, index.embeddings)


def _leaky(negative_slope):
    return lambda h: nn.functional.leaky_relu(h, negative_slope)


class _WithActivation(nn.Sequential):
    """_model() with an activation kept as a plain attribute (a partial, a factory's
    lambda) applied to its input."""

    def __init__(self, act):
        super().__init__(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))
        self.act = act

    def forward(self, x):
        return super().forward(self.act(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda slope: functools.partial(nn.functional.leaky_relu, negative_slope=slope),
        _leaky,
    ],
    ids=["partial", "factory lambda"],
)
def test_indexes_saved_before_partials_and_closures_counted_still_load(tmp_path, make):
    """An index saved when a functools.partial or a factory-made lambda counted by its
    name alone (no attribute_texts field) loads into the same model (before: refused as
    a changed setting); a new index refuses the model with another argument or closure
    value, naming it."""
    torch.manual_seed(0)
    model = _WithActivation(make(0.1))
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    train = TensorDataset(x, y)
    paths = save_checkpoints(model, tmp_path, [1.0], torch.Generator().manual_seed(1), "c")
    index = _index(model, train, paths)
    index.save(tmp_path / "index")
    with pytest.raises(IndexMismatchError, match=r"settings differ.*\(model\)\.act="):
        _load(tmp_path / "index", _WithActivation(make(0.5)), paths, train)

    def as_before(meta):
        # the function's name alone: "<torch.nn.functional.leaky_relu>(negative_slope=0.1)"
        # was written "<torch.nn.functional.leaky_relu>"
        meta["meta"].pop("attribute_texts", None)
        lines = meta["meta"]["module_attributes"]
        act = [i for i, line in enumerate(lines) if line.startswith("(model).act=")]
        assert len(act) == 1 and lines[act[0]].endswith((")", "]")), lines
        lines[act[0]] = lines[act[0]][: lines[act[0]].rindex(">") + 1]

    _resign(tmp_path / "index", as_before)
    old = _load(tmp_path / "index", _WithActivation(make(0.1)), paths, train)
    assert torch.equal(old.embeddings, index.embeddings)


class _Counting(nn.Module):
    """A forward that updates plain attributes of its own: state, not settings."""

    def __init__(self):
        super().__init__()
        self.net = _model()
        self.calls, self.longest = 0, 0

    def forward(self, x):
        self.calls += 1
        self.longest = max(self.longest, x.shape[0])
        return self.net(x)


def test_state_a_forward_updates_is_put_back_and_not_compared(tmp_path):
    """A call counter and a cached batch length that forward updates are put back after
    every call (the model is left as it was) and are not settings: an index saved after
    calls loads into a fresh model, and answers as the original."""
    torch.manual_seed(0)
    model = _Counting()
    x, y = torch.randn(46, 6), torch.randint(0, 5, (46,))
    train = TensorDataset(x[:40], y[:40])
    paths = save_checkpoints(model, tmp_path, [0.5, 1.5], torch.Generator().manual_seed(1), "c")
    index = TracInCPFastRandProj(model, "net.2", train, paths, loss_fn=LOSS, batch_size=16)
    want = index.influence((x[40:],), y[40:], k=None)
    assert (model.calls, model.longest) == (0, 0)
    index.save(tmp_path / "index")
    fresh = _Counting()
    loaded = TracInCPFastRandProj.load(tmp_path / "index", fresh, paths, LOSS, train_dataset=train)
    torch.testing.assert_close(loaded.influence((x[40:],), y[40:], k=None), want)
    assert (fresh.calls, fresh.longest) == (0, 0)
