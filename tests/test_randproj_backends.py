"""TracInCPFastRandProj with backends shared between indexes, backends of the user's own,
and whole-batch (aggregate) queries, against each index's exact score matrix."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from proponents import TracInCPFast, TracInCPFastRandProj
from proponents.neighbors import (
    AnnoyNearestNeighbors,
    ExactNearestNeighbors,
    FaissNearestNeighbors,
    ForeignNearestNeighbors,
    NearestNeighbors,
)

LOSS = nn.CrossEntropyLoss(reduction="sum")


def _problem(tmp_path, n: int = 40):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    paths = []
    for c in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        paths.append(tmp_path / f"{c}.pt")
        torch.save(
            {"model_state_dict": model.state_dict(), "learning_rate": 0.1 * (c + 1)}, paths[-1]
        )
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    xt = torch.randn(3, 5, generator=g)
    yt = torch.randint(0, 3, (3,), generator=g)
    return model, TensorDataset(x, y), paths, xt, yt


class BruteForce:
    """A backend written for Captum: one matrix product, data and query in one dtype."""

    def setup(self, data):
        self.data = data

    def get_nearest_neighbors(self, query, k):
        values, indices = (query @ self.data.T).topk(k, dim=1)
        return indices, values


def _top(scores: torch.Tensor, k: int, proponents: bool = True):
    order = torch.sort(scores, dim=1, descending=proponents, stable=True)
    return order.indices[:, :k], order.values[:, :k]


BACKENDS = {
    "exact": ExactNearestNeighbors,
    "faiss": lambda: (pytest.importorskip("faiss"), FaissNearestNeighbors())[1],
    "captum-style": BruteForce,
}


@pytest.mark.parametrize("make", list(BACKENDS.values()), ids=list(BACKENDS))
def test_one_backend_given_to_two_indexes_answers_each_from_its_own_embeddings(tmp_path, make):
    """Before, the second index's setup replaced what the shared object held, and the first
    index returned the other's rows (with the other's scores) without a word."""
    model, train, paths, xt, yt = _problem(tmp_path)
    backend = make()
    first = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=LOSS, batch_size=8, nearest_neighbors=backend
    )
    smaller = TensorDataset(train.tensors[0][:10] * 3, train.tensors[1][:10])
    second = TracInCPFastRandProj(
        model, "2", smaller, paths, loss_fn=LOSS, batch_size=8, nearest_neighbors=backend
    )
    want_first = _top(first.influence((xt,), yt, k=None), 4)
    want_second = _top(second.influence((xt,), yt, k=None), 4)
    with pytest.warns(UserWarning, match="set up for another index"):
        got = first.influence((xt,), yt, k=4)
    assert torch.equal(got.indices, want_first[0])
    torch.testing.assert_close(got.influence_scores, want_first[1])
    # and the other index, whose structure the first one took back, rebuilds in turn
    with pytest.warns(UserWarning, match="set up for another index"):
        got = second.influence((xt,), yt, k=4)
    assert torch.equal(got.indices, want_second[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an index that holds its backend does not rebuild
        again = second.influence((xt,), yt, k=4, proponents=False)
    assert torch.equal(again.indices, _top(second.influence((xt,), yt, k=None), 4, False)[0])


def test_loading_with_a_live_index_backend_leaves_that_index_right(tmp_path):
    model, train, paths, xt, yt = _problem(tmp_path)
    live = TracInCPFastRandProj(model, "2", train, paths, loss_fn=LOSS, batch_size=8)
    small = TracInCPFastRandProj(
        model, "2", TensorDataset(*(t[:10] for t in train.tensors)), paths, loss_fn=LOSS
    )
    small.save(tmp_path / "small")
    want = _top(live.influence((xt,), yt, k=None), 3)
    loaded = TracInCPFastRandProj.load(
        tmp_path / "small", model, paths, loss_fn=LOSS, nearest_neighbors=live.nearest_neighbors
    )
    assert torch.equal(
        loaded.influence((xt,), yt, k=3).indices, _top(small.influence((xt,), yt, k=None), 3)[0]
    )
    with pytest.warns(UserWarning, match="set up for another index"):
        assert torch.equal(live.influence((xt,), yt, k=3).indices, want[0])


def test_save_after_the_backend_was_taken_over_writes_this_index_structure(tmp_path):
    """The backend's own files saved with an index must describe that index's rows."""
    pytest.importorskip("faiss")
    model, train, paths, xt, yt = _problem(tmp_path)
    backend = FaissNearestNeighbors()
    first = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=LOSS, batch_size=8, nearest_neighbors=backend
    )
    TracInCPFastRandProj(
        model,
        "2",
        TensorDataset(*(t[:10] for t in train.tensors)),
        paths,
        loss_fn=LOSS,
        nearest_neighbors=backend,
    )
    with pytest.warns(UserWarning, match="set up for another index"):
        first.save(tmp_path / "first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the saved structure fits: no rebuild on load
        loaded = TracInCPFastRandProj.load(tmp_path / "first", model, paths, loss_fn=LOSS)
        got = loaded.influence((xt,), yt, k=5)
    assert torch.equal(got.indices, _top(first.influence((xt,), yt, k=None), 5)[0])


class ApproximateScores(NearestNeighbors):
    """A user's backend that picks the right rows but reports made-up scores, in reverse."""

    def setup(self, data):
        self.data = data.double()

    def get_nearest_neighbors(self, query, k):
        indices = (query.double() @ self.data.T).topk(k, dim=1).indices
        return indices.flip(1), torch.zeros(indices.shape).flip(1)


def test_a_user_nearest_neighbors_subclass_gets_exact_scores_back(tmp_path):
    """README: returned scores are always exact inner products. Before, this subclass's
    zeros came back as the influence scores."""
    model, train, paths, xt, yt = _problem(tmp_path)
    index = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=LOSS, nearest_neighbors=ApproximateScores()
    )
    scores = index.influence((xt,), yt, k=None)
    for proponents in (True, False):
        got = index.influence((xt,), yt, k=4, proponents=proponents)
        want = _top(scores, 4, proponents)
        assert torch.equal(got.indices, want[0])
        torch.testing.assert_close(got.influence_scores, want[1])


class SameDtypeOnly(BruteForce):
    """Refuses a query whose dtype differs from the data's, as a plain ``q @ data.T``
    between float32 and float16 tensors does (with torch's RuntimeError)."""

    def get_nearest_neighbors(self, query, k):
        if query.dtype != self.data.dtype:
            raise RuntimeError("expected m1 and m2 to have the same dtype")
        assert torch.isfinite(query).all() and (query.abs().amax(dim=1) > 0).all()
        return super().get_nearest_neighbors(query, k)


class KeepsFloat32(BruteForce):
    """Keeps its own float32 copy of the data, so it takes float32 queries only."""

    def setup(self, data):
        self.data = data.float()

    def get_nearest_neighbors(self, query, k):
        if query.dtype != torch.float32:
            raise RuntimeError("expected m1 and m2 to have the same dtype")
        return super().get_nearest_neighbors(query, k)


@pytest.mark.parametrize("backend", [SameDtypeOnly, KeepsFloat32])
def test_a_float16_index_serves_duck_backends_of_either_query_dtype(tmp_path, backend):
    """Before, index_dtype=torch.float16 with a backend multiplying the data it was given by
    the query failed inside it ("expected m1 and m2 to have the same dtype"); a backend
    that keeps a float32 copy takes the query as given."""
    model, train, paths, xt, yt = _problem(tmp_path)
    index = TracInCPFastRandProj(
        model,
        "2",
        train,
        paths,
        loss_fn=LOSS,
        nearest_neighbors=backend(),
        index_dtype=torch.float16,
    )
    assert index.embeddings.dtype == torch.float16
    got = index.influence((xt,), yt, k=3)
    want = _top(index.influence((xt,), yt, k=None), 3)
    assert torch.equal(got.indices, want[0])
    torch.testing.assert_close(got.influence_scores, want[1])


def test_a_query_beyond_float16_range_is_scaled_for_a_float16_backend():
    """A query row past float16's range would reach the backend as inf, and a tiny one as
    zeros; scaled by a power of two first, its ranking (all the backend's answer is used
    for) is kept."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(30, 6, generator=g).half()
    query = torch.randn(4, 6, generator=g)
    query[1] *= 1e9
    query[2] *= 1e-9
    wrapped = ForeignNearestNeighbors(SameDtypeOnly())
    wrapped.setup(data)
    indices, scores = wrapped.get_nearest_neighbors(query, 5)
    exact = query.double() @ data.double().T
    want = _top(exact, 5)
    assert torch.equal(indices, want[0])
    torch.testing.assert_close(scores.double(), want[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("projection_dim", [None, 6])
def test_aggregate_scores_the_batch_as_a_whole(tmp_path, projection_dim):
    """The README lists aggregate=True as an extra of every TracIn class; before, this one
    raised a TypeError. Its scores are the sum of the per-example rows, and unprojected
    they are TracInCPFast's."""
    model, train, paths, xt, yt = _problem(tmp_path)
    index = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=LOSS, batch_size=8, projection_dim=projection_dim
    )
    rows = index.influence((xt,), yt, k=None)
    summed = index.influence((xt,), yt, k=None, aggregate=True)
    assert summed.shape == (1, len(train))
    torch.testing.assert_close(summed, rows.sum(dim=0, keepdim=True), rtol=1e-5, atol=1e-6)
    if projection_dim is None:
        fast = TracInCPFast(model, "2", train, paths, loss_fn=LOSS, batch_size=8)
        torch.testing.assert_close(
            summed, fast.influence((xt,), yt, aggregate=True), rtol=1e-5, atol=1e-6
        )
    for proponents in (True, False):
        got = index.influence((xt,), yt, k=5, proponents=proponents, aggregate=True)
        want = _top(summed, 5, proponents)
        assert torch.equal(got.indices, want[0])
        torch.testing.assert_close(got.influence_scores, want[1])
    empty = index.influence((xt[:0],), yt[:0], k=None, aggregate=True)
    assert torch.equal(empty, torch.zeros(1, len(train)))
    with pytest.raises(TypeError, match="aggregate"):
        index.influence((xt,), yt, aggregate="yes")


@dataclasses.dataclass
class ValueBackend(BruteForce):
    """A backend that compares by value (a @dataclass): unhashable, and two of them are
    equal. Sharing must still be told by identity."""

    name: str = "mine"


def test_sharing_is_told_by_identity_for_a_dataclass_backend(tmp_path):
    """Before, the claims were looked up by hash and ==: a @dataclass backend (unhashable)
    was not tracked at all, and two equal ones were taken for one."""
    model, train, paths, xt, yt = _problem(tmp_path)
    small = TensorDataset(*(t[:10] for t in train.tensors))
    shared = ValueBackend()
    first = TracInCPFastRandProj(model, "2", train, paths, loss_fn=LOSS, nearest_neighbors=shared)
    TracInCPFastRandProj(model, "2", small, paths, loss_fn=LOSS, nearest_neighbors=shared)
    with pytest.warns(UserWarning, match="set up for another index"):
        got = first.influence((xt,), yt, k=3)
    assert torch.equal(got.indices, _top(first.influence((xt,), yt, k=None), 3)[0])
    one, other = ValueBackend(), ValueBackend()
    assert one == other
    a = TracInCPFastRandProj(model, "2", train, paths, loss_fn=LOSS, nearest_neighbors=one)
    b = TracInCPFastRandProj(model, "2", small, paths, loss_fn=LOSS, nearest_neighbors=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal but distinct: no rebuild
        assert torch.equal(
            a.influence((xt,), yt, k=3).indices, _top(a.influence((xt,), yt, k=None), 3)[0]
        )
        assert torch.equal(
            b.influence((xt,), yt, k=3).indices, _top(b.influence((xt,), yt, k=None), 3)[0]
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda: (pytest.importorskip("annoy"), AnnoyNearestNeighbors(num_trees=3))[1],
        ExactNearestNeighbors,
        BruteForce,
    ],
    ids=["annoy", "exact", "captum-style"],
)
def test_building_the_search_structure_has_its_own_progress_bar(tmp_path, capsys, make):
    """Before, the bar stopped when the embedding did, and building the backend's index
    (an Annoy add loop over every row, then its trees) ran without one."""
    model, train, paths, xt, yt = _problem(tmp_path, n=9000)
    backend = make()
    TracInCPFastRandProj(
        model,
        "2",
        train,
        paths,
        loss_fn=LOSS,
        batch_size=1000,
        nearest_neighbors=backend,
        show_progress=True,
    )
    err = capsys.readouterr().err.replace("\r", "\n")
    lines = [line for line in err.split("\n") if "indexing the embeddings" in line]
    name = type(getattr(backend, "backend", backend)).__name__
    assert lines and all(name in line for line in lines), err[-500:]
    assert "9000/9000" in lines[-1]
    if name == "AnnoyNearestNeighbors":  # reported as the rows go in, not only at the end
        steps: list[int] = []
        with backend.reporting(steps.append):
            backend.setup(torch.randn(9000, 4))
        assert steps == [4096, 4096, 808]
    TracInCPFastRandProj(model, "2", train, paths, loss_fn=LOSS, batch_size=1000,
                         nearest_neighbors=make())  # fmt: skip
    assert "indexing" not in capsys.readouterr().err


class CastsItself(BruteForce):
    """Casts the query to its data's dtype itself, as `q.to(data.dtype) @ data.T` would."""

    def get_nearest_neighbors(self, query, k):
        return super().get_nearest_neighbors(query.to(self.data.dtype), k)


def test_a_backend_that_casts_large_queries_itself_still_ranks_them_right():
    """Found in review: with the query sent unscaled, a row past float16's range became inf
    in the backend's own cast, and its top-k was wrong without an error."""
    g = torch.Generator().manual_seed(5)
    data = torch.randn(30, 6, generator=g).half()
    query = torch.randn(4, 6, generator=g) * 1e6
    wrapped = ForeignNearestNeighbors(CastsItself())
    wrapped.setup(data)
    indices, _ = wrapped.get_nearest_neighbors(query, 5)
    assert torch.equal(indices, _top(query.double() @ data.double().T, 5)[0])
