"""SimilarityInfluence on edge cases, each against a float64 brute force or a closed form."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from proponents.errors import InvalidArgumentError
from proponents.influence.similarity import (
    SimilarityInfluence,
    cosine_similarity,
    euclidean_distance,
)


class Words(Dataset):
    """Items are plain strings (no label): each is a model input as it is."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int) -> str:
        return self.words[i]


class CharBag(nn.Module):
    """A text model: takes a list of strings, embeds each as a bag of its characters."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(64, 4, mode="sum")
        self.out = nn.Linear(4, 2)

    def forward(self, texts: list[str]) -> torch.Tensor:
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            raise TypeError(f"expected a list of strings, got {texts!r}")
        ids = [torch.tensor([ord(c) % 64 for c in t]) for t in texts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        return self.out(self.emb(torch.cat(ids), offsets))


class Identity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _char_bags(model: CharBag, texts: list[str]) -> torch.Tensor:
    """The EmbeddingBag output of each text alone, in float64 (by hand: sums of rows)."""
    weight = model.emb.weight.detach().double()
    return torch.stack([weight[[ord(c) % 64 for c in t]].sum(0) for t in texts])


def _cosine_ranking(test: torch.Tensor, src: torch.Tensor, k: int):
    t, s = test.double(), src.double()
    scores = (t @ s.T) / (t.norm(dim=1)[:, None] * s.norm(dim=1)[None, :])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order, scores.gather(1, order)


WORDS = ["apple", "banana", "cherry", "date", "elder", "fig", "grape"]
QUERIES = ["grapes", "dates"]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_string_items_are_one_input_each(tmp_path, batch_size):
    """A batch of string items (collated into a list) is one model input, not
    ``(*inputs, label)``; test inputs given as a list of strings are one input too."""
    torch.manual_seed(0)
    model = CharBag()
    sim = SimilarityInfluence(model, "emb", Words(WORDS), tmp_path, batch_size=batch_size)
    ref_idx, ref_val = _cosine_ranking(_char_bags(model, QUERIES), _char_bags(model, WORDS), 4)
    for _ in range(2):  # computed, then read from the store
        idx, val = sim.influence(QUERIES, top_k=4)["emb"]
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(val.double(), ref_val, rtol=1e-5, atol=1e-6)


def test_layer_removed_after_construction_is_named(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(6, 3), torch.zeros(6))
    sim = SimilarityInfluence(model, "0.0", data, tmp_path)
    sim.influence(torch.randn(2, 3))
    model[0] = nn.Tanh()  # "0.0" is gone
    with pytest.raises(InvalidArgumentError, match=r"'0\.0'.*Construct a new"):
        sim.influence(torch.randn(2, 3))


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_cosine_of_finite_activations_outside_float32_square_range(tmp_path, scale):
    """Activations whose squares overflow (or underflow) float32 are finite vectors with
    well-defined cosines: no NaN, no zero-vector score, no warning about non-finite ones."""
    g = torch.Generator().manual_seed(3)
    src = (torch.randn(9, 4, generator=g, dtype=torch.float64) * scale).float()
    test = (torch.randn(3, 4, generator=g, dtype=torch.float64) * scale).float()
    ref_idx, ref_val = _cosine_ranking(test, src, 9)
    sim = SimilarityInfluence(Identity(), "layer", TensorDataset(src, torch.zeros(9)), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            idx, val = sim.influence(test, top_k=9)["layer"]
            assert torch.equal(idx, ref_idx)
            torch.testing.assert_close(val.double(), ref_val, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        cosine_similarity(test, src).double(),
        (test.double() @ src.double().T)
        / (test.double().norm(dim=1)[:, None] * src.double().norm(dim=1)[None, :]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_euclidean_nearest_where_the_shortcut_overflows(tmp_path):
    """|t|² + |s|² − 2 t·s overflows float32 for activations near 1e19 though every
    distance is finite: the exact neighbour must still come first."""
    src = torch.tensor([[1.30e19], [1.36e19], [0.0]])
    test = torch.tensor([[1.36e19]])
    sim = SimilarityInfluence(
        Identity(),
        "layer",
        TensorDataset(src, torch.zeros(3)),
        tmp_path,
        similarity_metric=euclidean_distance,
        similarity_direction="min",
    )
    exact = (test.double() - src.double().T).abs()  # (1, 3) distances in one dimension
    order = torch.sort(exact, dim=1, stable=True).indices[:, :1]
    for _ in range(2):
        idx, val = sim.influence(test, top_k=1)["layer"]
        assert torch.equal(idx, order)
        torch.testing.assert_close(val.double(), exact.gather(1, order), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_euclidean_distance_function_outside_float32_square_range(scale):
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(3, 5, generator=g, dtype=torch.float64) * scale).float()
    b = (torch.randn(4, 5, generator=g, dtype=torch.float64) * scale).float()
    ref = (a.double()[:, None, :] - b.double()[None, :, :]).norm(dim=-1)
    torch.testing.assert_close(euclidean_distance(a, b).double(), ref, rtol=1e-5, atol=0.0)


def test_a_bare_tensor_is_a_source_set_of_its_rows(tmp_path):
    """Captum reads influence_src_dataset=X (a tensor) through a DataLoader, one example
    per row; so does SimilarityInfluence (before: refused), with the brute-force results,
    and an edit of any row rebuilds the store. TracIn training sets need labels: a
    tensor there is refused, pointing to TensorDataset."""
    from proponents import TracInCP
    from proponents.errors import ArgumentTypeError
    from proponents.store import StoreRebuildWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, test = torch.randn(20, 4), torch.randn(3, 4)
    with torch.no_grad():
        src, acts = model[0](x), model[0](test)
    got = SimilarityInfluence(model, ["0", "2"], x, tmp_path, batch_size=6).influence(test, top_k=4)
    order, scores = _cosine_ranking(acts, src, 4)
    assert torch.equal(got["0"][0], order)
    torch.testing.assert_close(got["0"][1].double(), scores, rtol=1e-5, atol=1e-6)
    x[7] += 1.0  # not one of the five sampled rows
    with pytest.warns(StoreRebuildWarning, match="dataset_probe"):
        again = SimilarityInfluence(model, "0", x, tmp_path, batch_size=6).influence(test, top_k=4)
    with torch.no_grad():
        assert torch.equal(again["0"][0], _cosine_ranking(acts, model[0](x), 4)[0])
    with pytest.raises(ArgumentTypeError, match=r"tensor of shape \(20, 4\).*TensorDataset"):
        TracInCP(model, x, [], loss_fn=nn.CrossEntropyLoss(reduction="sum"))


class _IdentityAndWide(nn.Module):
    """``same`` passes its input on; ``wide`` is a widening ``nn.Linear`` whose output is
    the input followed by zeros (searched on its input side, see ``_pullback``). Both
    give activations equal to integer inputs, so the reference below is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Identity()
        self.wide = nn.Linear(3, 6)
        with torch.no_grad():
            self.wide.weight.copy_(torch.cat([torch.eye(3), torch.zeros(3, 3)]))
            self.wide.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(self.same(x))


#: v = (3, 9, 3) and multiples of it (indices 1, 3, 4, 5, 7), among other directions.
#: Every multiple has a cosine of exactly 1 with v, but float32 rounds it to 1 for 7v and
#: 13v and one or two steps above 1 for v, 3v and 5v, whatever the summation order.
_PARALLEL = torch.tensor(
    [[9, -3, 1], [21, 63, 21], [-2, 5, 1], [9, 27, 9], [3, 9, 3], [39, 117, 39],
     [0, 1, -4], [15, 45, 15]], dtype=torch.float32,
)  # fmt: skip


def _exact_cosine_ranking(test: torch.Tensor, src: torch.Tensor, largest: bool, k: int):
    """Cosines of small integer vectors, exact in float64: ``t·s / sqrt(|t|² |s|²)``
    has an exact numerator and radicand, so a multiple of ``t`` scores exactly 1 (-1
    for a negative one); ranked with ties by index."""
    t, s = test.double(), src.double()
    scores = (t @ s.T) / torch.sqrt((t * t).sum(1)[:, None] * (s * s).sum(1)[None, :])
    order = torch.sort(scores, dim=1, descending=largest, stable=True).indices[:, :k]
    return order, scores.gather(1, order)


@pytest.mark.parametrize("direction", ["max", "min"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_cosines_the_clamp_makes_equal_come_in_index_order(tmp_path, direction, batch_size):
    """Sources parallel to a test row all have cosine 1 with it, though float32 rounds
    some past 1 before they are clamped. They tie, so they come in index order for every
    top_k, the first call (scored while building) and later ones (from the store, on the
    input side for the widening layer) alike. Before, a block picked its best by the
    unclamped values: top_k=1 gave index 3 (1.00000012) instead of 1 (exactly 1)."""
    test = torch.stack([_PARALLEL[4], -_PARALLEL[4], 2 * _PARALLEL[4]])
    data = TensorDataset(_PARALLEL, torch.zeros(len(_PARALLEL)))
    model = _IdentityAndWide()
    largest = direction == "max"
    for k in range(1, len(_PARALLEL) + 1):
        ref_idx, ref_val = _exact_cosine_ranking(test, _PARALLEL, largest, k)
        sim = SimilarityInfluence(
            model, ["same", "wide"], data, tmp_path / str(k),
            similarity_direction=direction, batch_size=batch_size,
        )  # fmt: skip
        for _ in range(2):  # built, then from the store
            result = sim.influence(test, top_k=k)
            for layer in ("same", "wide"):
                idx, val = result[layer]
                assert torch.equal(idx, ref_idx), (layer, k, idx, ref_idx)
                torch.testing.assert_close(val.double(), ref_val, rtol=0.0, atol=1e-6)
                assert float(val.abs().max()) <= 1.0


def test_numpy_test_inputs_are_refused_with_the_fix(tmp_path):
    """Before, a NumPy test batch reached the model and failed inside torch (linear():
    argument 'input' must be Tensor); now that failure names the NumPy arrays and the fix.
    A model that takes arrays itself is served as before."""
    from proponents.errors import ArgumentTypeError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x, test = torch.randn(12, 4), torch.randn(3, 4)
    sim = SimilarityInfluence(model, "0", x, tmp_path, batch_size=6)
    for given in (test.numpy(), (test.numpy(),)):
        with pytest.raises(ArgumentTypeError, match=r"NumPy arrays.*torch\.from_numpy"):
            sim.influence(given, top_k=2)
    with torch.no_grad():
        src, acts = model[0](x), model[0](test)
    order, _ = _cosine_ranking(acts, src, 2)
    assert torch.equal(sim.influence(test, top_k=2)["0"][0], order)  # as tensors: served

    class TakesArrays(nn.Module):  # a model that converts its input itself is served
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(torch.as_tensor(x))

    wrapped = SimilarityInfluence(TakesArrays(), "inner.0", x, tmp_path / "w", batch_size=6)
    assert torch.equal(wrapped.influence(test.numpy(), top_k=2)["inner.0"][0], order)
