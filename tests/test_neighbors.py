"""Tests of the nearest-neighbour backends (proponents.neighbors)."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proponents.errors import ArgumentTypeError, InvalidArgumentError, ProponentsError
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
            self.answers = [[0, 1], [4, 4, 5, 6], [7, 8, 9, 10]]

        def get_nns_by_vector(self, vector, n, search_k=-1):
            return self.answers.pop(0)

    nn._index = Stub()
    indices, scores = nn.get_nearest_neighbors(query, 4)
    ref_idx, ref_scores = reference_top_k(data, query, 4)
    assert torch.equal(indices[:2], ref_idx[:2])  # short row, repeated row: redone exactly
    assert sorted(indices[2].tolist()) == [7, 8, 9, 10]  # a full row is only rescored
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
        (torch.zeros(2, 3, 4), InvalidArgumentError, r"data must be a 2-D.*\(2, 3, 4\)"),
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
    index_file.write_bytes(b"not an index")
    check(tmp_path, data, "could not be read")
    index_file.unlink()
    check(tmp_path, data, "is missing")
    (tmp_path / "neighbors.json").write_text("{broken")
    check(tmp_path, data, "neighbors.json could not be read")
