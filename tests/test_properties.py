"""Invariants of every public class, for drawn batch sizes, dtypes, k, layers and orders.

Each property draws the settings a user may vary (batch size 1, sizes that do not
divide the number of training examples, sizes above it; float32 or float64 models;
k from 1 to N; a subset of layers; the checkpoints in any order) and checks what must
not change with them:

* scores equal the float64 per-example loop reference (so they depend neither on the
  batch size nor on the checkpoint order);
* self-influence equals the diagonal of the score matrix of the training set;
* a Dataset and a DataLoader with the same batches give the same results;
* the k proponents/opponents are the first k entries of the sorted full scores;
* the global RNG is left as it was found.

Models and data are tiny (11 training examples, prime, so every batch size from 2 to 10
leaves a short last batch) and each property runs a dozen examples.
"""

from __future__ import annotations

import copy
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import Case, assert_close, make_case, reference_scores, reference_self
from proponents import (
    SimilarityInfluence,
    TracInCP,
    TracInCPFast,
    TracInCPFastRandProj,
    cosine_similarity,
    euclidean_distance,
)

N_TRAIN, N_TEST = 11, 3
NAMES = ("mlp", "two_input")
LAYERS = {"mlp": ("fc1", "fc2"), "two_input": ("a", "b", "out")}
FINAL = {"mlp": "fc2", "two_input": "out"}
DTYPES = (torch.float32, torch.float64)
RTOL = {torch.float32: 2e-4, torch.float64: 1e-9}
PROPERTY = settings(max_examples=12, deadline=None)


class Variant:
    """A case cast to one dtype: model, datasets and test batch, plus cached references."""

    def __init__(self, case: Case, dtype: torch.dtype) -> None:
        self.case = case
        self.dtype = dtype
        self.model = copy.deepcopy(case.model).to(dtype)

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        self.train_inputs = tuple(cast(t) for t in case.train_inputs)
        self.test_inputs = tuple(cast(t) for t in case.test_inputs)
        self.train_labels = case.train_labels
        self.test_labels = case.test_labels
        self.dataset = TensorDataset(*self.train_inputs, self.train_labels)
        self._refs: dict = {}

    def reference(self, layers: tuple[str, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 loop reference: ``(scores (n_test, n_train), self-influence (n_train,))``."""
        if layers not in self._refs:
            chosen = None if layers is None else list(layers)
            self._refs[layers] = (
                reference_scores(self.case, chosen),
                reference_self(self.case, chosen),
            )
        return self._refs[layers]

    def checkpoints(self, order: list[int]) -> list[str]:
        return [str(self.case.checkpoints[i]) for i in order]


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[tuple[str, torch.dtype], Variant]:
    root = tmp_path_factory.mktemp("property-cases")
    out = {}
    for name in NAMES:
        case = make_case(name, root / name, n_train=N_TRAIN, n_test=N_TEST)
        for dtype in DTYPES:
            out[name, dtype] = Variant(case, dtype)
    return out


def assert_kmost_is_sorted_scores(top, scores: torch.Tensor, k: int, proponents: bool) -> None:
    """The k-most result is exactly the first k columns of a stable sort of ``scores``."""
    key = scores.nan_to_num(nan=-torch.inf if proponents else torch.inf)
    order = torch.sort(key, dim=1, descending=proponents, stable=True).indices[:, :k]
    assert top.indices.shape == top.influence_scores.shape == (scores.shape[0], k)
    assert torch.equal(top.indices, order)
    assert torch.equal(top.influence_scores, scores.gather(1, order))


def assert_ranking_matches(indices, values, full, k: int, descending: bool, rtol: float) -> None:
    """``indices``/``values`` rank ``full`` correctly up to ties within rounding.

    The values are the k best of each row in order, and each index points at an entry
    of ``full`` holding the value reported for it.
    """
    full = full.detach().double().cpu()
    values = values.detach().double().cpu()
    indices = indices.detach().cpu()
    assert indices.shape == values.shape == (full.shape[0], k)
    assert indices.dtype == torch.int64
    for row in indices:
        assert len(set(row.tolist())) == k, row
    best = torch.sort(full, dim=1, descending=descending).values[:, :k]
    assert_close(values, best, rtol)
    assert_close(full.gather(1, indices), values, rtol)


def layer_subsets(name: str):
    return st.one_of(
        st.none(),
        st.lists(st.sampled_from(LAYERS[name]), min_size=1, unique=True).map(tuple),
    )


# ------------------------------------------------------------------------- TracInCP


@PROPERTY
@given(
    name=st.sampled_from(NAMES),
    dtype=st.sampled_from(DTYPES),
    batch_size=st.integers(1, N_TRAIN + 2),
    reduction=st.sampled_from(["none", "sum", "mean"]),
    order=st.permutations(range(3)),
    data=st.data(),
)
def test_tracincp_invariants(variants, name, dtype, batch_size, reduction, order, data):
    v = variants[name, dtype]
    layers = data.draw(layer_subsets(name), label="layers")
    k = data.draw(st.integers(1, N_TRAIN), label="k")
    proponents = data.draw(st.booleans(), label="proponents")
    rng = torch.get_rng_state()

    def build(train):
        return TracInCP(
            v.model,
            train,
            v.checkpoints(order),
            layers=None if layers is None else list(layers),
            loss_fn=v.case.loss_fn(reduction),
            batch_size=batch_size,
            sample_wise_grads_per_batch=reduction != "none",
        )

    tracin = build(v.dataset)
    want, want_self = v.reference(layers)
    scores = tracin.influence(v.test_inputs, v.test_labels)
    assert scores.dtype == dtype
    assert_close(scores, want, RTOL[dtype])
    # the same call again gives the same bits
    assert torch.equal(tracin.influence(v.test_inputs, v.test_labels), scores)

    top = tracin.influence(v.test_inputs, v.test_labels, k=k, proponents=proponents)
    assert_kmost_is_sorted_scores(top, scores, k, proponents)

    train_scores = tracin.influence(v.train_inputs, v.train_labels)
    self_scores = tracin.self_influence()
    assert_close(self_scores, train_scores.diagonal(), RTOL[dtype])
    assert_close(self_scores, want_self, RTOL[dtype])

    loader = build(DataLoader(v.dataset, batch_size=batch_size))
    assert_close(loader.influence(v.test_inputs, v.test_labels), scores, RTOL[dtype] / 10)
    assert_close(loader.influence(), self_scores, RTOL[dtype] / 10)
    test_loader = DataLoader(TensorDataset(*v.test_inputs, v.test_labels), batch_size=2)
    assert_close(tracin.influence(test_loader), scores, RTOL[dtype] / 10)
    assert torch.equal(torch.get_rng_state(), rng)


# ----------------------------------------------------------------------- TracInCPFast


@PROPERTY
@given(
    name=st.sampled_from(NAMES),
    dtype=st.sampled_from(DTYPES),
    batch_size=st.integers(1, N_TRAIN + 2),
    reduction=st.sampled_from(["sum", "mean"]),
    order=st.permutations(range(3)),
    k=st.integers(1, N_TRAIN),
    proponents=st.booleans(),
)
def test_tracincp_fast_invariants(
    variants, name, dtype, batch_size, reduction, order, k, proponents
):
    v = variants[name, dtype]
    rng = torch.get_rng_state()

    def build(train):
        return TracInCPFast(
            v.model,
            FINAL[name],
            train,
            v.checkpoints(order),
            loss_fn=v.case.loss_fn(reduction),
            batch_size=batch_size,
        )

    fast = build(v.dataset)
    want, want_self = v.reference((FINAL[name],))
    scores = fast.influence(v.test_inputs, v.test_labels)
    assert scores.dtype == dtype
    assert_close(scores, want, RTOL[dtype])
    top = fast.influence(v.test_inputs, v.test_labels, k=k, proponents=proponents)
    assert_kmost_is_sorted_scores(top, scores, k, proponents)

    self_scores = fast.self_influence()
    diagonal = fast.influence(v.train_inputs, v.train_labels).diagonal()
    assert_close(self_scores, diagonal, RTOL[dtype])
    assert_close(self_scores, want_self, RTOL[dtype])

    loader = build(DataLoader(v.dataset, batch_size=batch_size))
    assert_close(loader.influence(v.test_inputs, v.test_labels), scores, RTOL[dtype] / 10)
    assert_close(loader.self_influence(), self_scores, RTOL[dtype] / 10)
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------- TracInCPFastRandProj


@PROPERTY
@given(
    name=st.sampled_from(NAMES),
    dtype=st.sampled_from(DTYPES),
    batch_size=st.integers(1, N_TRAIN + 2),
    order=st.permutations(range(3)),
    projection_dim=st.sampled_from([None, 3, 7]),
    seed=st.integers(0, 2**16),
    k=st.integers(1, N_TRAIN),
    proponents=st.booleans(),
)
def test_randproj_invariants(
    variants, name, dtype, batch_size, order, projection_dim, seed, k, proponents
):
    v = variants[name, dtype]
    rng = torch.get_rng_state()

    def build(train, bs=batch_size, ckpt_order=order):
        return TracInCPFastRandProj(
            v.model,
            FINAL[name],
            train,
            v.checkpoints(ckpt_order),
            loss_fn=v.case.loss_fn("sum"),
            batch_size=bs,
            projection_dim=projection_dim,
            seed=seed,
        )

    rp = build(v.dataset)
    assert rp.embeddings.shape[0] == N_TRAIN and rp.embeddings.dtype == dtype
    full = rp.influence(v.test_inputs, v.test_labels, k=None)
    if projection_dim is None:  # exact: the reference, whatever the order or batch size
        assert_close(full, v.reference((FINAL[name],))[0], RTOL[dtype])
    else:  # projected: the same projections whatever the batch size
        one_batch = build(v.dataset, bs=N_TRAIN)
        assert_close(rp.embeddings, one_batch.embeddings, RTOL[dtype])
        assert_close(full, one_batch.influence(v.test_inputs, v.test_labels, k=None), RTOL[dtype])
    top = rp.influence(v.test_inputs, v.test_labels, k=k, proponents=proponents)
    assert_ranking_matches(top.indices, top.influence_scores, full, k, proponents, RTOL[dtype])

    # a DataLoader with the same batches and the same seed: the same embeddings, bit for bit
    loader = build(DataLoader(v.dataset, batch_size=batch_size))
    assert torch.equal(loader.embeddings, rp.embeddings)
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------- SimilarityInfluence


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _layer_outputs(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    store = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: store.__setitem__("out", o.detach())
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    return store["out"].flatten(1).double()


def _reference_similarity(test: torch.Tensor, src: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "euclidean":
        return torch.cdist(test, src)
    norms = test.norm(dim=1, keepdim=True) * src.norm(dim=1)
    return (test @ src.T) / norms


@PROPERTY
@given(
    dtype=st.sampled_from(DTYPES),
    batch_size=st.integers(1, N_TRAIN + 2),
    layers=st.lists(st.sampled_from(["fc1", "act", "fc2"]), min_size=1, unique=True),
    metric=st.sampled_from(["cosine", "euclidean"]),
    direction=st.sampled_from(["max", "min"]),
    top_k=st.integers(1, N_TRAIN),
)
def test_similarity_invariants(dtype, batch_size, layers, metric, direction, top_k):
    torch.manual_seed(0)
    model = Tower().to(dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N_TRAIN + N_TEST, 5, generator=g, dtype=dtype)
    src = TensorDataset(x[:N_TRAIN], torch.zeros(N_TRAIN))
    test = x[N_TRAIN:]
    metric_fn = cosine_similarity if metric == "cosine" else euclidean_distance
    rng = torch.get_rng_state()
    rtol = 1e-4 if dtype == torch.float32 else 1e-9

    def build(source, folder):
        return SimilarityInfluence(
            model,
            layers,
            source,
            folder,
            similarity_metric=metric_fn,
            similarity_direction=direction,
            batch_size=batch_size,
        )

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        sim = build(src, a)
        got = sim.influence(test, top_k=top_k)
        everything = sim.influence(test, top_k=N_TRAIN)  # served from the store just built
        via_loader = build(DataLoader(src, batch_size=batch_size), b).influence(test, top_k=top_k)
    assert list(got) == layers
    for layer in layers:
        full = _reference_similarity(
            _layer_outputs(model, layer, test), _layer_outputs(model, layer, x[:N_TRAIN]), metric
        )
        indices, values = got[layer]
        assert values.dtype == dtype
        assert_ranking_matches(indices, values, full, top_k, direction == "max", rtol)
        # top_k is a prefix of the full ranking
        all_indices, all_values = everything[layer]
        assert_ranking_matches(all_indices, all_values, full, N_TRAIN, direction == "max", rtol)
        assert_close(all_values[:, :top_k], values, rtol)
        # a DataLoader with the same batches ranks the same
        assert torch.equal(via_loader[layer][0], indices)
        assert_close(via_loader[layer][1], values, rtol)
    assert torch.equal(torch.get_rng_state(), rng)
