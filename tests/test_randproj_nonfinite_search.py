"""TracInCPFastRandProj's searches with many training examples whose embeddings are not
finite: they rank last, and the backend is asked for k neighbours however many there are."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import save_checkpoints
from proponents import TracInCPFastRandProj
from proponents.neighbors import (
    AnnoyNearestNeighbors,
    ExactNearestNeighbors,
    FaissNearestNeighbors,
    NearestNeighbors,
)

EXTRA_REASON = "optional extra not installed"
BACKENDS = ["exact", "annoy", "faiss"]


def _backend(name: str, n: int) -> NearestNeighbors:
    if name == "annoy":
        pytest.importorskip("annoy", reason=EXTRA_REASON)
        # Inspecting at least N * num_trees nodes visits every item: exhaustive.
        return AnnoyNearestNeighbors(num_trees=3, search_k=n * 3 * 2)
    if name == "faiss":
        pytest.importorskip("faiss", reason=EXTRA_REASON)
        return FaissNearestNeighbors("Flat")
    return ExactNearestNeighbors(block_size=16)


def _index(folder, name: str, n_train: int, n_nan: int, backend=None):
    """A linear model's index of ``n_train`` examples, ``n_nan`` of them with a NaN input
    (so a NaN embedding), duplicates among the others; and a finite test batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    g = torch.Generator().manual_seed(n_train + n_nan)
    paths = save_checkpoints(model, folder, [0.5, 1.0], g)
    x, y = torch.randn(n_train, 4, generator=g), torch.randn(n_train, 3, generator=g)
    x[::5], y[::5] = x[1], y[1]  # equal scores: dataset order decides
    nan_rows = torch.randperm(n_train, generator=g)[:n_nan]
    x[nan_rows, 2] = float("nan")
    search = _backend(name, n_train) if backend is None else backend
    with pytest.warns(RuntimeWarning, match="training examples"):
        rp = TracInCPFastRandProj(
            model,
            "0",
            TensorDataset(x, y),
            paths,
            loss_fn=nn.MSELoss(reduction="sum"),
            batch_size=16,
            nearest_neighbors=search,
        )
    finite = torch.isfinite(rp.embeddings).all(dim=1)
    assert int((~finite).sum()) == n_nan
    test = ((torch.randn(6, 4, generator=g),), torch.randn(6, 3, generator=g))
    return rp, test


def _stable_top(full: torch.Tensor, k: int, proponents: bool):
    """The first k of each row stably sorted, highest (or lowest) first, non-finite last."""
    signed = full if proponents else -full
    key = torch.where(torch.isfinite(full), signed, torch.full_like(full, -float("inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    return order, full.gather(1, order)


def _assert_ranked(rp, test, k: int, name: str) -> None:
    full = rp.influence(*test, k=None)
    for proponents in (True, False):
        got = rp.influence(*test, k=k, proponents=proponents)
        indices, scores = _stable_top(full, k, proponents)
        assert torch.equal(got.indices, indices), (name, proponents)
        # exact search computes the k=None bits; Annoy and Faiss rescore their
        # candidates one by one, which may round the last bit otherwise
        tol = {"rtol": 0.0, "atol": 0.0} if name == "exact" else {}
        torch.testing.assert_close(got.influence_scores, scores, equal_nan=True, **tol)


@pytest.mark.parametrize("name", BACKENDS)
def test_many_nan_rows_rank_last(tmp_path, name):
    rp, test = _index(tmp_path, name, 60, 25)
    _assert_ranked(rp, test, 5, name)


@pytest.mark.parametrize("name", BACKENDS)
def test_more_nan_rows_than_finite_ones_rank_last(tmp_path, name):
    rp, test = _index(tmp_path, name, 60, 45)
    _assert_ranked(rp, test, 7, name)


@pytest.mark.parametrize("name", BACKENDS)
def test_fewer_finite_rows_than_k_are_followed_by_nan_rows_in_dataset_order(tmp_path, name):
    rp, test = _index(tmp_path, name, 40, 37)
    _assert_ranked(rp, test, 8, name)
    got = rp.influence(*test, k=8)
    assert bool(torch.isfinite(got.influence_scores[:, :3]).all())
    assert bool(torch.isnan(got.influence_scores[:, 3:]).all())


@pytest.mark.parametrize("name", BACKENDS)
def test_the_backend_is_asked_for_k_however_many_rows_are_not_finite(tmp_path, name, monkeypatch):
    """The search asked the backend for k + (number of non-finite rows) neighbours, so its
    time and memory grew with n_test x n_nonfinite; now it asks for k."""
    rp, test = _index(tmp_path, name, 80, 50)
    backend = rp.nearest_neighbors
    query = backend._query
    asked: list[int] = []

    def recording(q, k, *args, **kwargs):
        asked.append(k)
        return query(q, k, *args, **kwargs)

    monkeypatch.setattr(backend, "_query", recording)
    for proponents in (True, False):
        rp.influence(*test, k=4, proponents=proponents)
    assert asked == [4, 4]


class _Duck:
    """A backend written for Captum's interface: exact search of its own."""

    def setup(self, data):
        self.data = data

    def get_nearest_neighbors(self, query, k):
        order = torch.sort(query @ self.data.T, dim=1, descending=True, stable=True)
        return order.indices[:, :k], order.values[:, :k]


def test_another_backend_still_ranks_nan_rows_last(tmp_path):
    """A backend that knows nothing of non-finite rows is asked for enough extra ones."""
    rp, test = _index(tmp_path, "exact", 60, 45, backend=_Duck())
    full = rp.influence(*test, k=None)
    for proponents in (True, False):
        got = rp.influence(*test, k=5, proponents=proponents)
        assert torch.equal(got.indices, _stable_top(full, 5, proponents)[0])


@pytest.mark.parametrize("name", BACKENDS)
def test_search_finite_keeps_finite_rows_beyond_float32_range(name):
    """Annoy and Faiss leave float64 rows beyond float32's range out of their index, as
    they do NaN and inf rows; search_finite passes over the non-finite ones only."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(90, 6, generator=g, dtype=torch.float64)
    data[[3, 10, 11, 40, 41, 42, 77]] = float("nan")
    data[[5, 50], 1] = float("inf")
    data[[7, 60]] *= 1e39  # finite, infinite in float32
    query = torch.randn(8, 6, generator=g, dtype=torch.float64)
    backend = _backend(name, 90)
    backend.setup(data)
    finite = torch.isfinite(data).all(dim=1)
    scores = query @ data.T
    for k in (1, 4):
        for q in (query, -query):
            indices, got = backend.search_finite(q, k)
            key = torch.where(finite, q @ data.T, torch.full_like(scores, -float("inf")))
            want = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
            assert torch.equal(indices, want), (k, name)
            torch.testing.assert_close(got, (q @ data.T).gather(1, want))
