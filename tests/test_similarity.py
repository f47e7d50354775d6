"""SimilarityInfluence against a float64 brute force, and its activation store."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from conftest import Augmented, ForwardWatch, assert_unchanged, model_snapshot
from proponents.errors import ArgumentTypeError, InvalidArgumentError, StoreError
from proponents.influence.similarity import (
    SimilarityInfluence,
    cosine_similarity,
    euclidean_distance,
)
from proponents.store import StoreRebuildWarning

N_SRC, N_TEST = 37, 6


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.lin2 = nn.Linear(8, 5)

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


class ConvNet(nn.Module):
    """A convolution followed by an in-place ReLU (which rewrites the conv output)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class TwoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(3, 5)
        self.mix = nn.Identity()

    def forward(self, a, b, scale=1.0):
        return self.mix(torch.tanh(self.a(a) + self.b(b)) * scale)


def _seeded(cls):
    torch.manual_seed(0)
    return cls()


def _data(n=N_SRC, n_test=N_TEST, shape=(6,), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, *shape, generator=g)
    y = torch.randint(0, 3, (n + n_test,), generator=g)
    return TensorDataset(x[:n], y[:n]), x[n:]


def _acts(model, layer, *args):
    """Layer output for a whole batch, by a plain hook (float64 copy)."""
    out = {}
    handle = model.get_submodule(layer).register_forward_hook(
        lambda m, i, o: out.__setitem__("a", o.detach().clone())
    )
    with torch.no_grad():
        model(*args)
    handle.remove()
    return out["a"].reshape(out["a"].shape[0], -1).double()


def _brute(test, src, metric, direction, k):
    """Float64 reference: scores by an explicit loop, ranked with ties by index."""
    scores = torch.empty(test.shape[0], src.shape[0], dtype=torch.float64)
    for i in range(test.shape[0]):
        for j in range(src.shape[0]):
            t, s = test[i], src[j]
            if metric == "cosine":
                denom = t.norm() * s.norm()
                scores[i, j] = 0.0 if denom == 0 else t.dot(s) / denom
            else:
                scores[i, j] = (t - s).norm()
    idx, val = [], []
    for i in range(test.shape[0]):
        order = sorted(
            range(src.shape[0]),
            key=lambda j: (-scores[i, j] if direction == "max" else scores[i, j], j),
        )[:k]
        idx.append(order)
        val.append([float(scores[i, j]) for j in order])
    return torch.tensor(idx), torch.tensor(val, dtype=torch.float64)


def _check(result, expected, rtol=1e-5):
    idx, val = result
    e_idx, e_val = expected
    assert idx.dtype == torch.int64 and idx.shape == e_idx.shape
    assert torch.equal(idx, e_idx), (idx, e_idx)
    torch.testing.assert_close(val.double(), e_val, rtol=rtol, atol=1e-6)


METRICS = {"cosine": cosine_similarity, "euclidean": euclidean_distance}


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("direction", ["max", "min"])
def test_matches_brute_force(tmp_path, metric, direction):
    model = _seeded(Net)
    train, test = _data()
    layers = ["lin1", "act", "lin2"]
    sim = SimilarityInfluence(
        model,
        layers,
        train,
        tmp_path,
        similarity_metric=METRICS[metric],
        similarity_direction=direction,
        batch_size=5,  # does not divide 37
    )
    src = {layer: _acts(model, layer, train.tensors[0]) for layer in layers}
    tst = {layer: _acts(model, layer, test) for layer in layers}
    for top_k in (1, 7, N_SRC):  # 7 > batch size; N is the largest valid k
        result = sim.influence(test, top_k=top_k)
        assert list(result) == layers
        for layer in layers:
            _check(result[layer], _brute(tst[layer], src[layer], metric, direction, top_k))


def test_blocks_smaller_than_top_k(tmp_path, monkeypatch):
    """Scoring stored activations in blocks of 4 rows still gives the global top-k."""
    import proponents.influence.similarity as module

    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=3)
    monkeypatch.setattr(module, "BLOCK_BYTES", 4 * 5 * 4)
    first = sim.influence(test, top_k=9)["lin2"]
    again = sim.influence(test, top_k=9)["lin2"]  # from the store, 4 rows per block
    expected = _brute(
        _acts(model, "lin2", test), _acts(model, "lin2", train.tensors[0]), "cosine", "max", 9
    )
    _check(first, expected)
    _check(again, expected)


def test_single_layer_name_and_result_layout(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    result = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=8).influence(
        test, top_k=3
    )
    assert list(result) == ["lin2"]
    idx, val = result["lin2"]
    assert idx.shape == val.shape == (N_TEST, 3)
    assert bool((val[:, :-1] >= val[:, 1:]).all())


def test_multi_input_model_and_additional_forward_args(tmp_path):
    model = _seeded(TwoInput)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)
    labels = torch.zeros(30)
    train = TensorDataset(a[:24], b[:24], labels[:24])
    sim = SimilarityInfluence(model, ["a", "mix"], train, tmp_path, batch_size=7)
    result = sim.influence((a[24:], b[24:]), top_k=4, additional_forward_args=(2.0,))
    for layer in ("a", "mix"):
        src = _acts(model, layer, a[:24], b[:24])
        tst = _acts(model, layer, a[24:], b[24:], 2.0)
        _check(result[layer], _brute(tst, src, "cosine", "max", 4))
    # a non-tuple extra argument is passed as one argument
    single = sim.influence((a[24:], b[24:]), top_k=4, additional_forward_args=2.0)
    assert torch.equal(single["mix"][0], result["mix"][0])


class _NestedItems(Dataset):
    """Captum's form for a multi-input model: items ((a, b), label)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __len__(self):
        return len(self.a)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), 0


def test_items_holding_their_inputs_as_one_tuple_feed_a_multi_input_model(tmp_path):
    """Items ((a, b), label), the form Captum asks of a dataset for a model of several
    inputs, feed model(a, b) (before: model([a, b]), a TypeError); a model whose forward
    takes one argument gets the pair as that argument."""
    model = _seeded(TwoInput)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)
    sim = SimilarityInfluence(
        model, ["a", "mix"], _NestedItems(a[:24], b[:24]), tmp_path, batch_size=7
    )
    result = sim.influence((a[24:], b[24:]), top_k=4)
    for layer in ("a", "mix"):
        src = _acts(model, layer, a[:24], b[:24])
        _check(result[layer], _brute(_acts(model, layer, a[24:], b[24:]), src, "cosine", "max", 4))

    class OneArgument(nn.Module):  # takes its inputs as one tuple: fed as it is
        def __init__(self, two):
            super().__init__()
            self.two = two

        def forward(self, pair):
            return self.two(*pair)

    wrapped = OneArgument(model)
    sim = SimilarityInfluence(wrapped, "two.mix", _NestedItems(a[:24], b[:24]), tmp_path / "w")
    got = sim.influence(((a[24:], b[24:]),), top_k=4)
    src = _acts(model, "mix", a[:24], b[:24])
    _check(got["two.mix"], _brute(_acts(model, "mix", a[24:], b[24:]), src, "cosine", "max", 4))


class PlainItems(Dataset):
    """Items are bare tensors (no label), fed to the model as they are."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_plain_item_dataset_and_dataloader_sources(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    x = train.tensors[0]
    expected = _brute(_acts(model, "lin1", test), _acts(model, "lin1", x), "euclidean", "min", 5)
    for i, source in enumerate(
        [PlainItems(x), DataLoader(PlainItems(x), batch_size=6), DataLoader(train, batch_size=4)]
    ):
        sim = SimilarityInfluence(
            model,
            "lin1",
            source,
            tmp_path / str(i),
            similarity_metric=euclidean_distance,
            similarity_direction="min",
        )
        _check(sim.influence(test, top_k=5)["lin1"], expected)


def test_custom_metric_gets_layer_shaped_activations(tmp_path):
    model = _seeded(ConvNet)
    train, test = _data(20, 3, shape=(2, 6, 6))
    seen = []

    def neg_sq_distance(t, s):
        seen.append((tuple(t.shape[1:]), tuple(s.shape[1:])))
        return -((t.flatten(1)[:, None] - s.flatten(1)[None]) ** 2).sum(-1)

    sim = SimilarityInfluence(
        model, "conv", train, tmp_path, similarity_metric=neg_sq_distance, batch_size=6
    )
    result = sim.influence(test, top_k=4)["conv"]
    again = sim.influence(test, top_k=4)["conv"]
    assert set(seen) == {((3, 6, 6), (3, 6, 6))}
    src, tst = _acts(model, "conv", train.tensors[0]), _acts(model, "conv", test)
    e_idx, e_val = _brute(tst, src, "euclidean", "min", 4)
    for got in (result, again):
        assert torch.equal(got[0], e_idx)
        torch.testing.assert_close(got[1].double(), -(e_val**2), rtol=1e-5, atol=1e-5)


def test_inplace_relu_after_the_layer_does_not_leak_into_its_activations(tmp_path):
    model = _seeded(ConvNet)
    train, test = _data(20, 3, shape=(2, 6, 6))
    with torch.no_grad():  # make the conv output mostly negative, so ReLU would matter
        model.conv.bias.sub_(1.0)
    src = _acts(model, "conv", train.tensors[0])
    assert (src < 0).any()
    for cl in (None, False, True):
        sim = SimilarityInfluence(
            model,
            "conv",
            train,
            tmp_path / str(cl),
            batch_size=6,
            similarity_metric=euclidean_distance,
            channels_last=cl,
        )
        expected = _brute(_acts(model, "conv", test), src, "euclidean", "max", 5)
        _check(sim.influence(test, top_k=5)["conv"], expected)


def test_ties_come_in_index_order(tmp_path):
    model = _seeded(Net)
    x = torch.randn(5, 6).repeat(4, 1)  # every example appears 4 times
    train = TensorDataset(x, torch.zeros(20))
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=3)
    idx, _ = sim.influence(x[:2], top_k=4)["lin2"]
    assert idx[0].tolist() == [0, 5, 10, 15]
    assert idx[1].tolist() == [1, 6, 11, 16]


@pytest.mark.parametrize("largest", [True, False])
def test_block_top_keeps_the_lowest_positions_among_ties_at_the_cut_off(largest):
    """Against a stable sort of each row: small integer scores tie everywhere."""
    from proponents.influence._similarity_metrics import _block_top

    g = torch.Generator().manual_seed(0)
    key = torch.randint(0, 4, (50, 40), generator=g).float()
    key[0] = 1.0  # a row that is one big tie
    key[1] = torch.arange(40.0)  # and one with none
    key[2, :3] = float("inf") if largest else float("-inf")
    for k in (1, 2, 5, 39):
        want = torch.sort(key, dim=1, descending=largest, stable=True).indices[:, :k]
        got = _block_top(key, k, largest)
        assert torch.equal(torch.sort(got, dim=1).values, torch.sort(want, dim=1).values)
    assert torch.equal(_block_top(key, 40, largest), torch.arange(40).expand(50, -1))


@pytest.mark.parametrize("channels_last", [False, True, None])
def test_a_model_that_edits_its_input_leaves_the_source_dataset_unchanged(tmp_path, channels_last):
    """TensorDataset batches are sliced, not collated; the model must still get copies."""

    class Normalising(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 6 * 6, 4)

        def forward(self, x):
            x.sub_(0.5).mul_(2.0)  # normalises its input in place
            return self.fc(self.conv(x).flatten(1))

    model = _seeded(Normalising)
    x = torch.randn(10, 2, 6, 6)
    kept = x.clone()
    sim = SimilarityInfluence(
        model,
        "fc",
        TensorDataset(x, torch.zeros(10)),
        tmp_path / "a",
        batch_size=4,
        channels_last=channels_last,
    )
    test = x[:3].clone()
    got = sim.influence(test, top_k=4)["fc"]
    assert torch.equal(x, kept)
    assert torch.equal(test, kept[:3])  # the test inputs are not edited either
    # the reference: brute force over activations of copies of the inputs
    src, test = _acts(model, "fc", x.clone()), _acts(model, "fc", x[:3].clone())
    _check(got, _brute(test, src, "cosine", "max", 4))


def test_zero_vectors_have_cosine_zero(tmp_path):
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.out = nn.Identity()

        def forward(self, x, on):
            return self.out(self.lin(x) * on[:, None])

    torch.manual_seed(0)
    model = Gate()
    x = torch.randn(10, 3)
    on = torch.tensor([1.0, 0.0] * 5)
    train = TensorDataset(x, on, torch.zeros(10))
    sim = SimilarityInfluence(model, "out", train, tmp_path, batch_size=4)
    idx, val = sim.influence((x[:2], torch.tensor([1.0, 0.0])), top_k=10)["out"]
    zero_rows = {1, 3, 5, 7, 9}
    assert torch.all(val[1] == 0)  # a zero test vector: every pair scores 0
    got = dict(zip(idx[0].tolist(), val[0].tolist()))
    assert all(got[j] == 0.0 for j in zero_rows)
    replaced = SimilarityInfluence(model, "out", train, tmp_path, batch_size=4, replace_nan=-2.0)
    _, val = replaced.influence((x[:2], torch.tensor([1.0, 0.0])), top_k=10)["out"]
    assert torch.all(val[1] == -2.0) and torch.all(val[0][-5:] == -2.0)


def test_public_metrics():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    b[2] = 0
    cos = cosine_similarity(a, b)
    ref = torch.nn.functional.cosine_similarity(
        a.flatten(1)[:, None].double(), b.flatten(1)[None].double(), dim=-1
    )
    ref[:, 2] = 0
    torch.testing.assert_close(cos.double(), ref, rtol=1e-6, atol=1e-7)
    dist = euclidean_distance(a, torch.cat([b, a[:1]]))
    assert dist.shape == (4, 6) and dist[0, 5] == 0
    ref = (a.flatten(1)[:, None].double() - b.flatten(1)[None].double()).norm(dim=-1)
    torch.testing.assert_close(dist[:, :5].double(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="features"):
        cosine_similarity(a, torch.randn(3, 7))


def test_non_finite_source_activations_rank_last(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    x = train.tensors[0].clone()
    x[3] = float("nan")
    sim = SimilarityInfluence(
        model, "lin2", TensorDataset(x, train.tensors[1]), tmp_path, batch_size=8
    )
    with pytest.warns(RuntimeWarning, match="non-finite"):
        idx, val = sim.influence(test, top_k=N_SRC)["lin2"]
    assert bool((idx[:, -1] == 3).all()) and bool(val[:, -1].isnan().all())
    assert bool(val[:, :-1].isfinite().all())


def test_model_is_unchanged_and_results_on_model_device(tmp_path):
    model = _seeded(ConvNet)
    model.train()
    model.fc.weight.requires_grad_(False)
    snap = model_snapshot(model)
    train, test = _data(20, 3, shape=(2, 6, 6))
    sim = SimilarityInfluence(model, ["conv", "fc"], train, tmp_path, batch_size=6)
    for _ in range(2):
        result = sim.influence(test, top_k=2, show_progress=True)
        assert_unchanged(model, snap)
    assert model.training and not model.fc.weight.requires_grad
    assert all(t.device == model.fc.weight.device for pair in result.values() for t in pair)


# ----------------------------------------------------------------------- the store


def _src_dir(root):
    return Path(root) / "src"


def test_store_is_reused_without_running_the_model(tmp_path, watch_forwards):
    model = _seeded(Net)
    train, test = _data()
    calls = watch_forwards(model)
    sim = SimilarityInfluence(model, ["lin1", "lin2"], train, tmp_path, batch_size=10)
    first = sim.influence(test, top_k=3)
    # the first call of a process on a model runs it once more on one test example, to
    # learn what its forward updates (observe_forward_state); then test + 4 source batches
    assert calls.calls == 1 + 1 + 4
    manifests = {
        f: (_src_dir(tmp_path) / f).read_bytes()
        for f in os.listdir(_src_dir(tmp_path))
        if f.endswith(".json")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = SimilarityInfluence(
            model, ["lin1", "lin2"], train, tmp_path, batch_size=10
        ).influence(test, top_k=3)
    assert calls.calls == 1 + 1 + 4 + 1  # only the test batch
    for f, content in manifests.items():
        assert (_src_dir(tmp_path) / f).read_bytes() == content
    for layer in first:
        assert torch.equal(first[layer][0], again[layer][0])
        torch.testing.assert_close(first[layer][1], again[layer][1])


def test_stale_store_is_rebuilt_after_weights_change(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    sim.influence(test, top_k=3)
    with torch.no_grad():
        model.lin1.weight.mul_(-1.5)
    with pytest.warns(StoreRebuildWarning, match="model"):
        result = sim.influence(test, top_k=3)["lin2"]
    expected = _brute(
        _acts(model, "lin2", test), _acts(model, "lin2", train.tensors[0]), "cosine", "max", 3
    )
    _check(result, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(sim.influence(test, top_k=3)["lin2"], expected)


def test_a_one_bit_edit_between_calls_is_seen_and_an_unchanged_model_is_not_rehashed(
    tmp_path, monkeypatch
):
    """The same object, or another over the same model, across calls: the full SHA-256
    of the weights is taken only when the on-device digest changes, and an edit no
    version counter records (one bit, through ``.data``) still rebuilds the store."""
    import proponents.fingerprints as fp

    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    calls = {"n": 0}
    full = fp.model_fingerprint
    monkeypatch.setattr(
        fp, "model_fingerprint", lambda m: calls.__setitem__("n", calls["n"] + 1) or full(m)
    )
    sim.influence(test, top_k=3)
    sim.influence(test, top_k=3)
    assert calls["n"] == 1
    again = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    again.influence(test, top_k=3)  # another object over the same model starts warm
    assert calls["n"] == 1
    raw = model.lin1.weight.data.view(-1).view(torch.int32)
    raw[3] ^= 1  # the lowest mantissa bit of one weight
    with pytest.warns(StoreRebuildWarning, match="model"):
        result = sim.influence(test, top_k=3)["lin2"]
    assert calls["n"] == 2
    expected = _brute(
        _acts(model, "lin2", test), _acts(model, "lin2", train.tensors[0]), "cosine", "max", 3
    )
    _check(result, expected)


@pytest.mark.parametrize("edit", ["in place", "through numpy, new object"])
def test_a_change_to_an_unsampled_example_of_a_tensor_dataset_rebuilds_the_store(tmp_path, edit):
    """The probe samples five examples, but covers every value of a TensorDataset: an
    example changed at a position it does not sample is not served from the stale
    store, whether torch edited it (seen between calls of one object: the version
    counter moved) or a NumPy view did (which a new object sees, reading the values)."""
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    sim.influence(test, top_k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged: served from the store, no rebuild
        sim.influence(test, top_k=3)
    x = train.tensors[0]
    position = 7  # not one of 0, 9, 18, 27, 36
    if edit == "in place":
        x[position] = test[0]
    else:
        x.numpy()[position] = test[0].numpy()
        sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    with pytest.warns(StoreRebuildWarning, match="dataset_probe"):
        result = sim.influence(test, top_k=3)["lin2"]
    expected = _brute(_acts(model, "lin2", test), _acts(model, "lin2", x), "cosine", "max", 3)
    _check(result, expected)
    assert int(result[0][0, 0]) == position  # the edited example is test 0 itself now


class _Scaled(nn.Module):
    """A layer whose output is multiplied by a tensor kept as a plain attribute (not a
    parameter or buffer), which ``forward`` reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.scale = torch.ones(5)

    def forward(self, x):
        return torch.tanh(self.lin(x) * self.scale)


@pytest.mark.parametrize("change", ["forward hook", "pre-hook", "global hook", "attribute"])
def test_a_hook_or_a_plain_tensor_attribute_changing_activations_rebuilds_the_store(
    tmp_path, change
):
    """Activations changed without any weight changing: a forward hook or pre-hook added
    (on a submodule, or globally), or a tensor attribute ``forward`` reads edited. The
    store is rebuilt, and the neighbours are those of the activations the model now
    gives (a brute force over them)."""
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(), nn.Linear(5, 3))
    train, test = _data()
    sim = SimilarityInfluence(model, "0", train, tmp_path, batch_size=10,
                              similarity_metric=euclidean_distance)  # fmt: skip
    sim.influence(test, top_k=4)
    weights = torch.linspace(0.2, 3.0, 5)
    handle = None
    if change == "forward hook":
        handle = model[0].register_forward_hook(lambda m, i, o: o * weights)
    elif change == "pre-hook":
        handle = model[0].register_forward_pre_hook(lambda m, args: (args[0].flip(1),))
    elif change == "global hook":
        from torch.nn.modules.module import register_module_forward_hook

        handle = register_module_forward_hook(
            lambda m, i, o: o * weights if isinstance(m, _Scaled) else None
        )
    else:
        model[0].scale[:] = weights  # in place: the same attribute, other values
    try:
        with pytest.warns(StoreRebuildWarning, match="model"):
            result = sim.influence(test, top_k=4)["0"]
        expected = _brute(_acts(model, "0", test), _acts(model, "0", train.tensors[0]),
                          "euclidean", "max", 4)  # fmt: skip
        _check(result, expected)
    finally:
        if handle is not None:
            handle.remove()


def test_store_of_another_dataset_is_not_served(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    other, _ = _data(seed=7)  # same length, different examples
    SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10).influence(test, top_k=3)
    sim = SimilarityInfluence(model, "lin2", other, tmp_path, batch_size=10)
    with pytest.warns(StoreRebuildWarning, match="dataset_probe"):
        result = sim.influence(test, top_k=3)["lin2"]
    _check(
        result,
        _brute(
            _acts(model, "lin2", test), _acts(model, "lin2", other.tensors[0]), "cosine", "max", 3
        ),
    )
    shorter = TensorDataset(*(t[:30] for t in train.tensors))
    with pytest.warns(StoreRebuildWarning, match="dataset_length"):
        SimilarityInfluence(model, "lin2", shorter, tmp_path, batch_size=10).influence(
            test, top_k=3
        )


@pytest.mark.parametrize("damage", ["truncate", "manifest"])
def test_damaged_store_is_rebuilt(tmp_path, damage):
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    expected = sim.influence(test, top_k=4)["lin2"]
    folder = _src_dir(tmp_path)
    if damage == "truncate":
        (data,) = [f for f in os.listdir(folder) if f.endswith("activations.npy")]
        with open(folder / data, "r+b") as fh:
            fh.truncate(os.path.getsize(folder / data) // 2)
    else:
        (folder / "lin2.json").write_bytes(b'{"format": "proponents.array-store", "trunc')
    with pytest.warns(StoreRebuildWarning, match="damaged|truncated"):
        result = sim.influence(test, top_k=4)["lin2"]
    _check(result, (expected[0], expected[1].double()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.influence(test, top_k=4)


@pytest.mark.parametrize("change", ["none", "truncate", "checksum", "replaced"])
def test_an_entry_kept_open_is_checked_at_every_call(tmp_path, monkeypatch, change):
    """After a call that read the store, the entry stays open; a later call reuses it only
    while the manifest bytes and the array files on disk are the ones it opened."""
    from proponents.store import ArrayStore

    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    expected = sim.influence(test, top_k=4)["lin2"]  # builds
    sim.influence(test, top_k=4)  # reads the store, keeps the entry open
    opened = []
    open_arrays = ArrayStore._open_arrays
    monkeypatch.setattr(
        ArrayStore, "_open_arrays", lambda self, *a: opened.append(1) or open_arrays(self, *a)
    )
    folder = _src_dir(tmp_path)
    if change == "truncate":
        (data,) = [f for f in os.listdir(folder) if f.endswith("activations.npy")]
        with open(folder / data, "r+b") as fh:
            fh.truncate(os.path.getsize(folder / data) - 4)
    elif change == "checksum":  # same size, same file, one character different
        text = (folder / "lin2.json").read_text()
        i = text.index('"checksum": "') + len('"checksum": "')
        flipped = "0" if text[i] != "0" else "1"
        with open(folder / "lin2.json", "r+") as fh:
            fh.seek(i)
            fh.write(flipped)
    elif change == "replaced":  # rebuilt by another object: new files, same content
        SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10).influence(
            test, top_k=4, load_src_from_disk=False
        )
    if change in ("truncate", "checksum"):
        with pytest.warns(StoreRebuildWarning, match="damaged|truncated"):
            result = sim.influence(test, top_k=4)["lin2"]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = sim.influence(test, top_k=4)["lin2"]
    if change == "none":
        assert not opened  # served by the entry kept open
    elif change == "replaced":
        assert opened  # the new files were opened, not the unlinked ones reused
    _check(result, (expected[0], expected[1].double()))


def test_the_call_that_builds_keeps_its_entries_open_and_a_new_object_verifies_them(
    tmp_path, monkeypatch
):
    """The entry a call has just written is kept open without reading its data back, so
    the next call opens nothing; another object opening it reads every array once for
    its CRC-32. Both give the brute force's neighbours."""
    from proponents import store as store_module

    model = _seeded(Net)
    train, test = _data()
    reads = []
    crc = store_module._data_crc32
    monkeypatch.setattr(store_module, "_data_crc32", lambda *a: reads.append(1) or crc(*a))
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    first = sim.influence(test, top_k=4)["lin2"]  # builds
    assert not reads  # the bytes just written are not read back
    opened = []
    open_arrays = store_module.ArrayStore._open_arrays
    monkeypatch.setattr(
        store_module.ArrayStore,
        "_open_arrays",
        lambda self, *a: opened.append(1) or open_arrays(self, *a),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sim.influence(test, top_k=4)["lin2"]
    assert not opened and not reads  # served by the entry kept open since the build
    other = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    fresh = other.influence(test, top_k=4)["lin2"]
    assert opened and len(reads) >= 2  # activations and norms, each checked once
    src = _acts(model, "lin2", train.tensors[0])
    want = _brute(_acts(model, "lin2", test), src, "cosine", "max", 4)
    for got in (first, again, fresh):
        _check(got, want)


def test_load_src_from_disk_false_rebuilds(tmp_path, watch_forwards):
    model = _seeded(Net)
    train, test = _data()
    calls = watch_forwards(model)
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=10)
    sim.influence(test, top_k=2)
    token = (_src_dir(tmp_path) / "lin2.json").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.influence(test, top_k=2, load_src_from_disk=False)
    assert calls.calls == 1 + 2 * (1 + 4)  # with the first call's state probe
    assert (_src_dir(tmp_path) / "lin2.json").read_text() != token
    files = [f for f in os.listdir(_src_dir(tmp_path)) if f.startswith("lin2~")]
    assert len(files) == 2  # the old arrays were removed


def test_inputs_id_saves_and_loads_test_activations(tmp_path, watch_forwards):
    model = _seeded(Net)
    train, test = _data()
    calls = watch_forwards(model)
    sim = SimilarityInfluence(model, ["lin1", "lin2"], train, tmp_path, batch_size=40)
    first = sim.influence(test, top_k=3, inputs_id="val")
    assert calls.calls == 1 + 2  # the first call's state probe, the test and source batches
    assert (tmp_path / "inputs" / "val").is_dir()
    # loaded without running the model, with or without the inputs themselves
    for inputs in (test, None):
        got = sim.influence(inputs, top_k=3, inputs_id="val", load_input_from_disk=True)
        assert calls.calls == 1 + 2
        assert all(torch.equal(got[k][0], first[k][0]) for k in first)
    # other inputs under the same id: recomputed with a warning, not silently reused
    other = test.flip(0)
    with pytest.warns(StoreRebuildWarning, match="inputs"):
        got = sim.influence(other, top_k=3, inputs_id="val", load_input_from_disk=True)
    assert torch.equal(got["lin2"][0], first["lin2"][0].flip(0))
    # default load_input_from_disk=False recomputes and replaces the saved ones
    sim.influence(test, top_k=3, inputs_id="val")
    got = sim.influence(None, top_k=3, inputs_id="val", load_input_from_disk=True)
    assert torch.equal(got["lin2"][0], first["lin2"][0])
    # saved activations of an older model are never used
    with torch.no_grad():
        model.lin2.bias.add_(1.0)
    with pytest.raises(InvalidArgumentError, match="model"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim.influence(None, top_k=3, inputs_id="val", load_input_from_disk=True)
    with pytest.raises(InvalidArgumentError, match="inputs_id"):
        sim.influence(test, top_k=3, load_input_from_disk=True)
    with pytest.raises(InvalidArgumentError, match="inputs is None"):
        sim.influence(None, top_k=3)


class SlowItems(Dataset):
    """A dataset slow enough that two builders overlap."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(0.001)
        return self.data[i]


def _build_in_child(root, lock, barrier, queue):
    import proponents.store as store

    if not lock:
        store._fcntl = None
    torch.set_num_threads(1)
    model = _seeded(Net)
    calls = ForwardWatch(model)  # the process ends with the test
    train, test = _data(n=400)
    barrier.wait()
    sim = SimilarityInfluence(model, ["lin1", "lin2"], SlowItems(train), root, batch_size=16)
    result = sim.influence(test, top_k=5)
    queue.put(({k: (v[0].tolist(), v[1].tolist()) for k, v in result.items()}, calls.calls))


@pytest.mark.parametrize("lock", [True, False])
def test_two_processes_building_the_same_store(tmp_path, lock):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_child, args=(str(tmp_path), lock, barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    outs = [g[0] for g in got]
    forwards = sum(g[1] for g in got)
    if lock:  # one built (1 test + 25 source batches), the other waited and reused; each
        # ran the model once more first, to learn what its forward updates
        assert forwards == 26 + 1 + 2
    for layer in outs[0]:
        assert outs[0][layer][0] == outs[1][layer][0]
        np.testing.assert_allclose(outs[0][layer][1], outs[1][layer][1], rtol=1e-6)
    model = _seeded(Net)
    train, test = _data(n=400)
    train = SlowItems(train)
    files = sorted(os.listdir(_src_dir(tmp_path)))
    assert not [f for f in files if f.startswith(".tmp")], files
    n_arrays = len([f for f in files if f.endswith(".npy")])
    # 2 layers x 2 arrays; without the lock the slower builder's arrays may remain as
    # unreferenced files until the next build, which readers never see
    assert n_arrays == 4 if lock else n_arrays >= 4, files
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the store left behind is valid
        result = SimilarityInfluence(
            model, ["lin1", "lin2"], train, tmp_path, batch_size=16
        ).influence(test, top_k=5)
    for layer, (idx, val) in result.items():
        assert idx.tolist() == outs[0][layer][0]
        np.testing.assert_allclose(val.numpy(), outs[0][layer][1], rtol=1e-6)


def test_model_id_and_inputs_id_stay_inside_activation_dir(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    root = tmp_path / "acts"
    sim = SimilarityInfluence(model, "lin2", train, root, model_id="../../escape", batch_size=10)
    sim.influence(test, top_k=2, inputs_id="../../../inputs")
    assert sorted(os.listdir(tmp_path)) == ["acts"]
    (sub,) = os.listdir(root)
    assert "/" not in sub and not sub.startswith(".")
    plain = SimilarityInfluence(model, "lin2", train, root, model_id="resnet-v2", batch_size=10)
    plain.influence(test, top_k=2)
    assert (root / "resnet-v2" / "src" / "lin2.json").exists()


# -------------------------------------------------------------------------- errors


def test_bad_arguments(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    with pytest.raises(InvalidArgumentError, match=r"'lin3'.*lin1, act, lin2"):
        SimilarityInfluence(model, ["lin1", "lin3"], train, tmp_path)
    with pytest.raises(InvalidArgumentError, match="'max'.*'min'.*'maximum'"):
        SimilarityInfluence(model, "lin1", train, tmp_path, similarity_direction="maximum")
    with pytest.raises(ArgumentTypeError, match="layers"):
        SimilarityInfluence(model, 3, train, tmp_path)
    with pytest.raises(InvalidArgumentError, match="empty"):
        SimilarityInfluence(model, [], train, tmp_path)
    with pytest.raises(ArgumentTypeError, match="similarity_metric"):
        SimilarityInfluence(model, "lin1", train, tmp_path, similarity_metric="cosine")
    with pytest.raises(ArgumentTypeError, match="unexpected keyword.*colour"):
        SimilarityInfluence(model, "lin1", train, tmp_path, colour="red")
    with pytest.raises(InvalidArgumentError, match="replace_nan"):
        SimilarityInfluence(
            model, "lin1", train, tmp_path, similarity_metric=euclidean_distance, replace_nan=0.0
        )
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        SimilarityInfluence(model, "lin1", train, tmp_path, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="shuffl"):
        SimilarityInfluence(model, "lin1", DataLoader(train, shuffle=True), tmp_path)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(StoreError, match="not_a_dir"):
        SimilarityInfluence(model, "lin1", train, blocker / "acts")

    sim = SimilarityInfluence(model, "lin1", train, tmp_path, batch_size=10)
    for k in (0, -1, N_SRC + 1):
        with pytest.raises(InvalidArgumentError, match=rf"top_k={k}.*between 1 and .*{N_SRC}"):
            sim.influence(test, top_k=k)
    for k in (2.0, True, None):
        with pytest.raises(ArgumentTypeError, match="top_k"):
            sim.influence(test, top_k=k)
    with pytest.raises(ArgumentTypeError, match="unexpected keyword.*topk"):
        sim.influence(test, topk=3)


def test_metric_with_wrong_shape_is_reported(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(
        model,
        "lin1",
        train,
        tmp_path,
        batch_size=10,
        similarity_metric=lambda t, s: (t.flatten(1) @ s.flatten(1).T).T,
    )
    with pytest.raises(InvalidArgumentError, match=r"shape \(37, 6\).*\(6, 37\)"):
        sim.influence(test, top_k=2)
    sim = SimilarityInfluence(
        model, "lin1", train, tmp_path / "b", batch_size=10, similarity_metric=lambda t, s: 1.0
    )
    with pytest.raises(InvalidArgumentError, match="float"):
        sim.influence(test, top_k=2)


def test_layers_that_cannot_be_compared(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.flat = nn.Flatten()
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.flat(out).sum(1)

    torch.manual_seed(0)
    model = Odd()
    train = TensorDataset(torch.randn(8, 5, 3), torch.zeros(8))
    with pytest.raises(ArgumentTypeError, match="'rnn' returns a tuple"):
        SimilarityInfluence(model, "rnn", train, tmp_path, batch_size=4).influence(
            torch.randn(2, 5, 3)
        )
    with pytest.raises(InvalidArgumentError, match="'unused'.*did not run"):
        SimilarityInfluence(model, "unused", train, tmp_path, batch_size=4).influence(
            torch.randn(2, 5, 3)
        )
    sim = SimilarityInfluence(model, "flat", train, tmp_path, batch_size=4)
    with pytest.raises(InvalidArgumentError, match="28 features.*20"):
        sim.influence(torch.randn(2, 7, 3))  # longer sequences: more features than the source


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_model_dtypes(tmp_path, dtype):
    model = _seeded(Net).to(dtype)
    train, test = _data()
    train = TensorDataset(train.tensors[0].to(dtype), train.tensors[1])
    test = test.to(dtype)
    sim = SimilarityInfluence(
        model,
        "lin2",
        train,
        tmp_path,
        batch_size=8,
        similarity_metric=euclidean_distance,
        similarity_direction="min",
    )
    for _ in range(2):  # built, then read back from the store
        idx, val = sim.influence(test, top_k=4)["lin2"]
        assert val.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        expected = _brute(
            _acts(model, "lin2", test),
            _acts(model, "lin2", train.tensors[0]),
            "euclidean",
            "min",
            4,
        )
        _check((idx, val), expected, rtol=1e-5 if dtype == torch.float64 else 1e-2)


@pytest.mark.parametrize("where", ["call", "data"])
def test_inference_mode_calls_and_inference_tensors(tmp_path, where):
    """A call inside ``torch.inference_mode()`` (whose activations keep no version counter)
    and a source dataset made under it: before, both raised "Inference tensors do not
    track version counter"."""
    model = _seeded(Net)
    train, test = _data()
    if where == "data":
        with torch.inference_mode():
            train = TensorDataset(train.tensors[0] * 1, train.tensors[1] * 1)
    expected = _brute(
        _acts(model, "lin2", test), _acts(model, "lin2", train.tensors[0]), "cosine", "max", 3
    )
    sim = SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=8)
    for _ in range(2):  # built, then read back from the store
        if where == "call":
            with torch.inference_mode():
                got = sim.influence(test, top_k=3)["lin2"]
        else:
            got = sim.influence(test, top_k=3)["lin2"]
        _check(got, expected, rtol=1e-5)


class Exploding(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, i):
        if i == 20:
            raise KeyError("broken item 20")
        return torch.randn(6), 0


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    model = _seeded(Net)
    snap = model_snapshot(model)
    sim = SimilarityInfluence(model, ["lin1", "lin2"], Exploding(), tmp_path, batch_size=4)
    with pytest.raises(KeyError, match="broken item 20"):
        sim.influence(torch.randn(3, 6), top_k=2)
    assert [f for f in os.listdir(_src_dir(tmp_path)) if f != ".lock"] == []
    assert_unchanged(model, snap)


def test_inputs_must_be_one_batch(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin1", train, tmp_path, batch_size=8)
    with pytest.raises(ArgumentTypeError, match="DataLoader"):
        sim.influence(DataLoader(TensorDataset(test)), top_k=2)


def test_layout_is_tried_once_per_model_and_weights(tmp_path, monkeypatch):
    from proponents.influence import similarity as module

    tried = []
    original = module._close

    def counting(a, b):
        tried.append(1)
        return original(a, b)

    monkeypatch.setattr(module, "_close", counting)
    model = _seeded(ConvNet)
    train, test = _data(20, 3, shape=(2, 6, 6))
    expected = _brute(
        _acts(model, "conv", test), _acts(model, "conv", train.tensors[0]), "cosine", "max", 4
    )
    for folder in ("a", "b"):  # two objects over one model: the layouts are tried once
        sim = SimilarityInfluence(model, "conv", train, tmp_path / folder, batch_size=6)
        _check(sim.influence(test, top_k=4)["conv"], expected)
    assert len(tried) == 1
    with torch.no_grad():
        model.conv.weight.mul_(1.5)  # other weights: tried again
    sim = SimilarityInfluence(model, "conv", train, tmp_path / "c", batch_size=6)
    sim.influence(test, top_k=4)
    assert len(tried) == 2


# ------------------------------------------------------------------ rounding margin


def _near_duplicates(n=200, n_test=4, dim=96, scale=300.0, seed=5):
    """Points a hair apart around one far-off centre: ``‖t‖² + ‖s‖² − 2 t·s`` in float32
    has a rounding error (about 1e-7 ‖c‖² ≈ 1) far above the squared distances (≤ 1e-2)."""
    g = torch.Generator().manual_seed(seed)
    centre = scale * torch.randn(dim, generator=g)
    spread = 10.0 ** torch.empty(n + n_test, 1).uniform_(-3, -1, generator=g)
    x = centre + spread * torch.randn(n + n_test, dim, generator=g)
    return TensorDataset(x[:n], torch.zeros(n)), x[n:]


@pytest.mark.parametrize("small_blocks", [False, True])
@pytest.mark.parametrize("direction", ["min", "max"])
def test_euclidean_neighbours_of_near_duplicates_far_from_the_origin_are_exact(
    tmp_path, monkeypatch, direction, small_blocks
):
    """Also in blocks of 16 rows, where later blocks are pruned against the kept top-k."""
    import proponents.influence.similarity as module

    if small_blocks:
        monkeypatch.setattr(module, "BLOCK_BYTES", 16 * 96 * 4)
    model = nn.Sequential(nn.Identity())
    train, test = _near_duplicates()
    sim = SimilarityInfluence(
        model,
        "0",
        train,
        tmp_path,
        similarity_metric=euclidean_distance,
        similarity_direction=direction,
        batch_size=64,
    )
    src = train.tensors[0].double()
    expected = _brute(test.double(), src, "euclidean", direction, 5)
    for _ in range(2):  # first call (scored while stored) and a call from the store
        _check(sim.influence(test, top_k=5)["0"], expected)


def test_the_rounding_bound_covers_float32_products_and_stays_narrow():
    """The bound behind the Euclidean candidates holds for real float32 products (all-
    positive terms, where errors cannot cancel by sign) and widens ordinary data little."""
    from proponents.influence._rounding import dot_error_factor, product_roundoff
    from proponents.influence._similarity_metrics import BlockScorer, euclidean_distance

    g = torch.Generator().manual_seed(0)
    u = product_roundoff(torch.float32, torch.device("cpu"))
    assert u == 2.0**-24
    before = torch.get_float32_matmul_precision()
    try:  # reduced-precision products are allowed for: the bound must follow
        torch.set_float32_matmul_precision("high")
        assert product_roundoff(torch.float32, torch.device("cpu")) == 2.0**-11
    finally:
        torch.set_float32_matmul_precision(before)
    for n in (16, 1000, 100_000):
        a = torch.rand(8, n, generator=g) + 0.5
        b = torch.rand(n, 8, generator=g) + 0.5
        exact = a.double() @ b.double()
        error = ((a @ b).double() - exact).abs()
        assert bool((error <= dot_error_factor(n, u) * exact).all())
    test, src = torch.randn(16, 512, generator=g), torch.randn(300, 512, generator=g)
    scorer = BlockScorer(euclidean_distance, "euclidean", test, 10, False, "x", 300)
    d2 = test @ src.T
    d2.mul_(-2).add_(test.norm(dim=1)[:, None] ** 2).add_(src.norm(dim=1)[None] ** 2)
    pos = torch.topk(d2, 10, largest=False).indices
    width = scorer._candidate_width(d2, pos, slice(0, 16), float(src.norm(dim=1).max()), None)
    assert 10 <= width <= 12


def test_euclidean_blocks_that_cannot_beat_the_kept_neighbours_are_not_recomputed(
    tmp_path, monkeypatch
):
    """Sources in order of distance, 8 rows per block: after the first block no pair can
    enter the top 5, so no later pair's exact distance is computed."""
    import proponents.influence._similarity_metrics as metrics
    import proponents.influence.similarity as module

    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 6, generator=g) * torch.linspace(0.1, 10, 64)[:, None]
    train, test = TensorDataset(x, torch.zeros(64)), torch.zeros(1, 6)
    sim = SimilarityInfluence(
        nn.Sequential(nn.Identity()),
        "0",
        train,
        tmp_path,
        similarity_metric=euclidean_distance,
        similarity_direction="min",
    )
    sim.influence(test, top_k=5)  # builds the store
    monkeypatch.setattr(module, "BLOCK_BYTES", 8 * 6 * 4)
    pairs = []
    exact = metrics.BlockScorer._exact_distances

    def counted(self, chunk, s, pos):
        pairs.append(pos.numel())
        return exact(self, chunk, s, pos)

    monkeypatch.setattr(metrics.BlockScorer, "_exact_distances", counted)
    _check(
        sim.influence(test, top_k=5)["0"], _brute(test.double(), x.double(), "euclidean", "min", 5)
    )
    assert pairs == [5]


def test_a_randomly_augmented_dataset_is_not_taken_for_a_new_one(tmp_path):
    """The content probe reads its items with seeded generators: a dataset with random
    augmentations reuses its store at the next call (it was rebuilt, with a warning, at
    every call), a real change of its content is still seen, and the caller's torch,
    Python and NumPy generators are left where they were."""
    import random

    import numpy as np

    model = _seeded(Net)
    train, test = _data()
    data = Augmented(train.tensors[0].clone(), train.tensors[1], scale=0.01)
    sim = SimilarityInfluence(model, "lin2", data, tmp_path, batch_size=10)
    sim.influence(test, top_k=3)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.influence(test, top_k=3)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    data.x[-1] += 1.0  # the last item is one of those probed
    with pytest.warns(StoreRebuildWarning, match="dataset_probe"):
        sim.influence(test, top_k=3)


# ------------------------------------------------------- fixes of the tester's probes


def test_an_architecture_change_without_weight_changes_is_not_served_stale(tmp_path):
    """Replacing a submodule (ReLU by Tanh, a Linear by a subclass with another forward)
    changes no weight; stored source and saved test activations must still be rebuilt."""

    class Shifted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 3.0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    train, test = _data()
    sim = SimilarityInfluence(model, ["1", "2"], train, tmp_path, batch_size=10)
    sim.influence(test, top_k=4, inputs_id="val")
    shifted = Shifted(8, 5)
    shifted.load_state_dict(model[2].state_dict())
    for swap in (lambda: model.__setitem__(1, nn.Tanh()), lambda: model.__setitem__(2, shifted)):
        swap()
        fresh = SimilarityInfluence(model, ["1", "2"], train, tmp_path, batch_size=10)
        for kwargs in ({}, {"inputs_id": "val", "load_input_from_disk": True}):
            with pytest.warns(StoreRebuildWarning, match="model"):
                got = fresh.influence(test, top_k=4, **kwargs)
            for layer in ("1", "2"):
                src = _acts(model, layer, train.tensors[0])
                _check(got[layer], _brute(_acts(model, layer, test), src, "cosine", "max", 4))
        fresh.influence(test, top_k=4, inputs_id="val")  # saved by the current model


def test_a_dataloader_with_a_non_sequential_sampler_gets_a_content_probe(tmp_path):
    """``sampler=range(n)`` (or a list of indices) reads the dataset in a known order: two
    datasets of one length, or two orders of one dataset, must not share a store; the
    probe draws no random number."""
    import random

    model = _seeded(Net)
    train, test = _data()
    other, _ = _data(seed=7)  # same length, different examples

    def loader(data, sampler):
        return DataLoader(data, batch_size=8, sampler=sampler)

    SimilarityInfluence(model, "lin2", loader(train, range(N_SRC)), tmp_path).influence(
        test, top_k=3
    )
    reversed_order = list(range(N_SRC))[::-1]
    cases = [(other, range(N_SRC)), (other, reversed_order)]
    for data, sampler in cases:
        sim = SimilarityInfluence(model, "lin2", loader(data, sampler), tmp_path)
        states = torch.get_rng_state(), random.getstate()
        with pytest.warns(StoreRebuildWarning, match="dataset_probe"):
            idx, val = sim.influence(test, top_k=3)["lin2"]
        assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
        rows = data.tensors[0][list(sampler)]
        _check((idx, val), _brute(_acts(model, "lin2", test), _acts(model, "lin2", rows),
                                  "cosine", "max", 3))  # fmt: skip
        with warnings.catch_warnings():  # and reused as it is at the next call
            warnings.simplefilter("error")
            sim.influence(test, top_k=3)


def _shifting(offset):
    """A collate function a factory makes: the default batches, inputs shifted by ``offset``."""

    def collate(batch):
        x, y = torch.utils.data.default_collate(batch)
        return x + offset, y

    return collate


def _applying(batch, transform):
    """A collate function for ``functools.partial``: the default batches, inputs transformed."""
    x, y = torch.utils.data.default_collate(batch)
    return transform(x), y


def _negated(x):
    return -x


def _halved(x):
    return x / 2


class _Scaling:
    """A collate object: the default batches, inputs multiplied by its ``factor``."""

    def __init__(self, factor):
        self.factor = factor

    def __call__(self, batch):
        x, y = torch.utils.data.default_collate(batch)
        return x * self.factor, y


@pytest.mark.parametrize(
    "before,after,inputs",
    [
        (None, _shifting(0.5), lambda x: x + 0.5),
        (_shifting(0.5), _shifting(-1.0), lambda x: x - 1.0),  # same code, other closure
        (_Scaling(2.0), _Scaling(-0.5), lambda x: x * -0.5),  # same class, other setting
        (partial(_applying, transform=_negated), partial(_applying, transform=_halved), _halved),
        (_shifting(0.5), None, lambda x: x),
    ],
    ids=["default to custom", "closure value", "object setting", "partial", "custom to default"],
)
def test_a_changed_collate_fn_rebuilds_the_store(tmp_path, before, after, inputs):
    """The batches a DataLoader's collate_fn makes are what the model sees, but the
    dataset probe reads the items before collation: another collate function (or the
    same one with other closure values or settings) must rebuild the store, with the
    brute force's neighbours over the batches the new one makes. Before, the stored
    activations of the old batches were served without a warning."""
    model = _seeded(Net)
    train, test = _data()

    def loader(collate):
        return DataLoader(
            train, batch_size=8, **({} if collate is None else {"collate_fn": collate})
        )

    SimilarityInfluence(model, "lin2", loader(before), tmp_path).influence(test, top_k=4)
    sim = SimilarityInfluence(model, "lin2", loader(after), tmp_path)
    with pytest.warns(StoreRebuildWarning, match="collate_fn"):
        result = sim.influence(test, top_k=4)["lin2"]
    seen = _acts(model, "lin2", inputs(train.tensors[0]))
    _check(result, _brute(_acts(model, "lin2", test), seen, "cosine", "max", 4))
    with warnings.catch_warnings():  # the same collate function again: served
        warnings.simplefilter("error")
        again = SimilarityInfluence(model, "lin2", loader(after), tmp_path).influence(test, top_k=4)
    assert torch.equal(again["lin2"][0], result[0])


def test_the_default_collate_keeps_the_stored_entry_as_it_was(tmp_path):
    """Torch's default collate function, implicit or named, adds nothing to an entry's
    meta, so stores built before collate functions counted are still served."""
    import json

    model = _seeded(Net)
    train, test = _data()
    SimilarityInfluence(model, "lin2", train, tmp_path, batch_size=8).influence(test, top_k=3)
    meta = json.loads((_src_dir(tmp_path) / "lin2.json").read_text())["meta"]
    assert sorted(meta) == ["dataset_length", "dataset_probe", "kind", "layer", "model"]
    default = torch.utils.data.default_collate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for source in (DataLoader(train, batch_size=8), DataLoader(train, 5, collate_fn=default)):
            SimilarityInfluence(model, "lin2", source, tmp_path).influence(test, top_k=3)


def test_custom_metric_gets_contiguous_activations_in_channels_last(tmp_path):
    """A metric that flattens with ``.view`` (as the spec's example does) works on a
    convolution computed in channels-last layout, at the first and the repeated call."""
    model = _seeded(ConvNet)
    train, test = _data(20, 3, shape=(2, 6, 6))
    seen = []

    def dot(t, s):
        seen.append((t.is_contiguous(), s.is_contiguous()))
        return t.view(t.shape[0], -1) @ s.view(s.shape[0], -1).T

    sim = SimilarityInfluence(
        model, "conv", train, tmp_path, similarity_metric=dot, batch_size=6, channels_last=True
    )
    src, tst = _acts(model, "conv", train.tensors[0]), _acts(model, "conv", test)
    reference = tst @ src.T
    e_val, e_idx = torch.sort(reference, dim=1, descending=True, stable=True)
    for _ in range(2):
        idx, val = sim.influence(test, top_k=4)["conv"]
        assert torch.equal(idx, e_idx[:, :4])
        torch.testing.assert_close(val.double(), e_val[:, :4], rtol=1e-5, atol=1e-5)
    assert set(seen) == {(True, True)}


@pytest.mark.parametrize("direction", ["max", "min"])
def test_replace_nan_nan_ranks_the_zero_pairs_last(tmp_path, direction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    with torch.no_grad():
        model[0].bias.zero_()
    x = torch.randn(20, 4)
    x[[3, 11]] = 0  # all-zero activations
    train, test = TensorDataset(x, torch.zeros(20)), torch.randn(3, 4)
    sim = SimilarityInfluence(model, "0", train, tmp_path, batch_size=8,
                              replace_nan=float("nan"), similarity_direction=direction)  # fmt: skip
    # the reference: the 18 non-zero rows ranked by a brute force, then the two NaN pairs
    kept = [j for j in range(20) if j not in (3, 11)]
    e_idx, e_val = _brute(_acts(model, "0", test), _acts(model, "0", x[kept]), "cosine",
                          direction, 18)  # fmt: skip
    e_idx = torch.tensor(kept)[e_idx]
    for _ in range(2):  # built, then read from the store
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # asked-for NaN: no warning about the metric
            idx, val = sim.influence(test, top_k=20)["0"]
        _check((idx[:, :18], val[:, :18]), (e_idx, e_val))
        assert idx[:, 18:].tolist() == [[3, 11]] * 3 and bool(val[:, 18:].isnan().all())


class _Scale:
    """A plain config object (default repr) passed to the model."""

    def __init__(self, factor, note=None):
        self.factor = factor
        self.note = note


def test_saved_test_activations_follow_plain_objects_in_additional_forward_args(
    tmp_path, watch_forwards
):
    model = _seeded(TwoInput)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 4, generator=g), torch.randn(30, 3, generator=g)
    train = TensorDataset(a, b, torch.zeros(30))
    ta, tb = torch.randn(3, 4, generator=g), torch.randn(3, 3, generator=g)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, a, b, scale=None):
            return self.inner(a, b, 1.0 if scale is None else scale.factor)

    wrapped = Wrapped()
    sim = SimilarityInfluence(wrapped, "inner.mix", train, tmp_path, batch_size=10)
    sim.influence((ta, tb), top_k=3, additional_forward_args=_Scale(1.0), inputs_id="val")
    calls = watch_forwards(wrapped)
    sim.influence((ta, tb), top_k=3, additional_forward_args=_Scale(1.0), inputs_id="val",
                  load_input_from_disk=True)  # fmt: skip
    assert calls.calls == 0  # equal content: reused
    with pytest.warns(StoreRebuildWarning, match="inputs"):
        got = sim.influence((ta, tb), top_k=3, additional_forward_args=_Scale(-1.0),
                            inputs_id="val", load_input_from_disk=True)["inner.mix"]  # fmt: skip
    src = _acts(model, "mix", a, b)
    _check(got, _brute(_acts(model, "mix", ta, tb, -1.0), src, "cosine", "max", 3))
    # an argument known only by its address is never taken for the saved one
    calls.calls = 0
    with pytest.warns(StoreRebuildWarning, match="cannot be described"):
        sim.influence((ta, tb), top_k=3, additional_forward_args=_Scale(1.0, lambda: 1),
                      inputs_id="val", load_input_from_disk=True)  # fmt: skip
    assert calls.calls == 1


def _lexicographic_ranking(row: list[float], direction: str) -> list[int]:
    """Positions of ``row`` ranked by (is NaN, score in ``direction``, position)."""
    sign = -1.0 if direction == "max" else 1.0
    return sorted(
        range(len(row)),
        key=lambda i: (math.isnan(row[i]), 0.0 if math.isnan(row[i]) else sign * row[i], i),
    )


@pytest.mark.parametrize("direction", ["max", "min"])
@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 8])
def test_nan_scores_rank_after_the_worst_infinity(tmp_path, direction, top_k):
    """A custom metric scoring NaN, +inf and -inf: NaN comes after every score, the
    infinity worst in the direction included, equal scores in index order, whatever the
    blocks the source set is scored in and whether the activations are stored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(6, 2))  # layer "0": the inputs
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    fixed = [float("nan"), float("inf"), 1.0, float("inf"), float("-inf"), float("nan"),
             float("-inf"), 1.0]  # fmt: skip

    def metric(test, src):  # the score of a source row is decided by its first input
        return torch.tensor(fixed, dtype=torch.float32)[src[:, 0].long()].expand(len(test), -1)

    x[:, 0] = torch.arange(8.0)
    train = TensorDataset(x, torch.zeros(8))
    # the reference, checked by hand once: both NaN (0, 5) after both -inf (4, 6)
    assert _lexicographic_ranking(fixed, "max") == [1, 3, 2, 7, 4, 6, 0, 5]
    assert _lexicographic_ranking(fixed, "min") == [4, 6, 2, 7, 1, 3, 0, 5]
    expected = _lexicographic_ranking(fixed, direction)[:top_k]
    for batch_size in (1, 3, 8):
        sim = SimilarityInfluence(model, "0", train, tmp_path / str(batch_size),
                                  batch_size=batch_size, similarity_metric=metric,
                                  similarity_direction=direction)  # fmt: skip
        for _ in range(2):  # built, then read from the store
            with pytest.warns(RuntimeWarning, match="NaN"):
                idx, val = sim.influence(x[:2], top_k=top_k)["0"]
            assert idx.tolist() == [expected] * 2
            want = torch.tensor([fixed[i] for i in expected]).expand(2, -1)
            torch.testing.assert_close(val, want, equal_nan=True)


def _dot_reference(test, src, direction, k):
    """Float64 inner products by a loop, ranked with ties by index."""
    scores = [[float(t.double() @ s.double()) for s in src] for t in test]
    sign = -1.0 if direction == "max" else 1.0
    idx = [sorted(range(len(row)), key=lambda j: (sign * row[j], j))[:k] for row in scores]
    val = [[scores[i][j] for j in order] for i, order in enumerate(idx)]
    return torch.tensor(idx), torch.tensor(val, dtype=torch.float64)


def _flat_dot(test, src):
    return test.flatten(1) @ src.flatten(1).T


def test_bfloat16_model_with_a_custom_metric(tmp_path):
    """A bfloat16 layer: the source activations are stored as float32, and the test
    activations reach the metric in that dtype too (not bfloat16 against float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).to(torch.bfloat16)
    train, test = _data()
    x = train.tensors[0].bfloat16()
    seen = []

    def metric(t, s):
        seen.append((t.dtype, s.dtype))
        return _flat_dot(t, s)

    sim = SimilarityInfluence(model, "0", TensorDataset(x, train.tensors[1]), tmp_path,
                              batch_size=8, similarity_metric=metric)  # fmt: skip
    expected = _dot_reference(_acts(model, "0", test.bfloat16()), _acts(model, "0", x), "max", 5)
    for _ in range(2):  # built, then read from the store
        _check(sim.influence(test.bfloat16(), top_k=5)["0"], expected)
    assert set(seen) == {(torch.float32, torch.float32)}


class _Quantized(nn.Module):
    """Integer (or bool) codes of the inputs: activations that are not floating point."""

    def __init__(self, as_bool: bool) -> None:
        super().__init__()
        self.as_bool = as_bool

    def forward(self, x):
        return x > 0 if self.as_bool else torch.round(2 * x).long()


@pytest.mark.parametrize("as_bool", [False, True])
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_integer_and_bool_activations_are_compared_as_values(tmp_path, as_bool, metric):
    """Integer and bool layer outputs are compared as float32 values (exact for these
    small codes), ties in index order, as a float64 loop over the codes ranks them."""
    model = nn.Sequential(_Quantized(as_bool), nn.Identity())
    train, test = _data()
    chosen = euclidean_distance if metric == "euclidean" else _flat_dot
    sim = SimilarityInfluence(model, "0", train, tmp_path, batch_size=8,
                              similarity_metric=chosen, similarity_direction="min")  # fmt: skip
    t_codes, s_codes = _acts(model, "0", test), _acts(model, "0", train.tensors[0])
    if metric == "euclidean":
        expected = _brute(t_codes, s_codes, "euclidean", "min", 9)
    else:
        expected = _dot_reference(t_codes, s_codes, "min", 9)
    for _ in range(2):  # built, then read from the store
        _check(sim.influence(test, top_k=9)["0"], expected)


def test_complex_activations_are_refused(tmp_path):
    class Complexify(nn.Module):
        def forward(self, x):
            return torch.complex(x, -x)

    model = nn.Sequential(Complexify(), nn.Identity())
    train, test = _data()
    sim = SimilarityInfluence(model, "0", train, tmp_path, batch_size=8)
    with pytest.raises(InvalidArgumentError, match=r"layer '0' gives complex.*view_as_real"):
        sim.influence(test, top_k=2)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "custom"])
@pytest.mark.parametrize("direction", ["max", "min"])
def test_a_nan_score_from_an_early_block_stays_last_after_clean_blocks(
    tmp_path, monkeypatch, metric, direction
):
    """A NaN score in the first block of source rows, then blocks without any: the NaN
    stays last of the running top-k (clean blocks re-sorted it first for "max"), built
    and from the store, against a float64 brute force with NaN last."""
    from proponents.influence import similarity as similarity_module

    monkeypatch.setattr(similarity_module, "BLOCK_BYTES", 8 * 4 * 6)  # 6 rows of 8 floats
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(8, 2))
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    x[0, 0] = float("nan")
    test = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    chosen = {"cosine": cosine_similarity, "euclidean": euclidean_distance,
              "custom": lambda t, s: t @ s.T}[metric]  # fmt: skip
    sim = SimilarityInfluence(model, "0", TensorDataset(x), tmp_path, batch_size=6,
                              similarity_metric=chosen, similarity_direction=direction)  # fmt: skip
    t64, s64 = test.double(), x.double()
    if metric == "cosine":
        reference = (t64 / t64.norm(dim=1, keepdim=True)) @ (s64 / s64.norm(dim=1, keepdim=True)).T
    elif metric == "euclidean":
        reference = (t64[:, None] - s64[None]).norm(dim=-1)
    else:
        reference = t64 @ s64.T
    expected = [_lexicographic_ranking(row, direction) for row in reference.tolist()]
    for _ in range(2):  # built, then read from the store
        with pytest.warns(RuntimeWarning, match="NaN"):
            idx, val = sim.influence(test, top_k=30)["0"]
        assert idx.tolist() == expected
        assert bool(val[:, -1].isnan().all()) and not bool(val[:, :-1].isnan().any())


@pytest.mark.parametrize("direction", ["max", "min"])
def test_euclidean_infinite_rows_rank_as_their_exact_distances(tmp_path, direction):
    """An infinite test or source entry: the distances are +inf (NaN where infinities
    meet), ranked as such, NaN last and equal values in index order."""
    model = _seeded(Net)
    train, _ = _data()
    x = train.tensors[0].clone()
    x[5, 0] = float("inf")  # a source row at +inf distance from every finite test row
    x[9, 1] = float("nan")
    test = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    test[0] = 0.0
    test[0, 0] = float("inf")  # every distance of this row is +inf, or NaN
    sim = SimilarityInfluence(
        model, "lin1", TensorDataset(x, train.tensors[1]), tmp_path, batch_size=8,
        similarity_metric=euclidean_distance, similarity_direction=direction,
    )  # fmt: skip
    a, b = _acts(model, "lin1", test), _acts(model, "lin1", x)
    reference = (a[:, None] - b[None]).norm(dim=-1)  # float64, from the differences
    assert bool(reference[0].isposinf().sum() >= 30) and bool(reference[1:, 5].isposinf().all())
    assert bool(reference[0].isnan().any())  # NaN among the infinite distances of row 0
    e_idx = torch.tensor([_lexicographic_ranking(row, direction) for row in reference.tolist()])
    for _ in range(2):  # built, then read from the store
        with pytest.warns(RuntimeWarning, match="infinite or NaN"):
            idx, val = sim.influence(test, top_k=N_SRC)["lin1"]
        assert idx.tolist() == e_idx.tolist()
        torch.testing.assert_close(val.double(), reference.gather(1, e_idx), equal_nan=True)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_test_activations_of_another_shape_are_refused(tmp_path, metric):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    train = TensorDataset(torch.randn(20, 1, 8, 8), torch.zeros(20))  # (4, 6, 6): 144 features
    test = torch.randn(2, 1, 6, 11)  # (4, 4, 9): also 144 features
    sim = SimilarityInfluence(model, "0", train, tmp_path, batch_size=5,
                              similarity_metric=METRICS[metric])  # fmt: skip
    for _ in range(2):  # while building, and against the store
        with pytest.raises(InvalidArgumentError, match=r"\(4, 4, 9\).*\(4, 6, 6\)"):
            sim.influence(test, top_k=2)
        sim.influence(torch.randn(2, 1, 8, 8), top_k=2)


def test_an_empty_test_batch_gives_empty_results(tmp_path):
    model = _seeded(Net)
    train, _ = _data()
    for metric in ("cosine", "euclidean"):
        sim = SimilarityInfluence(model, ["lin1", "lin2"], train, tmp_path / metric,
                                  batch_size=8, similarity_metric=METRICS[metric])  # fmt: skip
        for _ in range(2):
            result = sim.influence(torch.empty(0, 6), top_k=3)
            for idx, val in result.values():
                assert idx.shape == val.shape == (0, 3)
                assert idx.dtype == torch.int64 and val.dtype == torch.float32


class _Overstated(Dataset):
    """Says it has more items than it can return."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x) + 5

    def __getitem__(self, i):
        if i >= len(self.x):
            raise IndexError(f"no item {i}")
        return self.x[i], 0


def test_source_loaders_that_break_the_batch_convention_get_clear_errors(tmp_path):
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin1", _Overstated(train.tensors[0]), tmp_path, batch_size=4)
    with pytest.raises(InvalidArgumentError, match=rf"reports {N_SRC + 5} examples.*after 36"):
        sim.influence(test, top_k=2)
    unbatched = DataLoader(train, batch_size=None)
    sim = SimilarityInfluence(model, "lin1", unbatched, tmp_path)
    with pytest.raises(InvalidArgumentError, match="batch_size=None.*give the DataLoader a batch"):
        sim.influence(test, top_k=2)


def test_any_name_of_a_layer_registered_twice_is_accepted(tmp_path):
    class Aliased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(6, 4)
            self.out = self.head  # the same module under a second name

        def forward(self, x):
            return torch.tanh(self.out(x))

    model = _seeded(Aliased)
    train, test = _data()
    expected = _brute(_acts(model, "head", test), _acts(model, "head", train.tensors[0]),
                      "cosine", "max", 4)  # fmt: skip
    for name in ("out", "head"):
        sim = SimilarityInfluence(model, name, train, tmp_path / name, batch_size=10)
        _check(sim.influence(test, top_k=4)[name], expected)


def test_a_tensor_dataset_whose_tensors_are_replaced_is_read_as_it_now_is(tmp_path):
    """``dataset.tensors = (...)`` after construction: the source set is what the dataset
    holds at the call (the tensors taken at construction were read, and stored under
    the new content's probe, poisoning the store for every later object)."""
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin1", train, tmp_path, batch_size=10)
    sim.influence(test, top_k=3)
    other, _ = _data(seed=9)
    train.tensors = other.tensors  # same length, other examples
    expected = _brute(_acts(model, "lin1", test), _acts(model, "lin1", other.tensors[0]),
                      "cosine", "max", 3)  # fmt: skip
    with pytest.warns(StoreRebuildWarning, match="dataset_probe"):
        _check(sim.influence(test, top_k=3)["lin1"], expected)
    again = SimilarityInfluence(model, "lin1", TensorDataset(*other.tensors), tmp_path,
                                batch_size=10)  # fmt: skip
    _check(again.influence(test, top_k=3)["lin1"], expected)  # the store holds the new rows


def test_a_tensor_dataset_subclass_is_read_through_its_own_methods(tmp_path):
    """A TensorDataset subclass whose ``__len__`` says 10 of its 37 rows are examples:
    it is read as a DataLoader reads it (its own methods), not by slicing all rows."""

    class FirstTen(TensorDataset):
        def __len__(self) -> int:
            return 10

    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin1", FirstTen(*train.tensors), tmp_path, batch_size=4)
    expected = _brute(_acts(model, "lin1", test), _acts(model, "lin1", train.tensors[0][:10]),
                      "cosine", "max", 3)  # fmt: skip
    _check(sim.influence(test, top_k=3)["lin1"], expected)
    with pytest.raises(InvalidArgumentError, match="top_k=11 is out of range"):
        sim.influence(test, top_k=11)


def test_a_metric_that_edits_its_arguments_changes_neither_the_store_nor_the_test_rows(
    tmp_path,
):
    """A custom metric that normalises its arguments in place (a cosine by hand): its
    results equal the cosine brute force, built and from the store, and the store then
    serves Euclidean distances of the activations as the layer gave them."""

    def cosine_in_place(test, src):
        test, src = test.view(len(test), -1), src.view(len(src), -1)
        test /= test.norm(dim=1, keepdim=True)
        src /= src.norm(dim=1, keepdim=True)
        return test @ src.T

    model = _seeded(Net)
    train, test = _data()
    acts_t, acts_s = _acts(model, "lin1", test), _acts(model, "lin1", train.tensors[0])
    sim = SimilarityInfluence(model, "lin1", train, tmp_path, batch_size=5,
                              similarity_metric=cosine_in_place)  # fmt: skip
    for _ in range(2):  # built, then read from the store
        _check(sim.influence(test, top_k=6)["lin1"], _brute(acts_t, acts_s, "cosine", "max", 6))
    near = SimilarityInfluence(model, "lin1", train, tmp_path, batch_size=5,
                               similarity_metric=euclidean_distance,
                               similarity_direction="min")  # fmt: skip
    _check(near.influence(test, top_k=6)["lin1"], _brute(acts_t, acts_s, "euclidean", "min", 6))


@pytest.mark.parametrize("model_id", ["src", "inputs", "Inputs"])
def test_a_model_id_naming_a_folder_of_the_default_model_is_refused(tmp_path, model_id):
    """``activation_dir/src`` and ``activation_dir/inputs`` belong to ``model_id=""``: a
    model_id of that name would share its files (saved test activations were lost)."""
    model = _seeded(Net)
    train, _ = _data()
    with pytest.raises(InvalidArgumentError, match=f"model_id={model_id!r} names a folder"):
        SimilarityInfluence(model, "lin1", train, tmp_path, model_id=model_id)


def test_integer_scores_of_a_custom_metric_keep_their_order_and_values(tmp_path):
    """Integer scores beyond float32's 24 bits (2**30 + i) are ranked and returned exactly
    (as float64), not rounded to equal float32 values and ranked by index."""
    x = torch.arange(10.0).reshape(10, 1)

    def score(test, src):
        return (2**30 + src.reshape(1, -1).long()).expand(test.shape[0], -1)

    sim = SimilarityInfluence(nn.Sequential(nn.Identity()), "0", TensorDataset(x), tmp_path,
                              batch_size=4, similarity_metric=score)  # fmt: skip
    idx, val = sim.influence(torch.zeros(1, 1), top_k=3)["0"]
    assert idx.tolist() == [[9, 8, 7]]
    assert val.tolist() == [[2**30 + 9, 2**30 + 8, 2**30 + 7]]


def test_a_dataloader_yielding_whole_batches_counts_their_examples(tmp_path):
    """``DataLoader(batches, batch_size=None)``: each item is a whole batch (of 6 and 4
    examples), so the source set has 10 examples, not 2 (it was refused as yielding more
    examples than its length)."""
    model = _seeded(Net)
    train, test = _data(n=10)
    x, y = train.tensors
    loader = DataLoader([(x[:6], y[:6]), (x[6:], y[6:])], batch_size=None)
    sim = SimilarityInfluence(model, "lin1", loader, tmp_path)
    expected = _brute(_acts(model, "lin1", test), _acts(model, "lin1", x), "cosine", "max", 10)
    for _ in range(2):  # built, then read from the store
        _check(sim.influence(test, top_k=10)["lin1"], expected)
    with pytest.raises(InvalidArgumentError, match="top_k=11 is out of range"):
        sim.influence(test, top_k=11)


def test_a_model_with_lazy_parameters_is_refused_with_the_fix(tmp_path):
    train, _ = _data()
    with pytest.raises(InvalidArgumentError, match=r"0\.weight, 0\.bias: lazy modules.*run it"):
        SimilarityInfluence(nn.Sequential(nn.LazyLinear(3)), "0", train, tmp_path)


def test_the_public_cosine_scores_a_zero_vector_zero_against_non_finite_ones(tmp_path):
    """``cosine_similarity`` as a function gives a zero vector 0 against NaN and inf
    vectors too (it gave NaN), as SimilarityInfluence scores those pairs."""
    src = torch.tensor([[1.0, float("nan"), 0.0], [float("inf"), 0.0, 0.0], [1.0, 2.0, 3.0]])
    test = torch.tensor([[0.0, 0.0, 0.0], [3.0, 2.0, 1.0]])
    got = cosine_similarity(test, src)
    assert got[0].tolist() == [0.0, 0.0, 0.0]
    assert bool(got[1, :2].isnan().all()) and abs(float(got[1, 2]) - 10 / 14) < 1e-6
    assert cosine_similarity(src, torch.zeros(2, 3)).tolist() == [[0.0, 0.0]] * 3
    sim = SimilarityInfluence(nn.Sequential(nn.Identity()), "0", TensorDataset(src), tmp_path)
    with pytest.warns(RuntimeWarning):
        idx, val = sim.influence(test[:1], top_k=3)["0"]
    assert val.tolist() == [[0.0, 0.0, 0.0]]


def test_a_tensor_the_forward_keeps_on_its_module_does_not_invalidate_the_store(tmp_path):
    """``self.last_hidden = h.detach()`` in ``forward``: the model is left as it was after
    each call (the attribute it did not have is not left behind, one it had is put back),
    and a tensor the forward assigns is state, which the fingerprint leaves out: the
    store is reused, with no rebuild warning, also after the user's own forward."""

    class KeepsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            self.last_hidden = h.detach()
            return self.b(h)

    model = _seeded(KeepsLast)
    train, test = _data()
    sim = SimilarityInfluence(model, "a", train, tmp_path, batch_size=10)
    first = sim.influence(test, top_k=3)["a"]
    assert not hasattr(model, "last_hidden")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reused: no StoreRebuildWarning
        again = sim.influence(test, top_k=3)["a"]
    assert torch.equal(first[0], again[0])
    model(test)  # the user's own call keeps its attribute, which is restored after ours
    kept = model.last_hidden
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # state the forward writes is no part of the model
        sim.influence(test, top_k=3)
    assert model.last_hidden is kept


def test_top_k_takes_any_integer_type_but_bool(tmp_path):
    """A NumPy or other integer top_k gives the int answer (before: refused as not an
    int); a bool is still refused."""
    model = _seeded(Net)
    train, test = _data()
    sim = SimilarityInfluence(model, "lin1", train, tmp_path, batch_size=8)
    want = _brute(_acts(model, "lin1", test), _acts(model, "lin1", train.tensors[0]),
                  "cosine", "max", 2)  # fmt: skip
    for top_k in (np.int64(2), np.int32(2), torch.tensor(2)):
        _check(sim.influence(test, top_k=top_k)["lin1"], want)
    with pytest.raises(ArgumentTypeError, match="top_k must be an int; got bool"):
        sim.influence(test, top_k=True)
    with pytest.raises(ArgumentTypeError, match="top_k must be an int; got float"):
        sim.influence(test, top_k=2.0)


def test_activation_dir_that_is_empty_or_a_file_is_refused(tmp_path, monkeypatch):
    model = _seeded(Net)
    train, _ = _data()
    monkeypatch.chdir(tmp_path)  # where '' would have put the activations
    with pytest.raises(InvalidArgumentError, match="activation_dir is empty.*'.' for the current"):
        SimilarityInfluence(model, "lin1", train, "")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "acts").write_text("a file")
    with pytest.raises(InvalidArgumentError, match=r"activation_dir '.*acts' is a file"):
        SimilarityInfluence(model, "lin1", train, tmp_path / "acts")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "m1").write_text("a file")
    with pytest.raises(InvalidArgumentError, match=r"model_id folder '.*m1' is a file"):
        SimilarityInfluence(model, "lin1", train, tmp_path / "dir", model_id="m1")


class _Tempered(nn.Module):
    """A model whose forward reads a plain float attribute (no tensor, no submodule)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(6, 8), nn.Linear(8, 5)
        self.temperature = 1.0

    def forward(self, x):
        return self.lin2(torch.tanh(self.lin1(x) / self.temperature))


def test_a_changed_setting_extra_repr_does_not_print_is_not_served_stale(tmp_path):
    """nn.TransformerEncoderLayer.norm_first (extra_repr is empty) and a user's own float
    attribute change what the model computes, no weight: the stored activations are
    rebuilt (before: the old ones were served, the results those of the old setting),
    and the store then answers as a store of the new setting built from scratch."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True),
        nn.Flatten(),
    ).eval()
    x, xt = torch.randn(N_SRC, 3, 8), torch.randn(N_TEST, 3, 8)
    train = TensorDataset(x, torch.zeros(N_SRC))
    SimilarityInfluence(model, "1", train, tmp_path, batch_size=8).influence(xt, top_k=4)
    model[0].norm_first = True
    with pytest.warns(StoreRebuildWarning, match="model"):
        got = SimilarityInfluence(model, "1", train, tmp_path, batch_size=8).influence(xt, top_k=4)
    _check(got["1"], _brute(_acts(model, "1", xt), _acts(model, "1", x), "cosine", "max", 4))

    tempered = _seeded(_Tempered)
    train, test = _data()
    sim = SimilarityInfluence(tempered, "lin2", train, tmp_path / "t", batch_size=8)
    sim.influence(test, top_k=4)
    tempered.temperature = -2.0
    with pytest.warns(StoreRebuildWarning, match="model"):
        got = sim.influence(test, top_k=4)  # the same object, called again
    want = _brute(
        _acts(tempered, "lin2", test), _acts(tempered, "lin2", train.tensors[0]), "cosine", "max", 4
    )
    _check(got["lin2"], want)


class _Counting(Net):
    """A model whose forward updates a counter and a drawn number, and keeps its output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.drawn = 0
        self.last: Tensor | None = None

    def forward(self, x):
        self.calls += 1
        self.drawn = int(torch.randint(0, 1000, (1,)))
        self.last = super().forward(x)
        return self.last


@pytest.mark.parametrize(
    "build",
    [
        lambda: _seeded(_Counting),
        lambda: nn.Sequential(
            nn.utils.spectral_norm(nn.Linear(6, 8)), nn.Tanh(), nn.Linear(8, 5)
        ).eval(),  # eval: the power iteration leaves its vectors alone
    ],
    ids=["counter", "legacy spectral_norm"],
)
def test_state_a_forward_updates_rebuilds_no_store(tmp_path, build):
    """What a forward updates (a counter, a drawn number, a kept output, the weight the
    legacy spectral_norm recomputes) is state, known before the first fingerprint: no call
    rebuilds the stored activations, neither the same object's next calls nor a new
    process's (a fresh twin of the model, as a process that builds it anew has), nor one
    the user ran first, nor activations loaded from disk by inputs_id; the answers stay
    those of a hook on the model (before: every process rebuilt them at its first and
    second call)."""
    torch.manual_seed(0)
    model = build()
    state = model.state_dict()
    train, test = _data()

    def twin(runs: int = 0) -> nn.Module:
        other = build()
        other.load_state_dict(state)
        for _ in range(runs):
            other(test)
        return other

    layer = "1" if isinstance(model, nn.Sequential) else "lin1"
    want = _brute(
        _acts(model, layer, test), _acts(model, layer, train.tensors[0]), "cosine", "max", 4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoreRebuildWarning)
        for who in (model, model, model, twin(), twin(runs=2)):
            sim = SimilarityInfluence(who, layer, train, tmp_path, batch_size=8)
            _check(sim.influence(test, top_k=4, inputs_id="t")[layer], want)
        fresh = SimilarityInfluence(twin(), layer, train, tmp_path, batch_size=8)
        got = fresh.influence(None, top_k=4, load_input_from_disk=True, inputs_id="t")
    _check(got[layer], want)


def test_a_store_in_a_directory_that_cannot_be_written_is_still_read(tmp_path, monkeypatch):
    """A store someone built, in a read-only shared cache: a new object reads it and
    answers as the one that built it (before: the constructor refused the directory). An
    entry that would have to be rebuilt raises a StoreError naming the directory; without
    any store there, the constructor refuses as before."""
    import proponents.store as store_module

    model = _seeded(Net)
    train, test = _data()
    want = SimilarityInfluence(model, ["lin1", "lin2"], train, tmp_path, batch_size=8).influence(
        test, top_k=4
    )
    real = store_module.ArrayStore.ensure_writable

    def read_only(self):
        if str(self.directory).startswith(str(tmp_path)):
            raise StoreError(
                f"cannot write to the directory {str(self.directory)!r} (Read-only file system)"
            )
        return real(self)

    monkeypatch.setattr(store_module.ArrayStore, "ensure_writable", read_only)
    reader = SimilarityInfluence(model, ["lin1", "lin2"], train, tmp_path, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served, not rebuilt
        got = reader.influence(test, top_k=4)
    for layer in ("lin1", "lin2"):
        assert torch.equal(got[layer][0], want[layer][0])
        torch.testing.assert_close(got[layer][1], want[layer][1])
    other, _ = _data(seed=9)
    with pytest.warns(StoreRebuildWarning), pytest.raises(StoreError, match="Read-only"):
        SimilarityInfluence(model, "lin1", other, tmp_path, batch_size=8).influence(test, top_k=4)
    with pytest.raises(StoreError, match="Read-only"):
        SimilarityInfluence(model, "lin1", train, tmp_path / "empty", batch_size=8)
