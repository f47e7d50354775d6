"""Drop-in compatibility with code written for Captum's influence API.

Four contracts of that API that proponents follows here:

* nearest-neighbour backends take data and queries of shape ``(N, *)`` and flatten them;
* TracInCPFastRandProj accepts any backend with ``setup(data)`` and
  ``get_nearest_neighbors(query, k)`` (e.g. a subclass of Captum's NearestNeighbors);
* ``cosine_similarity(test, train, replace_nan=0)`` and ``euclidean_distance(test, train)``
  take Captum's argument names;
* ``AnnoyNearestNeighbors`` takes the spec text's ``n_trees`` as well as Captum's ``num_trees``.

The references are independent of the code under test: a brute-force top-k over the
flattened data, the full TracIn score matrix sorted by hand, and Captum's own metrics
where Captum's answer is the intended one.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_case
from proponents import (
    AnnoyNearestNeighbors,
    ExactNearestNeighbors,
    FaissNearestNeighbors,
    TracInCPFastRandProj,
    cosine_similarity,
    euclidean_distance,
)
from proponents.errors import ArgumentTypeError, IndexMismatchError, InvalidArgumentError
from proponents.neighbors import annoy_backend

# Captum is in the dev extra (and bench); only an install without it skips this module
_REASON = "the compatibility tests need Captum (pip install -e '.[dev]')"
captum_nn = pytest.importorskip("captum.influence._utils.nearest_neighbors", reason=_REASON)
captum_sim = pytest.importorskip("captum.influence._core.similarity_influence", reason=_REASON)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


BACKENDS = {
    "exact": (None, lambda: ExactNearestNeighbors(block_size=3)),
    # enough trees and a search_k that visits every node: Annoy's candidates are exact
    "annoy": ("annoy", lambda: AnnoyNearestNeighbors(num_trees=20, search_k=100_000)),
    "faiss": ("faiss", lambda: FaissNearestNeighbors("Flat")),
}


def _backend(name):
    extra, make = BACKENDS[name]
    if extra is not None and not _has(extra):
        pytest.skip(f"optional extra [{extra}] not installed")
    return make()


def brute_top_k(data: torch.Tensor, query: torch.Tensor, k: int):
    """Top-k inner products over the flattened rows, float64, ties by smaller index."""
    d = data.reshape(data.shape[0], -1).double()
    q = query.reshape(query.shape[0], -1).double()
    scores = q @ d.T
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order.indices[:, :k], order.values[:, :k]


# -- 1. nearest-neighbour backends take (N, *) data and queries ---------------------------


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("query_shape", [(5, 3, 2), (5, 6), (5, 2, 3), (5, 6, 1)])
def test_backends_flatten_n_dimensional_data_and_queries(name, query_shape):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(40, 3, 2, generator=g)
    query = torch.randn(*query_shape, generator=g)
    nn_ = _backend(name)
    nn_.setup(data)
    indices, scores = nn_.get_nearest_neighbors(query, 4)
    want_idx, want_scores = brute_top_k(data, query, 4)
    assert indices.shape == scores.shape == (5, 4)
    assert torch.equal(indices, want_idx)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-6)
    # search() (what TracInCPFastRandProj calls) takes the same shapes
    assert torch.equal(nn_.search(query, 4, 40)[0], want_idx)


def test_exact_all_scores_and_load_take_n_dimensional_data(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = torch.randn(30, 2, 2, 2, generator=g)
    query = torch.randn(3, 2, 2, 2, generator=g)
    flat_d, flat_q = data.reshape(30, -1), query.reshape(3, -1)
    nn_ = ExactNearestNeighbors()
    assert nn_.load(tmp_path, data) is False  # nothing saved: set up from the data
    torch.testing.assert_close(nn_.all_scores(query), flat_q @ flat_d.T)
    assert nn_.num_items == 30


@pytest.mark.parametrize("name", ["annoy", "faiss"])
def test_saved_index_of_n_dimensional_data_is_reused(tmp_path, name):
    g = torch.Generator().manual_seed(2)
    data = torch.randn(50, 4, 2, generator=g)
    query = torch.randn(3, 8, generator=g)
    first = _backend(name)
    first.setup(data)
    assert first.save(tmp_path) is True
    again = _backend(name)
    assert again.load(tmp_path, data) is True  # the flattened data matches the saved index
    assert torch.equal(again.get_nearest_neighbors(query, 5)[0], brute_top_k(data, query, 5)[0])


@pytest.mark.parametrize("name", list(BACKENDS))
def test_query_with_another_number_of_features_is_refused(name):
    nn_ = _backend(name)
    nn_.setup(torch.randn(20, 3, 2))
    for bad in (torch.randn(2, 7), torch.randn(2, 2, 2), torch.randn(2, 3, 3)):
        with pytest.raises(InvalidArgumentError, match=r"query has \d+ columns.*D=6"):
            nn_.get_nearest_neighbors(bad, 2)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_one_dimensional_inputs_are_still_refused(name):
    nn_ = _backend(name)
    with pytest.raises(InvalidArgumentError, match=r"data must be a 2-D tensor.*\(6,\)"):
        nn_.setup(torch.randn(6))
    nn_.setup(torch.randn(10, 6))
    with pytest.raises(InvalidArgumentError, match=r"query must be a 2-D tensor.*\(6,\)"):
        nn_.get_nearest_neighbors(torch.randn(6), 2)
    with pytest.raises(InvalidArgumentError, match="data must have at least one column"):
        nn_.setup(torch.randn(10, 0, 3))
    with pytest.raises(InvalidArgumentError, match="data must have at least one row"):
        nn_.setup(torch.randn(0, 2, 3))


# -- 2. TracInCPFastRandProj accepts Captum-style backends --------------------------------


class CaptumBruteForce(captum_nn.NearestNeighbors):
    """A backend written against Captum's interface: not a proponents NearestNeighbors."""

    def __init__(self) -> None:
        self.setup_calls = 0
        self.marker = "mine"

    def setup(self, data):
        self.setup_calls += 1
        self.data = data.reshape(len(data), -1)

    def get_nearest_neighbors(self, query, k):
        scores, indices = (query.reshape(len(query), -1) @ self.data.T).topk(k, dim=1)
        return indices, scores


class Sloppy:
    """Duck-typed (no base class): numpy results, ascending order, rounded float64 scores."""

    def setup(self, data):
        self.data = data.detach().double().numpy()

    def get_nearest_neighbors(self, query, k):
        scores = query.detach().double().numpy() @ self.data.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k][:, ::-1]
        approx = np.round(np.take_along_axis(scores, top, axis=1), 1)
        return np.ascontiguousarray(top.astype(np.int32)), np.ascontiguousarray(approx)


def _randproj(case, **kw):
    return TracInCPFastRandProj(
        case.model,
        "fc2",
        TensorDataset(*case.train_inputs, case.train_labels),
        case.checkpoints,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=4,
        **kw,
    )


def _reference(rp, case, k, proponents):
    """Top-k from the full score matrix (no nearest-neighbour search involved)."""
    full = rp.influence(case.test_inputs, case.test_labels, k=None).double()
    order = torch.sort(full, dim=1, descending=proponents, stable=True)
    return order.indices[:, :k], order.values[:, :k]


@pytest.mark.parametrize("backend", [CaptumBruteForce, Sloppy])
def test_randproj_accepts_a_captum_style_backend(tmp_path, backend):
    case = make_case("mlp", tmp_path)
    rp = _randproj(case, nearest_neighbors=backend())
    for proponents in (True, False):
        got = rp.influence(case.test_inputs, case.test_labels, k=4, proponents=proponents)
        want_idx, want_scores = _reference(rp, case, 4, proponents)
        assert torch.equal(got.indices, want_idx)
        # scores are the exact TracIn scores, whatever precision the backend reports
        torch.testing.assert_close(got.influence_scores.double(), want_scores, rtol=1e-5, atol=0)
        assert got.indices.dtype == torch.long
        assert got.influence_scores.dtype == rp.embeddings.dtype


def test_randproj_accepts_captums_own_annoy_backend(tmp_path):
    if not _has("annoy"):
        pytest.skip("annoy not installed")
    case = make_case("mlp", tmp_path)
    rp = _randproj(case, nearest_neighbors=captum_nn.AnnoyNearestNeighbors(num_trees=50))
    got = rp.influence(case.test_inputs, case.test_labels, k=3)
    # Annoy's candidates may be approximate; the scores reported for them are exact
    full = rp.influence(case.test_inputs, case.test_labels, k=None)
    torch.testing.assert_close(got.influence_scores, full.gather(1, got.indices))
    assert (got.influence_scores[:, :-1] >= got.influence_scores[:, 1:]).all()


def test_the_wrapped_backend_stays_reachable(tmp_path):
    case = make_case("mlp", tmp_path)
    mine = CaptumBruteForce()
    rp = _randproj(case, nearest_neighbors=mine)
    assert rp.nearest_neighbors.backend is mine
    assert rp.nearest_neighbors.marker == "mine"  # attributes are looked up on it
    assert mine.setup_calls == 1
    assert mine.data.shape == rp.embeddings.shape
    assert rp.nearest_neighbors.config()["backend"].endswith("CaptumBruteForce")


def test_save_and_load_with_a_captum_style_backend(tmp_path):
    case = make_case("mlp", tmp_path / "case")
    rp = _randproj(case, nearest_neighbors=CaptumBruteForce())
    before = rp.influence(case.test_inputs, case.test_labels, k=4)
    rp.save(tmp_path / "index")
    loss = nn.CrossEntropyLoss(reduction="sum")
    with pytest.raises(InvalidArgumentError, match=r"CaptumBruteForce.*nearest_neighbors="):
        TracInCPFastRandProj.load(tmp_path / "index", case.model, case.checkpoints, loss)
    fresh = CaptumBruteForce()
    back = TracInCPFastRandProj.load(
        tmp_path / "index", case.model, case.checkpoints, loss, nearest_neighbors=fresh
    )
    assert fresh.setup_calls == 1  # rebuilt from the saved embeddings
    after = back.influence(case.test_inputs, case.test_labels, k=4)
    assert torch.equal(after.indices, before.indices)
    torch.testing.assert_close(after.influence_scores, before.influence_scores)


class WrongShape(CaptumBruteForce):
    def get_nearest_neighbors(self, query, k):
        indices, scores = super().get_nearest_neighbors(query, k)
        return indices[:, :-1], scores[:, :-1]


def test_a_broken_captum_style_answer_names_the_backend(tmp_path):
    case = make_case("mlp", tmp_path)
    rp = _randproj(case, nearest_neighbors=WrongShape())
    with pytest.raises(InvalidArgumentError, match=r"WrongShape\.get_nearest_neighbors"):
        rp.influence(case.test_inputs, case.test_labels, k=3)


class OnlySetup:
    def setup(self, data):
        pass


class NotCallable:
    setup = None
    get_nearest_neighbors = None


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("annoy", "str"),
        ({}, "dict"),
        (OnlySetup(), "get_nearest_neighbors"),
        (NotCallable(), "setup"),
        (CaptumBruteForce, r"a class.*CaptumBruteForce\(\)"),
        (ExactNearestNeighbors, r"a class.*ExactNearestNeighbors\(\)"),
    ],
)
def test_objects_that_are_not_backends_are_refused(tmp_path, value, pattern):
    case = make_case("mlp", tmp_path)
    with pytest.raises(ArgumentTypeError, match=pattern):
        _randproj(case, nearest_neighbors=value)


# -- 3. Captum's names for the similarity metrics -----------------------------------------


def _pairs():
    g = torch.Generator().manual_seed(0)
    test = torch.randn(3, 2, 4, generator=g)
    train = torch.randn(5, 2, 4, generator=g)
    test[2] = 0  # zero vectors: cosine undefined
    train[1] = 0
    return test, train


def test_metric_signatures_start_with_captums():
    cos = list(inspect.signature(cosine_similarity).parameters)
    euc = list(inspect.signature(euclidean_distance).parameters)
    assert cos[:3] == list(inspect.signature(captum_sim.cosine_similarity).parameters)
    assert euc[:2] == list(inspect.signature(captum_sim.euclidean_distance).parameters)


def test_cosine_similarity_takes_captums_arguments():
    test, train = _pairs()
    want = captum_sim.cosine_similarity(test, train)  # replace_nan=0: zero pairs score 0
    for got in (
        cosine_similarity(test, train),
        cosine_similarity(test, train=train),
        cosine_similarity(test=test, train=train, replace_nan=0),
        cosine_similarity(test, src=train),  # the earlier keyword still works
        cosine_similarity(test, train, 0),
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("value", [-2.0, 0.5, 7])
def test_replace_nan_is_the_score_of_pairs_with_a_zero_vector(value):
    test, train = _pairs()
    got = cosine_similarity(test, train, replace_nan=value)
    flat_t, flat_s = test.reshape(3, -1).double(), train.reshape(5, -1).double()
    ref = torch.nn.functional.cosine_similarity(flat_t[:, None], flat_s[None], dim=2)
    undefined = torch.zeros(3, 5, dtype=torch.bool)
    undefined[2, :] = True
    undefined[:, 1] = True
    assert (got[undefined] == value).all()
    torch.testing.assert_close(got[~undefined].double(), ref[~undefined])


def test_replace_nan_nan_gives_nan_and_bad_values_are_refused():
    test, train = _pairs()
    got = cosine_similarity(test, train, replace_nan=float("nan"))
    assert torch.isnan(got[2]).all() and torch.isnan(got[:, 1]).all()
    assert int(torch.isnan(got).sum()) == 5 + 3 - 1
    for bad in ("0", None, True, torch.tensor(0.0)):
        with pytest.raises(ArgumentTypeError, match="replace_nan must be a number"):
            cosine_similarity(test, train, replace_nan=bad)


def test_train_and_src_cannot_both_be_given_or_both_be_missing():
    test, train = _pairs()
    with pytest.raises(TypeError, match="train.*src|src.*train"):
        cosine_similarity(test, train, src=train)
    with pytest.raises(TypeError, match="train"):
        cosine_similarity(test)
    with pytest.raises(TypeError, match="train.*src|src.*train"):
        euclidean_distance(test, train=train, src=train)
    with pytest.raises(TypeError, match="train"):
        euclidean_distance(test)


def test_euclidean_distance_takes_captums_arguments():
    test, train = _pairs()
    want = captum_sim.euclidean_distance(test, train)
    for got in (
        euclidean_distance(test, train),
        euclidean_distance(test, train=train),
        euclidean_distance(test=test, train=train),
        euclidean_distance(test, src=train),
    ):
        torch.testing.assert_close(got, want)
    ref = torch.stack([torch.stack([(a - b).norm() for b in train]) for a in test])
    torch.testing.assert_close(euclidean_distance(test, train), ref)
    assert math.isclose(float(euclidean_distance(test, test)[0, 0]), 0.0)


@pytest.mark.parametrize("metric", [cosine_similarity, euclidean_distance])
def test_metrics_take_sides_without_rows(metric):
    """A side of no rows gives an empty score matrix of the right shape (a raw reshape
    RuntimeError before); (n, *features) sides are flattened as the store flattens."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 2, generator=g), torch.randn(4, 6, generator=g)
    assert metric(torch.zeros(0, 6), b).shape == (0, 4)
    assert metric(a, torch.zeros(0, 3, 2)).shape == (2, 0)
    torch.testing.assert_close(metric(a, b), metric(a.reshape(2, 6), b))


# -- 4. the spec's name for Annoy's number of trees ---------------------------------------


def _recording_annoy(built: list[int]):
    """A stand-in for the ``annoy`` module whose index records the trees it is built with,
    so that these checks run without the optional extra."""

    class Index:
        def __init__(self, dim, metric):
            self.metric = metric

        def set_seed(self, seed):
            pass

        def add_item(self, i, row):
            pass

        def build(self, n_trees):
            built.append(n_trees)

    return SimpleNamespace(AnnoyIndex=Index)


def test_annoy_takes_the_n_trees_of_the_spec_text(monkeypatch):
    """The spec's text names the backend ``AnnoyNearestNeighbors(n_trees=10)`` (Captum's
    code: ``num_trees``); both names reach the index, and the default stays 10."""
    built: list[int] = []
    monkeypatch.setattr(annoy_backend, "_annoy", lambda: _recording_annoy(built))
    spec_style = AnnoyNearestNeighbors(n_trees=7)
    spec_style.setup(torch.randn(6, 3))
    code_style = AnnoyNearestNeighbors(num_trees=4)
    code_style.setup(torch.randn(6, 3))
    AnnoyNearestNeighbors().setup(torch.randn(6, 3))
    assert built == [7, 4, 10]
    assert spec_style.num_trees == 7 and spec_style.config()["num_trees"] == 7
    assert inspect.signature(AnnoyNearestNeighbors).parameters["num_trees"].default == 10


@pytest.mark.parametrize("num_trees", [10, 5])
def test_annoy_refuses_num_trees_and_n_trees_together(monkeypatch, num_trees):
    """Both names at once is an error naming both, also when num_trees is its default value."""
    monkeypatch.setattr(annoy_backend, "_annoy", lambda: _recording_annoy([]))
    with pytest.raises(InvalidArgumentError, match=rf"num_trees={num_trees} and n_trees=5"):
        AnnoyNearestNeighbors(num_trees=num_trees, n_trees=5)
    with pytest.raises(InvalidArgumentError, match="n_trees must be >= 1; got 0"):
        AnnoyNearestNeighbors(n_trees=0)
    with pytest.raises(ArgumentTypeError, match="n_trees must be an int"):
        AnnoyNearestNeighbors(n_trees=2.0)


# A script written for the spec's API: only its import line names the library.
_SPEC_SCRIPT = """
from captum.influence import TracInCP, TracInCPFast

tracin = TracInCP(model, train, checkpoints, layers=["fc2"],
                  loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4,
                  sample_wise_grads_per_batch=True)
scores = tracin.influence((x,), y)
top = tracin.influence((x,), y, k=3, proponents=False)
self_scores = tracin.self_influence()
fast = TracInCPFast(model, model.fc2, train, checkpoints,
                    loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4)
fast_top = fast.influence((x,), y, k=3)
"""


def test_a_spec_script_runs_with_captum_replaced_by_proponents(tmp_path):
    case = make_case("mlp", tmp_path, n_train=11, n_test=3, n_ckpt=2)
    (x,), y = case.test_inputs, case.test_labels
    train = TensorDataset(*case.train_inputs, case.train_labels)
    # Captum's default loader reads plain state dicts (learning rate 1.0)
    flat = []
    for i, path in enumerate(case.checkpoints):
        flat.append(str(tmp_path / f"flat-{i}.pt"))
        torch.save(torch.load(path)["model_state_dict"], flat[-1])

    names = {"model": case.model, "train": train, "x": x, "y": y, "nn": nn, "checkpoints": flat}
    exec(_SPEC_SCRIPT.replace("captum", "proponents"), names)  # noqa: S102 - our own script
    assert type(names["tracin"]).__module__.startswith("proponents.")

    # the reference: Captum itself (its current release passes labels inside the inputs)
    from captum.influence import TracInCP as CaptumTracInCP

    captum = CaptumTracInCP(
        case.model,
        train,
        flat,
        layers=["fc2"],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(names["scores"], captum.influence((x, y)), **close)
    torch.testing.assert_close(names["self_scores"], captum.self_influence(), **close)
    want_top = captum.influence((x, y), k=3, proponents=False)
    torch.testing.assert_close(names["top"].influence_scores, want_top[1], **close)
    assert torch.equal(names["top"].indices, want_top[0])
    # TracInCPFast: ours adds the final layer's bias, so it equals TracInCP on fc2
    want = torch.sort(names["scores"], dim=1, descending=True, stable=True)
    assert torch.equal(names["fast_top"].indices, want.indices[:, :3])
    torch.testing.assert_close(names["fast_top"].influence_scores, want.values[:, :3])


def test_the_influence_subpackage_offers_every_public_name():
    import proponents
    import proponents.influence as influence

    assert set(influence.__all__) == set(proponents.__all__)
    for name in influence.__all__:
        assert getattr(influence, name) is getattr(proponents, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        influence.no_such_name  # noqa: B018


def test_a_list_of_examples_is_a_training_set_as_for_captum(tmp_path):
    """Captum wraps any train_dataset in a DataLoader, so a list of ``(x, y)`` examples
    works there; here too, with the scores of the same examples as a TensorDataset and of
    Captum's TracInCP on them, and a RandProj index that loads with the list again."""
    from captum.influence import TracInCP as CaptumTracInCP

    from proponents import SimilarityInfluence, TracInCP, TracInCPFast

    case = make_case("mlp", tmp_path, n_train=11, n_test=3, n_ckpt=2)
    (x,), y = case.test_inputs, case.test_labels
    (train_x,), train_y = case.train_inputs, case.train_labels
    rows = TensorDataset(train_x, train_y)
    examples = [(train_x[i], train_y[i]) for i in range(len(train_y))]
    flat = []
    for i, path in enumerate(case.checkpoints):
        flat.append(str(tmp_path / f"flat-{i}.pt"))
        torch.save(torch.load(path)["model_state_dict"], flat[-1])
    loss = nn.CrossEntropyLoss(reduction="sum")
    common = {"checkpoints": flat, "loss_fn": loss, "batch_size": 4}

    def tracin(data):
        return TracInCP(
            case.model, data, layers=["fc2"], sample_wise_grads_per_batch=True, **common
        )

    captum = CaptumTracInCP(
        case.model, examples, layers=["fc2"], sample_wise_grads_per_batch=True, **common
    )
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(
        tracin(examples).influence((x,), y), captum.influence((x, y)), **close
    )
    torch.testing.assert_close(tracin(examples).self_influence(), tracin(rows).self_influence())
    fast = TracInCPFast(case.model, "fc2", examples, **common)
    reference = TracInCPFast(case.model, "fc2", rows, **common)
    torch.testing.assert_close(fast.influence((x,), y), reference.influence((x,), y))
    torch.testing.assert_close(fast.self_influence(), reference.self_influence())
    # self_influence of a list of examples (Captum 0.9 reads any non-DataLoader as one
    # batch and fails on it); a batch (x, y) of tensors stays a batch
    some, batch = examples[2:9], (train_x[2:9], train_y[2:9])
    torch.testing.assert_close(
        tracin(rows).self_influence(some), tracin(rows).self_influence(batch)
    )
    torch.testing.assert_close(fast.self_influence(some), reference.self_influence(batch))

    index = TracInCPFastRandProj(case.model, "fc2", examples, **common)
    index.save(tmp_path / "index")
    # the index loads with the list or a DataLoader over it (a TensorDataset is probed
    # by all of its values, so it counts as other inputs)
    for data in (examples, DataLoader(examples, batch_size=4)):
        loaded = TracInCPFastRandProj.load(
            tmp_path / "index", case.model, flat, loss_fn=loss, train_dataset=data
        )
        torch.testing.assert_close(loaded.influence((x,), y, k=None), reference.influence((x,), y))
    edited = [examples[0], *examples[1:-1], (train_x[-1] + 1, train_y[-1])]
    with pytest.raises(IndexMismatchError, match="the examples sampled from it"):
        TracInCPFastRandProj.load(
            tmp_path / "index", case.model, flat, loss_fn=loss, train_dataset=edited
        )

    sim = SimilarityInfluence(case.model, "fc1", [(v,) for v in train_x], tmp_path / "a")
    want = SimilarityInfluence(case.model, "fc1", TensorDataset(train_x), tmp_path / "b")
    got, ref = sim.influence(x, top_k=3)["fc1"], want.influence(x, top_k=3)["fc1"]
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_a_tuple_of_tensors_is_not_taken_for_a_list_of_examples():
    from proponents import TracInCP

    model = nn.Linear(3, 2)
    with pytest.raises(ArgumentTypeError, match=r"pass TensorDataset\(\*tensors\)"):
        TracInCP(model, (torch.randn(5, 3), torch.zeros(5, dtype=torch.long)), [])
