"""Tests of the nearest-neighbour backends (proponents.neighbors)."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proponents.errors import ArgumentTypeError, InvalidArgumentError, ProponentsError, StoreError
from proponents.neighbors import (
    AnnoyNearestNeighbors,
    ExactNearestNeighbors,
    FaissNearestNeighbors,
    MissingExtraError,
    NearestNeighbors,
    NearestNeighborsNotReadyError,
)
from proponents.neighbors import exact as exact_module

EXTRA_REASON = "optional extra not installed"


def reference_top_k(data: torch.Tensor, query: torch.Tensor, k: int):
    """Brute force in float64: sort by (score descending, index ascending)."""
    scores = query.double() @ data.double().T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order, scores.gather(1, order)


def random_data(n: int = 60, d: int = 7, n_query: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, d, generator=g, dtype=torch.float64)
    query = torch.randn(n_query, d, generator=g, dtype=torch.float64)
    return data, query


def need_annoy() -> None:
    pytest.importorskip("annoy", reason=EXTRA_REASON)


def need_faiss() -> None:
    pytest.importorskip("faiss", reason=EXTRA_REASON)


def make_exact(n: int) -> NearestNeighbors:
    return ExactNearestNeighbors(block_size=7)


def make_annoy(n: int) -> NearestNeighbors:
    need_annoy()
    # Inspecting at least N * num_trees nodes visits every item: exact on small data.
    return AnnoyNearestNeighbors(num_trees=5, search_k=n * 5 * 2)


def make_faiss_flat(n: int) -> NearestNeighbors:
    need_faiss()
    return FaissNearestNeighbors()


def make_faiss_ivf(n: int) -> NearestNeighbors:
    need_faiss()
    # Probing every list is exhaustive, hence exact.
    return FaissNearestNeighbors("IVF4,Flat", nprobe=4)


BACKENDS: dict[str, Callable[[int], NearestNeighbors]] = {
    "exact": make_exact,
    "annoy": make_annoy,
    "faiss-flat": make_faiss_flat,
    "faiss-ivf": make_faiss_ivf,
}


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request) -> Callable[[int], NearestNeighbors]:
    return BACKENDS[request.param]


@pytest.fixture(autouse=True)
def _rebuild_warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # rebuild warnings must be expected
        yield


# -- exact answers ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
def test_ties_at_the_cut_off_keep_dataset_order_with_every_backend(make_backend, k):
    """Every row twice (row i + 20 is row i) and a query with all-zero scores: the k-th
    score ties with scores left out. Faiss hands back any one of equal scores at its
    cut-off (even a flat index did, giving the higher index); every backend must give
    the stable sort of a float64 reference, lower index first among equals."""
    g = torch.Generator().manual_seed(5)
    data = torch.randn(20, 6, generator=g).repeat(2, 1)
    query = torch.cat([torch.randn(5, 6, generator=g), torch.zeros(1, 6)])
    nn = make_backend(data.shape[0])
    nn.setup(data)
    for sign in (1, -1):  # proponents and opponents
        indices, scores = nn.get_nearest_neighbors(sign * query, k)
        want_idx, want_scores = reference_top_k(data, sign * query, k)
        assert indices.tolist() == want_idx.tolist()
        torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 40, 60])
def test_backend_matches_brute_force(make_backend, k):
    data, query = random_data()
    nn = make_backend(data.shape[0])
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(query, k)
    ref_idx, ref_scores = reference_top_k(data, query, k)
    assert indices.dtype == torch.long
    assert indices.shape == scores.shape == (query.shape[0], k)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)


def test_scores_are_true_inner_products_in_float32(make_backend):
    data, query = random_data(n=50, d=5)
    data, query = data.float(), query.float()
    nn = make_backend(50)
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(query, 6)
    assert scores.dtype == torch.float32
    expected = torch.einsum("nkd,nd->nk", data[indices], query)
    torch.testing.assert_close(scores, expected)
    assert torch.equal(indices, reference_top_k(data, query, 6)[0])


def test_negated_query_finds_opponents_with_scores_for_the_query_as_given(make_backend):
    data, query = random_data()
    nn = make_backend(data.shape[0])
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(-query, 5)
    true = query @ data.T
    opp_idx = torch.sort(true, dim=1, stable=True).indices[:, :5]
    assert torch.equal(indices, opp_idx)
    # Scores belong to the negated query: the caller flips them back.
    torch.testing.assert_close(-scores, true.gather(1, opp_idx))


def test_mixed_dtypes_promote(make_backend):
    data, query = random_data(n=40)
    nn = make_backend(40)
    nn.setup(data.float())
    indices, scores = nn.get_nearest_neighbors(query, 4)
    assert scores.dtype == torch.float64
    expected = torch.einsum("nkd,nd->nk", data.float().double()[indices], query)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


def test_empty_query_gives_empty_results(make_backend):
    data, _ = random_data(n=40)
    nn = make_backend(40)
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(torch.zeros(0, data.shape[1]), 3)
    assert indices.shape == scores.shape == (0, 3)
    assert indices.dtype == torch.long


def test_setup_again_replaces_data(make_backend):
    data, query = random_data(n=40)
    other, _ = random_data(n=45, seed=3)
    nn = make_backend(45)
    nn.setup(data)
    nn.setup(other)
    indices, _ = nn.get_nearest_neighbors(query, 45)
    assert torch.equal(indices, reference_top_k(other, query, 45)[0])


@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 59, 60, 61, 1000])
@pytest.mark.parametrize("k", [1, 4, 60])
def test_exact_block_sizes(block_size, k):
    data, query = random_data(n=60)
    nn = ExactNearestNeighbors(block_size=block_size)
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(query, k)
    ref_idx, ref_scores = reference_top_k(data, query, k)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)


def test_exact_query_chunks(monkeypatch):
    monkeypatch.setattr(exact_module, "_MAX_BLOCK_ENTRIES", 8)
    data, query = random_data(n=30, n_query=11)
    nn = ExactNearestNeighbors(block_size=4)  # two query rows per chunk
    nn.setup(data)
    indices, _ = nn.get_nearest_neighbors(query, 5)
    assert torch.equal(indices, reference_top_k(data, query, 5)[0])


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 8, 100])
def test_exact_ties_prefer_smaller_index(block_size):
    # Duplicated rows and small integer values: many equal scores, across blocks and
    # at the k-th position.
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    data = torch.cat([base, base, base[:2], base])  # 14 rows
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [-1.0, 0.0]])
    nn = ExactNearestNeighbors(block_size=block_size)
    nn.setup(data)
    for k in range(1, data.shape[0] + 1):
        indices, scores = nn.get_nearest_neighbors(query, k)
        ref_idx, ref_scores = reference_top_k(data, query, k)
        assert torch.equal(indices, ref_idx), (block_size, k)
        torch.testing.assert_close(scores.double(), ref_scores)


def test_exact_is_deterministic_with_all_equal_scores():
    data = torch.ones(50, 3)
    nn = ExactNearestNeighbors(block_size=9)
    nn.setup(data)
    indices, _ = nn.get_nearest_neighbors(torch.ones(2, 3), 10)
    assert torch.equal(indices, torch.arange(10).expand(2, 10))


def test_exact_nan_scores_sort_first_deterministically():
    data = torch.tensor([[1.0], [float("nan")], [3.0], [float("nan")], [2.0]])
    nn = ExactNearestNeighbors(block_size=2)
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(torch.ones(1, 1), 3)
    assert indices.tolist() == [[1, 3, 2]]
    assert torch.isnan(scores[0, :2]).all() and scores[0, 2] == 3.0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 5),
    n_query=st.integers(1, 6),
    block_size=st.integers(1, 50),
    data=st.data(),
)
def test_exact_matches_reference_on_integer_data(n, d, n_query, block_size, data):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).float()
    q = torch.randint(-2, 3, (n_query, d), generator=g).float()
    nn = ExactNearestNeighbors(block_size=block_size)
    nn.setup(x)
    indices, scores = nn.get_nearest_neighbors(q, k)
    ref_idx, ref_scores = reference_top_k(x, q, k)
    assert torch.equal(indices, ref_idx)
    assert torch.equal(scores.double(), ref_scores)


def test_exact_keeps_data_by_reference():
    data, query = random_data(n=20)
    nn = ExactNearestNeighbors()
    nn.setup(data)
    assert nn._data.data_ptr() == data.data_ptr()
    assert nn.num_items == 20


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_results_on_query_device(name):
    data, query = random_data(n=60)
    for data_dev, query_dev in [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")]:
        nn = BACKENDS[name](60)
        nn.setup(data.to(data_dev))
        indices, scores = nn.get_nearest_neighbors(query.to(query_dev), 5)
        assert indices.device.type == scores.device.type == query_dev
        assert torch.equal(indices.cpu(), reference_top_k(data, query, 5)[0])


def test_annoy_short_or_repeated_candidates_fall_back_to_exact():
    need_annoy()
    data, query = random_data(n=30, n_query=3)
    nn = AnnoyNearestNeighbors(num_trees=2)
    nn.setup(data)

    class Stub:
        def __init__(self) -> None:
            # asked for k + 1 = 5 candidates: short, repeated, full
            self.answers = [[0, 1], [4, 4, 5, 6, 7], [7, 8, 9, 10, 11]]

        def get_nns_by_vector(self, vector, n, search_k=-1):
            return self.answers.pop(0)

    nn._index = Stub()
    indices, scores = nn.get_nearest_neighbors(query, 4)
    ref_idx, ref_scores = reference_top_k(data, query, 4)
    assert torch.equal(indices[:2], ref_idx[:2])  # short row, repeated row: redone exactly
    # a full row is only rescored: the best 4 of its 5 candidates by their exact scores
    candidates = torch.tensor([7, 8, 9, 10, 11])
    best = (data[candidates] @ query[2]).argsort(descending=True)[:4]
    assert sorted(indices[2].tolist()) == sorted(candidates[best].tolist())
    expected = torch.einsum("kd,d->k", data[indices[2]], query[2])
    torch.testing.assert_close(scores[2], expected)
    assert (scores[2, :-1] >= scores[2, 1:]).all()


# -- bad input ---------------------------------------------------------------------------


def test_query_before_setup(make_backend):
    nn = make_backend(10)
    with pytest.raises(NearestNeighborsNotReadyError, match=r"setup\(data\)"):
        nn.get_nearest_neighbors(torch.zeros(1, 3), 1)
    assert isinstance(NearestNeighborsNotReadyError("x"), RuntimeError)


@pytest.mark.parametrize(
    ("data", "error", "pattern"),
    [
        ([[1.0, 2.0]], ArgumentTypeError, "data must be a torch.Tensor"),
        (torch.zeros(3), InvalidArgumentError, r"data must be a 2-D tensor.*\(3,\)"),
        (torch.zeros(2, 0, 4), InvalidArgumentError, r"at least one column.*\(2, 0, 4\)"),
        (torch.zeros(3, 2, dtype=torch.long), ArgumentTypeError, "data.*floating-point"),
        (torch.zeros(0, 3), InvalidArgumentError, "data must have at least one row"),
        (torch.zeros(3, 0), InvalidArgumentError, "data must have at least one column"),
    ],
)
def test_bad_data(make_backend, data, error, pattern):
    nn = make_backend(10)
    with pytest.raises(error, match=pattern):
        nn.setup(data)


@pytest.mark.parametrize(
    ("query", "k", "error", "pattern"),
    [
        ("abc", 1, ArgumentTypeError, "query must be a torch.Tensor"),
        (torch.zeros(4), 1, InvalidArgumentError, "query must be a 2-D"),
        (torch.zeros(2, 5), 1, InvalidArgumentError, "query has 5 columns.*D=4"),
        (torch.zeros(2, 4, dtype=torch.int32), 1, ArgumentTypeError, "query.*floating"),
        (torch.zeros(2, 4), 0, InvalidArgumentError, r"k must be between 1 and N=40.*k=0"),
        (torch.zeros(2, 4), 41, InvalidArgumentError, r"k must be between 1 and N=40.*k=41"),
        (torch.zeros(2, 4), -1, InvalidArgumentError, "k must be between"),
        (torch.zeros(2, 4), 1.5, ArgumentTypeError, "k must be an int; got float"),
        (torch.zeros(2, 4), True, ArgumentTypeError, "k must be an int; got bool"),
        (torch.zeros(2, 4), None, ArgumentTypeError, "k must be an int; got NoneType"),
    ],
)
def test_bad_query(make_backend, query, k, error, pattern):
    nn = make_backend(40)
    nn.setup(torch.randn(40, 4))
    with pytest.raises(error, match=pattern):
        nn.get_nearest_neighbors(query, k)


def test_numpy_integer_k_is_accepted():
    np = pytest.importorskip("numpy")
    nn = ExactNearestNeighbors()
    nn.setup(torch.randn(10, 2))
    indices, _ = nn.get_nearest_neighbors(torch.randn(1, 2), np.int64(3))
    assert indices.shape == (1, 3)


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: ExactNearestNeighbors(block_size=0), InvalidArgumentError, "block_size"),
        (lambda: ExactNearestNeighbors(block_size=2.0), ArgumentTypeError, "block_size"),
        (lambda: ExactNearestNeighbors(block_size=True), ArgumentTypeError, "block_size"),
    ],
)
def test_bad_exact_settings(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"num_trees": 0}, InvalidArgumentError, "num_trees must be >= 1; got 0"),
        ({"num_trees": "10"}, ArgumentTypeError, "num_trees must be an int"),
        ({"search_k": 0}, InvalidArgumentError, "search_k must be -1"),
        ({"search_k": -5}, InvalidArgumentError, "search_k must be -1"),
        ({"seed": -1}, InvalidArgumentError, "seed"),
    ],
)
def test_bad_annoy_settings(kwargs, error, pattern):
    need_annoy()
    with pytest.raises(error, match=pattern):
        AnnoyNearestNeighbors(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"index_factory": 3}, ArgumentTypeError, "index_factory must be a Faiss"),
        ({"index_factory": " "}, InvalidArgumentError, "index_factory must be a non-empty"),
        ({"nprobe": 0}, InvalidArgumentError, "nprobe must be >= 1; got 0"),
        ({"nprobe": 1.0}, ArgumentTypeError, "nprobe must be an int or None"),
    ],
)
def test_bad_faiss_settings(kwargs, error, pattern):
    need_faiss()
    with pytest.raises(error, match=pattern):
        FaissNearestNeighbors(**kwargs)


def test_faiss_bad_factory_and_untrainable_index():
    need_faiss()
    data = torch.randn(10, 4)
    with pytest.raises(InvalidArgumentError, match="index_factory 'NoSuchIndex'"):
        FaissNearestNeighbors("NoSuchIndex").setup(data)
    with pytest.raises(InvalidArgumentError, match=r"'IVF64,Flat' cannot be trained on N=10"):
        FaissNearestNeighbors("IVF64,Flat").setup(data)
    with pytest.raises(InvalidArgumentError, match="nprobe=2 applies to IVF indices only"):
        FaissNearestNeighbors("Flat", nprobe=2).setup(data)


@pytest.mark.parametrize("k", [40, 60])
def test_faiss_rows_short_of_k_fall_back_to_exact(k):
    need_faiss()
    data, query = random_data(n=60)
    nn = FaissNearestNeighbors("IVF8,Flat", nprobe=1)  # one list holds fewer than k vectors
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(query, k)
    ref_idx, ref_scores = reference_top_k(data, query, k)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)


def test_faiss_nprobe_can_be_changed_after_setup():
    need_faiss()
    data, query = random_data(n=80)
    nn = FaissNearestNeighbors("IVF8,Flat")
    nn.setup(data)
    nn.nprobe = 8
    assert nn.config()["nprobe"] == 8
    indices, _ = nn.get_nearest_neighbors(query, 10)
    assert torch.equal(indices, reference_top_k(data, query, 10)[0])


# -- optional extras ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "module", "extra"),
    [(AnnoyNearestNeighbors, "annoy", "annoy"), (FaissNearestNeighbors, "faiss", "faiss")],
)
def test_missing_extra_names_the_extra(monkeypatch, cls, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes "import <module>" fail
    with pytest.raises(MissingExtraError) as info:
        cls()
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value, ProponentsError)
    message = str(info.value)
    assert f"pip install 'proponents[{extra}]'" in message
    assert cls.__name__ in message


def test_importing_the_package_does_not_import_the_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "annoy", None)
    monkeypatch.setitem(sys.modules, "faiss", None)
    nn = ExactNearestNeighbors()
    nn.setup(torch.randn(5, 2))
    assert nn.get_nearest_neighbors(torch.randn(1, 2), 2)[0].shape == (1, 2)


# -- configuration and persistence ----------------------------------------------------


def test_config_is_json_and_round_trips(make_backend):
    nn = make_backend(40)
    config = nn.config()
    assert isinstance(config["backend"], str)
    again = NearestNeighbors.from_config(json.loads(json.dumps(config)))
    assert type(again) is type(nn)
    assert again.config() == config


def test_from_config_errors():
    with pytest.raises(InvalidArgumentError, match="'backend' key"):
        NearestNeighbors.from_config({"block_size": 3})
    with pytest.raises(InvalidArgumentError, match=r"'nope'.*known: .*exact"):
        NearestNeighbors.from_config({"backend": "nope"})
    with pytest.raises(InvalidArgumentError, match="does not accept"):
        NearestNeighbors.from_config({"backend": "exact", "trees": 3})


def test_exact_save_writes_nothing_and_load_rebuilds(tmp_path):
    data, query = random_data(n=20)
    nn = ExactNearestNeighbors()
    nn.setup(data)
    assert nn.save(tmp_path) is False
    assert list(tmp_path.iterdir()) == []
    fresh = ExactNearestNeighbors()
    assert fresh.load(tmp_path, data) is False
    assert torch.equal(fresh.get_nearest_neighbors(query, 3)[0], reference_top_k(data, query, 3)[0])


class CaptumStyle(NearestNeighbors):
    """A user backend that implements only the two abstract methods."""

    def setup(self, data):
        self.data = data

    def get_nearest_neighbors(self, query, k):
        scores, indices = (query @ self.data.T).topk(k, dim=1)
        return indices, scores


def test_user_defined_backend_gets_defaults(tmp_path):
    nn = CaptumStyle()
    assert nn.config() == {"backend": f"{__name__}.CaptumStyle"}
    assert nn.save(tmp_path) is False
    data, query = random_data(n=10)
    assert nn.load(tmp_path, data) is False
    assert torch.equal(nn.get_nearest_neighbors(query, 2)[0], reference_top_k(data, query, 2)[0])
    with pytest.raises(InvalidArgumentError, match="not a built-in backend"):
        NearestNeighbors.from_config(nn.config())


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        NearestNeighbors()


PERSISTABLE = ["annoy", "faiss-flat", "faiss-ivf"]


@pytest.mark.parametrize("name", PERSISTABLE)
def test_save_and_load_round_trip(tmp_path, name):
    data, query = random_data(n=60)
    nn = BACKENDS[name](60)
    with pytest.raises(NearestNeighborsNotReadyError):
        nn.save(tmp_path)
    nn.setup(data)
    before = nn.get_nearest_neighbors(query, 5)
    assert nn.save(tmp_path / "index") is True
    meta = json.loads((tmp_path / "index" / "neighbors.json").read_text())
    assert meta["num_items"] == 60 and meta["dim"] == data.shape[1]
    assert meta["config"] == nn.config()
    fresh = NearestNeighbors.from_config(meta["config"])
    assert fresh.load(tmp_path / "index", data) is True
    after = fresh.get_nearest_neighbors(query, 5)
    assert torch.equal(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])
    # Saving again over the same folder works, also from a loaded index.
    assert fresh.save(tmp_path / "index") is True
    assert NearestNeighbors.from_config(meta["config"]).load(tmp_path / "index", data)


@pytest.mark.parametrize("name", PERSISTABLE)
@pytest.mark.parametrize("where", ["the path", "a folder above it"])
def test_saving_where_a_file_is_names_the_file(tmp_path, name, where):
    """Before, a bare FileExistsError from mkdir; the user's file is left alone."""
    data, _ = random_data(n=30)
    nn = BACKENDS[name](30)
    nn.setup(data)
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    target = blocker if where == "the path" else blocker / "index"
    with pytest.raises(InvalidArgumentError, match=r"'.*taken' is a file, not a directory"):
        nn.save(target)
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("name", PERSISTABLE)
def test_query_time_settings_do_not_invalidate_a_saved_index(tmp_path, name):
    data, query = random_data(n=60)
    nn = BACKENDS[name](60)
    nn.setup(data)
    nn.save(tmp_path)
    config = nn.config()
    if config["backend"] == "annoy":
        config["search_k"] = 7
    else:
        config["nprobe"] = 2 if "IVF" in config["index_factory"] else None
    fresh = NearestNeighbors.from_config(config)
    assert fresh.load(tmp_path, data) is True
    assert fresh.get_nearest_neighbors(query, 3)[0].shape == (query.shape[0], 3)


@pytest.mark.parametrize("name", PERSISTABLE)
def test_unusable_saved_index_is_rebuilt_with_a_warning(tmp_path, name):
    data, query = random_data(n=60)
    nn = BACKENDS[name](60)
    nn.setup(data)
    nn.save(tmp_path)
    config = nn.config()
    other = data.clone()
    other[30] += 1.0
    index_file = next(p for p in tmp_path.iterdir() if p.suffix != ".json")

    def check(folder, load_data, pattern, make=lambda: NearestNeighbors.from_config(config)):
        fresh = make()
        with pytest.warns(RuntimeWarning, match=pattern):
            assert fresh.load(folder, load_data) is False
        q = query[:, : load_data.shape[1]]
        indices, _ = fresh.get_nearest_neighbors(q, 4)
        assert torch.equal(indices, reference_top_k(load_data, q, 4)[0])

    check(tmp_path / "missing", data, "neighbors.json is missing")
    check(tmp_path, data[:50], r"number of vectors \(N\) do not match \(saved 60, now 50\)")
    check(tmp_path, other, "different data")
    check(tmp_path, data[:, :-1].contiguous(), r"vector dimensions \(D\) do not match")
    if config["backend"] == "annoy":
        check(
            tmp_path, data, "build settings do not match", lambda: AnnoyNearestNeighbors(3, 10_000)
        )
    else:
        check(
            tmp_path,
            data,
            "build settings do not match",
            lambda: FaissNearestNeighbors("IVF2,Flat", nprobe=2),
        )
    # damage that leaves a readable index: one flipped bit far into the file, the last
    # two thirds overwritten (before: searched as it was, with other neighbours)
    good = index_file.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) * 3 // 4] ^= 0x10
    index_file.write_bytes(bytes(flipped))
    check(tmp_path, data, "checksum differs")
    index_file.write_bytes(good[: len(good) // 3] + b"\xff" * (len(good) - len(good) // 3))
    check(tmp_path, data, "checksum differs")
    index_file.write_bytes(b"not an index")
    check(tmp_path, data, "checksum differs")
    # an index saved before the checksum was recorded: an unreadable file is named
    meta = json.loads((tmp_path / "neighbors.json").read_text())
    del meta["index_crc32"]
    (tmp_path / "neighbors.json").write_text(json.dumps(meta))
    check(tmp_path, data, "could not be read")
    index_file.write_bytes(good)
    assert NearestNeighbors.from_config(config).load(tmp_path, data) is True
    index_file.unlink()
    check(tmp_path, data, "is missing")
    (tmp_path / "neighbors.json").write_text("{broken")
    check(tmp_path, data, "neighbors.json could not be read")


# -- exact scores: one bit pattern per row, wherever it sits ------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("n_base", "copies", "d", "block_size"),
    [(700, 13, 7, 4096), (1001, 9, 64, 4096), (167, 25, 1000, 4096), (97, 7, 64, 100)],
)
@pytest.mark.parametrize("n_query", [1, 3])
def test_duplicates_in_different_blocks_get_equal_scores_and_rank_in_dataset_order(
    dtype, n_base, copies, d, block_size, n_query
):
    # Row i equals rows i + n_base, i + 2 n_base, ...: copies in every block, the short
    # last block included (the row counts are not multiples of the block size).
    g = torch.Generator().manual_seed(n_base + d)
    base = torch.randn(n_base, d, generator=g, dtype=dtype) * 3
    data = base.repeat(copies, 1)
    query = torch.randn(n_query, d, generator=g, dtype=dtype)
    nn = ExactNearestNeighbors(block_size=block_size)
    nn.setup(data)
    full = nn.all_scores(query)
    assert full.shape == (n_query, n_base * copies) and full.dtype == dtype
    # Every copy of a row has the same score, bit for bit.
    by_copy = full.view(n_query, copies, n_base)
    assert torch.equal(by_copy, by_copy[:, :1].expand_as(by_copy))
    # And those scores are the inner products (checked against float64).
    ref = query.double() @ data.double().T
    torch.testing.assert_close(full.double(), ref, rtol=1e-5, atol=1e-4)
    for sign in (1, -1):
        k = 2 * copies + 1
        indices, scores = nn.get_nearest_neighbors(sign * query, k)
        # The best row's copies come first, in dataset order, then the next row's.
        first = indices[:, :copies] % n_base
        assert torch.equal(first, first[:, :1].expand_as(first))
        assert torch.equal(indices[:, :copies], indices[:, :1] + n_base * torch.arange(copies))
        # The answer is the stable sort of the full matrix, scores bit-identical.
        ordered = torch.sort(sign * full, dim=1, descending=True, stable=True)
        assert torch.equal(indices, ordered.indices[:, :k])
        assert torch.equal(scores, ordered.values[:, :k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [1, 64, 100, 4096])
def test_exact_top_k_is_the_stable_sort_of_a_float64_reference(dtype, block_size):
    g = torch.Generator().manual_seed(block_size)
    data = torch.randn(5000, 33, generator=g).to(dtype)
    query = torch.randn(20, 33, generator=g).to(dtype)
    k = 25
    ref = query.double() @ data.double().T
    nn = ExactNearestNeighbors(block_size=block_size)
    nn.setup(data)
    for sign in (1, -1):
        ordered = torch.sort(sign * ref, dim=1, descending=True, stable=True)
        # Only rows without near-ties among their first k + 1 reference scores, where
        # rounding could not change the order.
        gaps = ordered.values[:, :k] - ordered.values[:, 1 : k + 1]
        clear = (gaps > 1e-3).all(dim=1)
        assert int(clear.sum()) >= 5
        indices, scores = nn.get_nearest_neighbors(sign * query, k)
        assert torch.equal(indices[clear], ordered.indices[clear, :k])
        torch.testing.assert_close(scores.double(), ordered.values[:, :k], rtol=1e-5, atol=1e-4)


def test_block_scores_is_the_full_product_on_the_query_device():
    data, query = random_data(n=300, d=9, n_query=5)
    out = exact_module.block_scores(query, data, 64)
    torch.testing.assert_close(out, query @ data.T, rtol=1e-12, atol=1e-12)
    assert out.device == query.device
    assert exact_module.block_scores(query, data[:0]).shape == (5, 0)  # no rows (a shard)
    # float16 data is scored in float32 (at least), one block converted at a time.
    half = exact_module.block_scores(query.float(), data.half(), 64)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, query.float() @ data.half().float().T)
    nn = ExactNearestNeighbors(block_size=64)
    nn.setup(data.half())
    idx, scores = nn.get_nearest_neighbors(query.half(), 3)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, exact_module.block_scores(query.half(), data.half()).gather(1, idx))
    with pytest.raises(NearestNeighborsNotReadyError):
        ExactNearestNeighbors().all_scores(query)
    with pytest.raises(InvalidArgumentError, match="query has 8 columns"):
        nn.all_scores(query[:, :8])


# -- answers of user-written backends are checked --------------------------------------


class Scripted(NearestNeighbors):
    """A user backend that returns whatever the test gives it."""

    def __init__(self, answer) -> None:
        self.answer = answer

    def setup(self, data):
        self.data = data

    def get_nearest_neighbors(self, query, k):
        return self.answer(query, k)


def test_search_converts_numpy_answers_and_sorts_rows():
    data, query = random_data(n=20, n_query=4)

    def numpy_ascending(q, k):
        scores = q @ data.T
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        order = order.flip(1)  # worst first: the check sorts the rows
        return order.numpy().astype("int32"), scores.gather(1, order).numpy()

    nn = Scripted(numpy_ascending)
    nn.setup(data)
    indices, scores = nn.search(query, 3, 20)
    ref_idx, ref_scores = reference_top_k(data, query, 3)
    assert indices.dtype == torch.long and isinstance(scores, torch.Tensor)
    assert torch.equal(indices, ref_idx)
    torch.testing.assert_close(scores, ref_scores)
    # A well-behaved torch backend passes through unchanged.
    good = CaptumStyle()
    good.setup(data)
    assert torch.equal(good.search(query, 5, 20)[0], reference_top_k(data, query, 5)[0])


@pytest.mark.parametrize(
    ("answer", "error", "pattern"),
    [
        (lambda q, k: torch.zeros(len(q), k), ArgumentTypeError, "a pair .*got a Tensor"),
        (
            lambda q, k: (torch.zeros(len(q), k, dtype=torch.long),) * 3,
            ArgumentTypeError,
            "got a tuple of 3 items",
        ),
        (
            lambda q, k: ([[0] * k] * len(q), torch.zeros(len(q), k)),
            ArgumentTypeError,
            "indices as a torch.Tensor .*got list",
        ),
        (
            lambda q, k: (torch.zeros(len(q), 1, dtype=torch.long), torch.zeros(len(q), 1)),
            InvalidArgumentError,
            r"indices of shape \(4, 1\).*\(n, k\) = \(4, 3\)",
        ),
        (
            lambda q, k: (torch.arange(k).expand(len(q), k), torch.zeros(len(q) + 1, k)),
            InvalidArgumentError,
            r"scores of shape \(5, 3\)",
        ),
        (
            lambda q, k: (torch.zeros(len(q), k), torch.zeros(len(q), k)),
            ArgumentTypeError,
            "integer indices .*torch.float32",
        ),
        (
            lambda q, k: (torch.arange(k).expand(len(q), k), torch.zeros(len(q), k).long()),
            ArgumentTypeError,
            "floating-point scores .*torch.int64",
        ),
        (
            lambda q, k: (torch.arange(18, 18 + k).expand(len(q), k), torch.zeros(len(q), k)),
            InvalidArgumentError,
            r"index 20, outside the valid row numbers 0\.\.19",
        ),
        (
            lambda q, k: (-torch.arange(k).expand(len(q), k), torch.zeros(len(q), k)),
            InvalidArgumentError,
            "index -2, outside",
        ),
        (
            lambda q, k: (torch.zeros(len(q), k, dtype=torch.long), torch.zeros(len(q), k)),
            InvalidArgumentError,
            r"same index twice in row 0 \(\[0, 0, 0\]\)",
        ),
    ],
)
def test_search_names_the_backend_and_what_is_wrong(answer, error, pattern):
    data, query = random_data(n=20, n_query=4)
    nn = Scripted(answer)
    nn.setup(data)
    with pytest.raises(error, match=r"Scripted\.get_nearest_neighbors\(query, k=3\)"):
        nn.search(query, 3, 20)
    with pytest.raises(error, match=pattern):
        nn.search(query, 3, 20)


def test_search_without_num_items_checks_everything_but_the_upper_bound():
    data, query = random_data(n=20, n_query=2)
    nn = Scripted(lambda q, k: (torch.arange(50, 50 + k).expand(len(q), k), torch.zeros(2, k)))
    nn.setup(data)
    assert nn.search(query, 2)[0].tolist() == [[50, 51], [50, 51]]


# -- settings that cannot fit the data are reported before it exists ---------------------


def test_check_fits_is_a_no_op_by_default():
    for nn in (ExactNearestNeighbors(), CaptumStyle()):
        assert nn.check_fits(1, 3) is None


@pytest.mark.parametrize(
    ("factory", "nprobe", "n", "pattern"),
    [
        ("Flat", 4, 1000, "nprobe=4 applies to IVF indices only"),
        ("NotAnIndex", None, 1000, r"'NotAnIndex' is not a valid Faiss index for D=16"),
        ("IVF1024,Flat", None, 40, r"N=40 vectors: an IVF index with 1024 lists needs .*1024"),
        ("PQ8", None, 100, "a product quantizer with 256 centroids needs at least 256"),
        ("IVF4,PQ8x4", None, 15, "product quantizer with 16 centroids"),
        ("OPQ4,IVF8,PQ4", None, 200, "product quantizer with 256 centroids"),
        # Faiss builds HNSW over PQ as an L2 index whatever metric it is asked for
        ("HNSW32,PQ8", None, 256, r"'HNSW32,PQ8' builds a Faiss index that ranks by L2"),
        ("PQ5", None, 1000, "D=16"),  # 16 dimensions cannot be split into 5 parts
    ],
)
def test_faiss_check_fits_rejects_what_setup_would(factory, nprobe, n, pattern):
    need_faiss()
    nn = FaissNearestNeighbors(factory, nprobe=nprobe)
    with pytest.raises(InvalidArgumentError, match=pattern):
        nn.check_fits(n, 16)
    with pytest.raises(InvalidArgumentError):  # the independent judge: setup() itself
        nn.setup(torch.randn(n, 16))


@pytest.mark.parametrize(
    ("factory", "n"),
    [("Flat", 1), ("IVF4,Flat", 4), ("PQ4x4", 16), ("IVF4,PQ4x4", 16), ("HNSW8", 3)],
)
def test_faiss_check_fits_accepts_what_setup_builds(factory, n):
    need_faiss()
    nn = FaissNearestNeighbors(factory)
    nn.check_fits(n, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Faiss may warn about few training points
        nn.setup(torch.randn(n, 16))
    assert nn.get_nearest_neighbors(torch.randn(2, 16), 1)[0].shape == (2, 1)


# -- rows with NaN or infinite entries ------------------------------------------------------


def _with_nonfinite_rows(n: int = 200, d: int = 8):
    data, query = random_data(n=n, d=d, n_query=6, seed=4)
    data = data.float()
    data[3, 2] = float("nan")
    data[50] = float("nan")
    data[77, 0] = float("inf")
    data[120, 5] = -float("inf")
    return data, query.float()


FINITE_ONLY = {
    "annoy": lambda: AnnoyNearestNeighbors(num_trees=5, search_k=200 * 5 * 4),
    "faiss-ivf": lambda: FaissNearestNeighbors("IVF16,Flat", nprobe=16),
    "faiss-flat": lambda: FaissNearestNeighbors("Flat"),
}


@pytest.mark.parametrize("name", sorted(FINITE_ONLY))
@pytest.mark.parametrize("k", [1, 4, 10, 200])
def test_nonfinite_rows_are_ranked_as_exact_search_ranks_them(name, k):
    (need_annoy if name == "annoy" else need_faiss)()
    data, query = _with_nonfinite_rows()
    exact = ExactNearestNeighbors()
    exact.setup(data)
    nn = FINITE_ONLY[name]()
    nn.setup(data)  # IVF training on NaN rows used to fail here
    for q in (query, -query):
        indices, scores = nn.get_nearest_neighbors(q, k)
        ref_idx, ref_scores = exact.get_nearest_neighbors(q, k)
        assert torch.equal(indices, ref_idx)
        torch.testing.assert_close(scores, ref_scores, equal_nan=True)
    # The non-finite rows are where a float64 brute force puts them: NaN first, +inf
    # before every finite score and -inf after.
    assert torch.equal(
        nn.get_nearest_neighbors(query, 200)[0], reference_top_k(data, query, 200)[0]
    )


@pytest.mark.parametrize("name", sorted(FINITE_ONLY))
def test_nonfinite_rows_survive_save_and_load(tmp_path, name):
    (need_annoy if name == "annoy" else need_faiss)()
    data, query = _with_nonfinite_rows()
    nn = FINITE_ONLY[name]()
    nn.setup(data)
    before = nn.get_nearest_neighbors(query, 7)
    assert nn.save(tmp_path) is True
    fresh = FINITE_ONLY[name]()
    assert fresh.load(tmp_path, data) is True
    after = fresh.get_nearest_neighbors(query, 7)
    assert torch.equal(before[0], after[0])
    torch.testing.assert_close(before[1], after[1], equal_nan=True)


@pytest.mark.parametrize("name", sorted(FINITE_ONLY))
def test_all_rows_nonfinite_is_answered_exactly(tmp_path, name):
    (need_annoy if name == "annoy" else need_faiss)()
    data = torch.full((12, 4), float("nan"))
    data[::3, 0] = float("inf")
    nn = FINITE_ONLY[name]()
    nn.setup(data)
    query = torch.ones(2, 4)
    ref = ExactNearestNeighbors()
    ref.setup(data)
    assert torch.equal(
        nn.get_nearest_neighbors(query, 5)[0], ref.get_nearest_neighbors(query, 5)[0]
    )
    assert nn.save(tmp_path) is False  # nothing was built, so nothing to save
    assert FINITE_ONLY[name]().load(tmp_path, data) is False


def test_faiss_training_error_counts_the_rows_left_out():
    need_faiss()
    data = torch.randn(40, 4)
    data[:30, 0] = float("nan")
    with pytest.raises(InvalidArgumentError, match=r"N=10 finite vectors \(30 of the 40 rows"):
        FaissNearestNeighbors("IVF16,Flat").setup(data)


# -- float32 indices: metric, precision, range -----------------------------------------------


def numpy_top_k(data: torch.Tensor, query: torch.Tensor, k: int):
    """Independent reference: numpy float64 brute force, (score descending, index ascending)."""
    d = np.asarray(data.detach().cpu().numpy(), dtype=np.float64)
    q = np.asarray(query.detach().cpu().numpy(), dtype=np.float64)
    scores = q @ d.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return torch.from_numpy(order), torch.from_numpy(np.take_along_axis(scores, order, axis=1))


L2_ONLY_FACTORIES = ["HNSW8,PQ2", "HNSW8_PQ2", "HNSW8,PQ2x4", "NSG8,PQ2"]


@pytest.mark.parametrize("factory", L2_ONLY_FACTORIES)
def test_faiss_refuses_factories_that_build_an_l2_index(factory):
    """Faiss builds these strings as L2 indices although METRIC_INNER_PRODUCT is passed
    (checked here with faiss itself); check_fits and setup refuse them, naming the string
    and inner-product factories (before: built silently, and the nearest rows by L2
    distance were reported as the largest inner products)."""
    need_faiss()
    import faiss

    assert faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT).metric_type == 1
    nn = FaissNearestNeighbors(factory)
    pattern = rf"index_factory '{factory}' builds a Faiss index that ranks by L2 .*'Flat'"
    with pytest.raises(InvalidArgumentError, match=pattern):
        nn.check_fits(400, 16)
    with pytest.raises(InvalidArgumentError, match=pattern):
        nn.setup(torch.randn(400, 16))


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "HNSW8,SQ8", "NSG8", "IVF4,PQ2x4"])
def test_faiss_inner_product_factories_are_accepted(factory):
    """The refusal is about the metric Faiss built, not the graph or the quantizer: these
    build inner-product indices (per faiss itself) and are set up as before."""
    need_faiss()
    import faiss

    built = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    assert built.metric_type == faiss.METRIC_INNER_PRODUCT
    data, query = random_data(n=300, d=16)
    nn = FaissNearestNeighbors(factory)
    nn.check_fits(300, 16)
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(query, 3)
    # whichever rows an approximate index chose, their scores are true inner products
    want = np.einsum("nkd,nd->nk", data.numpy()[indices.numpy()], query.numpy())
    torch.testing.assert_close(scores, torch.from_numpy(want), rtol=1e-12, atol=1e-12)


def test_randproj_refuses_an_l2_faiss_index_before_embedding(tmp_path):
    """TracInCPFastRandProj asks check_fits before embedding the training set, so an L2
    factory string is refused without a single forward pass (before: the training set
    was embedded and L2 neighbours were reported as proponents)."""
    need_faiss()
    from torch import nn as tnn

    from proponents import TracInCPFastRandProj

    torch.manual_seed(0)
    model = tnn.Sequential(tnn.Linear(5, 3), tnn.Tanh(), tnn.Linear(3, 4))  # D = 4 * (3 + 1)
    torch.save(model.state_dict(), tmp_path / "c0.pt")
    train = torch.utils.data.TensorDataset(torch.randn(300, 5), torch.randint(0, 4, (300,)))
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    with pytest.raises(InvalidArgumentError, match="'HNSW8,PQ2' builds a Faiss index"):
        TracInCPFastRandProj(
            model,
            "2",
            train,
            [tmp_path / "c0.pt"],
            loss_fn=tnn.CrossEntropyLoss(reduction="sum"),
            batch_size=50,
            nearest_neighbors=FaissNearestNeighbors("HNSW8,PQ2"),
        )
    assert forwards == []


EXHAUSTIVE = {
    "faiss-flat": lambda n: FaissNearestNeighbors("Flat"),
    "faiss-ivf": lambda n: FaissNearestNeighbors("IVF4,Flat", nprobe=4),
    "annoy": lambda n: AnnoyNearestNeighbors(num_trees=3, search_k=3 * n),
}


def _below_float32_cases():
    """Cases whose float64 ranking is invisible in float32."""
    g = torch.Generator().manual_seed(3)
    # float64 rows that differ by 1e-12: all equal once cast to float32
    near = torch.ones(40, 6, dtype=torch.float64)
    near[:, 0] += torch.randperm(40, generator=g).double() * 1e-12
    near_q = torch.tensor([[1.0] * 6, [2.0] * 6, [-1.0] * 6], dtype=torch.float64)
    # float32 rows (exact in float32) and a float64 query whose entries differ by 1e-10
    eye = torch.eye(30)[torch.randperm(30, generator=g)]
    eye_q = 1 + torch.arange(30, dtype=torch.float64)[None] * 1e-10
    eye_q = torch.cat([eye_q, eye_q.flip(1), -eye_q])
    return {"float64 data": (near, near_q), "float64 query": (eye, eye_q)}


@pytest.mark.parametrize("case", ["float64 data", "float64 query"])
@pytest.mark.parametrize("name", sorted(EXHAUSTIVE))
@pytest.mark.parametrize("k", [1, 3, 10])
def test_exhaustive_search_is_exact_below_float32_precision(name, case, k):
    """A flat Faiss index, an IVF-flat one probing every list and Annoy with
    search_k >= N * num_trees compare every row, but in float32: rows whose scores
    differ only in float64 tie there. The answer is the numpy float64 brute force's
    (before: the float32 candidates were rescored in float64 without a check, and
    k=1 on the near-duplicates gave row 1 instead of the best one)."""
    (need_annoy if name == "annoy" else need_faiss)()
    data, query = _below_float32_cases()[case]
    nn = EXHAUSTIVE[name](data.shape[0])
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(query, k)
    want_idx, want_scores = numpy_top_k(data, query, k)
    assert indices.tolist() == want_idx.tolist()
    torch.testing.assert_close(scores, want_scores, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", sorted(EXHAUSTIVE))
def test_float64_check_redoes_only_rows_in_doubt(monkeypatch, name):
    """What the float64 check costs: on well-separated float64 data the float32
    candidates are certified and no row is searched again; on float32 data and queries
    the check does not run at all."""
    (need_annoy if name == "annoy" else need_faiss)()
    data, query = random_data(n=200, d=8, n_query=20)
    redone: list[int] = []
    real = exact_module.exact_top_k

    def counting(data_, query_, k, *args, **kwargs):
        if data_.shape[0] == data.shape[0]:  # a search of every row, not of left-out ones
            redone.append(int(query_.shape[0]))
        return real(data_, query_, k, *args, **kwargs)

    monkeypatch.setattr(exact_module, "exact_top_k", counting)
    nn = EXHAUSTIVE[name](200)
    nn.setup(data)
    for sign in (1, -1):
        indices, _ = nn.get_nearest_neighbors(sign * query, 5)
        assert indices.tolist() == numpy_top_k(data, sign * query, 5)[0].tolist()
    assert redone == []

    def no_check(*args, **kwargs):
        raise AssertionError("float32 scores need no float64 check")

    monkeypatch.setattr(type(nn), "_float32_error", no_check)
    nn.setup(data.float())
    indices, _ = nn.get_nearest_neighbors(query.float(), 5)
    assert indices.tolist() == numpy_top_k(data.float(), query.float(), 5)[0].tolist()


@pytest.mark.parametrize("name", sorted(FINITE_ONLY))
def test_rows_beyond_float32_range_are_searched_exactly(name):
    """Float64 rows with entries beyond float32's range (1e300, -1e300, 1e39) would be
    infinite in the float32 index: they are left out of it, like non-finite rows, and
    ranked by exact search, as the numpy float64 brute force ranks them (before: they
    passed the finite-row filter, so an IVF index failed to train on inf, with a message
    about too few vectors)."""
    (need_annoy if name == "annoy" else need_faiss)()
    data, query = random_data(n=200, d=8, n_query=6, seed=2)
    data[7, 0] = 1e300
    data[30, 3] = -1e300
    data[99, 5] = 1e39
    nn = FINITE_ONLY[name]()
    nn.setup(data)
    assert nn._nonfinite is not None and nn._nonfinite.tolist() == [7, 30, 99]
    for q in (query, -query):
        for k in (1, 4, 200):
            indices, scores = nn.get_nearest_neighbors(q, k)
            want_idx, want_scores = numpy_top_k(data, q, k)
            assert indices.tolist() == want_idx.tolist()
            torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FINITE_ONLY))
def test_float64_query_beyond_float32_range_is_answered_exactly(name):
    """A float64 query entry beyond float32's range is infinite in the float32 search,
    whose candidates then mean nothing; such a query row is searched exactly. A zero
    column under the huge entry keeps every score finite in float64 (before: the float32
    candidates were used as they came, and Annoy's answer was wrong)."""
    (need_annoy if name == "annoy" else need_faiss)()
    data, query = random_data(n=200, d=8, n_query=4, seed=6)
    data[:, 2] = 0.0
    query[1, 2] = 1e300
    nn = FINITE_ONLY[name]()
    nn.setup(data)
    indices, scores = nn.get_nearest_neighbors(query, 5)
    want_idx, want_scores = numpy_top_k(data, query, 5)
    assert indices.tolist() == want_idx.tolist()
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FINITE_ONLY))
def test_float32_overflow_is_ranked_as_exact_search_ranks_it(name):
    """A finite float32 row whose products with the query overflow float32 (3e38 * 10):
    its float32 score is inf or NaN depending on how it is summed. Such query rows are
    answered by exact search, so every backend gives ExactNearestNeighbors' answer, and
    the other rows are ranked as the numpy float64 brute force ranks them (before: Exact
    ranked the row first with +inf, Faiss first with NaN, and exhaustive Annoy dropped
    it)."""
    (need_annoy if name == "annoy" else need_faiss)()
    g = torch.Generator().manual_seed(0)
    data = torch.randn(200, 4, generator=g)
    data[5] = torch.tensor([3e38, -3e38, 0.0, 0.0])
    query = torch.tensor([[10.0, 10.0, 0.5, 0.5], [0.0, 0.0, 1.0, -1.0]])
    exact = ExactNearestNeighbors()
    exact.setup(data)
    nn = FINITE_ONLY[name]()
    nn.setup(data)
    others = torch.cat([torch.arange(5), torch.arange(6, 200)])
    for q in (query, -query):
        indices, scores = nn.get_nearest_neighbors(q, 4)
        ref_idx, ref_scores = exact.get_nearest_neighbors(q, 4)
        assert torch.equal(indices, ref_idx)
        torch.testing.assert_close(scores, ref_scores, equal_nan=True)
        want = others[numpy_top_k(data[others], q, 4)[0]]
        for row in range(q.shape[0]):
            kept = [i for i in indices[row].tolist() if i != 5]
            assert kept == want[row, : len(kept)].tolist()


def test_refused_nprobe_assignment_changes_nothing():
    """nprobe on a built flat index is refused and the setting stays as it was, so
    config(), a later setup() and from_config(config()) keep working (before: the refused
    value was stored, config() reported it and every later setup() raised)."""
    need_faiss()
    data, query = random_data(n=50, d=4)
    nn = FaissNearestNeighbors("Flat")
    nn.setup(data)
    with pytest.raises(InvalidArgumentError, match="nprobe=4 applies to IVF indices only"):
        nn.nprobe = 4
    assert nn.nprobe is None and nn.config()["nprobe"] is None
    nn.setup(data)
    again = NearestNeighbors.from_config(nn.config())
    again.setup(data)
    for backend in (nn, again):
        indices, _ = backend.get_nearest_neighbors(query, 3)
        assert indices.tolist() == numpy_top_k(data, query, 3)[0].tolist()


def test_nprobe_none_restores_faiss_default_on_the_built_index(tmp_path):
    """nprobe=None means Faiss's default (1) on the built index too: after an assignment
    of None, and on an index loaded from a file saved with another nprobe (before: the
    old value stayed in the index, so a loaded index used the saved one)."""
    need_faiss()
    import faiss

    data, query = random_data(n=200, d=8)
    nn = FaissNearestNeighbors("IVF8,Flat", nprobe=8)
    nn.setup(data)
    indices, _ = nn.get_nearest_neighbors(query, 5)  # every list probed: exact
    assert indices.tolist() == numpy_top_k(data, query, 5)[0].tolist()
    nn.save(tmp_path)
    nn.nprobe = None
    assert faiss.extract_index_ivf(nn._index).nprobe == 1
    fresh = FaissNearestNeighbors("IVF8,Flat")
    assert fresh.load(tmp_path, data) is True
    assert faiss.extract_index_ivf(fresh._index).nprobe == 1


@pytest.mark.parametrize("factory", ["IDMap,Flat", "IDMap2,Flat", "IDMap,IVF4,Flat"])
def test_faiss_id_map_factories_are_searched_with_row_positions(tmp_path, factory):
    need_faiss()
    data, query = _with_nonfinite_rows()
    data = data.double()  # float64: the exhaustive search also takes the float64 check
    ref = ExactNearestNeighbors()
    ref.setup(data)
    want = ref.get_nearest_neighbors(query.double(), 7)
    nprobe = 4 if "IVF" in factory else None  # every list probed: an exhaustive search
    nn = FaissNearestNeighbors(index_factory=factory, nprobe=nprobe)
    nn.check_fits(*data.shape)
    nn.setup(data)
    got = nn.get_nearest_neighbors(query.double(), 7)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], equal_nan=True)
    assert nn.save(tmp_path) is True
    fresh = FaissNearestNeighbors(index_factory=factory, nprobe=nprobe)
    assert fresh.load(tmp_path, data) is True
    assert torch.equal(fresh.get_nearest_neighbors(query.double(), 7)[0], want[0])


@pytest.mark.parametrize("name", ["annoy", "faiss-flat"])
def test_save_leaves_a_description_file_of_the_users_alone(tmp_path, name):
    """A neighbors.json that a save did not write (here the user's own notes) was unlinked
    and replaced; the save now refuses, naming it, and leaves the file as it was. One of
    ours is replaced as before."""
    data, query = random_data()
    backend = BACKENDS[name](len(data))
    backend.setup(data)
    mine = tmp_path / "neighbors.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(StoreError, match="neighbors.json.*not a description this library wrote"):
        backend.save(tmp_path)
    assert mine.read_text() == '{"mine": 1}'
    mine.unlink()
    assert backend.save(tmp_path) and backend.save(tmp_path)  # ours: replaced again
    for damaged in (b"", mine.read_bytes()[:40]):  # ours, emptied or cut short by a crash
        mine.write_bytes(damaged)
        assert backend.save(tmp_path)
    again = BACKENDS[name](len(data))
    assert again.load(tmp_path, data)
    want_idx, _ = reference_top_k(data, query, 3)
    assert torch.equal(again.get_nearest_neighbors(query, 3)[0], want_idx)
