"""The batch-slicing loader of TensorDatasets yields what a plain DataLoader yields."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from conftest import Augmented, assert_close
from proponents import TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.data import TensorRowsLoader, make_loader
from proponents.distributed import shard_loader


def _stored_tensors():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(11, 3, 4, 4, generator=g).to(memory_format=torch.channels_last)
    features = torch.randn(5, 11, generator=g).t()  # not contiguous
    labels = torch.randint(0, 3, (11,), generator=g)
    return images, features, labels


def _same_batches(ours, reference) -> None:
    ours, reference = list(ours), list(reference)
    assert len(ours) == len(reference)
    for got, want in zip(ours, reference):
        assert type(got) is type(want)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)
            assert a.is_contiguous() == b.is_contiguous()


@pytest.mark.parametrize("batch_size", [1, 3, 4, 11, 20])
def test_tensor_dataset_batches_equal_a_plain_dataloader(batch_size):
    data = TensorDataset(*_stored_tensors())
    loader = make_loader(data, batch_size, "train_dataset")
    assert type(loader) is TensorRowsLoader
    assert loader.dataset is data  # the user's dataset stays visible as given
    _same_batches(loader, DataLoader(data, batch_size=batch_size))


def test_subset_with_shuffled_and_negative_indices():
    data = TensorDataset(*_stored_tensors())
    subset = Subset(data, [7, -1, 0, 2, 3, 4, -11, 9])
    loader = make_loader(subset, 3, "train_dataset")
    assert type(loader) is TensorRowsLoader
    _same_batches(loader, DataLoader(subset, batch_size=3))


def test_out_of_range_subset_index_raises_index_error():
    data = TensorDataset(*_stored_tensors())
    with pytest.raises(IndexError):
        list(make_loader(Subset(data, [0, 11]), 2, "train_dataset"))
    with pytest.raises(IndexError):
        list(DataLoader(Subset(data, [0, 11]), batch_size=2))  # the same error type


def test_batches_are_fresh_memory():
    data = TensorDataset(*_stored_tensors())
    before = [t.clone() for t in data.tensors]
    for batch in make_loader(data, 4, "train_dataset"):
        for t in batch:
            t.zero_()
    assert all(torch.equal(a, b) for a, b in zip(before, data.tensors))


def test_batches_in_a_requested_layout_hold_the_same_rows_in_fresh_memory():
    images, features, labels = _stored_tensors()
    # 4-D float labels (dense targets) stay in the standard layout: only inputs are asked
    data = TensorDataset(images, features, labels, torch.randn(11, 3, 2, 2))
    before = [t.clone() for t in data.tensors]
    loader = make_loader(data, 4, "train_dataset")

    def layout(t: torch.Tensor) -> torch.memory_format:
        return torch.channels_last if t.dim() == 4 else torch.contiguous_format

    laid_out = list(loader.batches(layout))
    plain = list(DataLoader(data, batch_size=4))
    assert len(laid_out) == len(plain)
    for got, want in zip(laid_out, plain):
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))
    for images, features, labels, targets in laid_out:
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert not images.is_contiguous()  # really channels-last, not both by accident
        assert features.is_contiguous() and labels.is_contiguous() and targets.is_contiguous()
        for t in (images, features, labels, targets):
            t.zero_()
    assert all(torch.equal(a, b) for a, b in zip(before, data.tensors))
    # a shuffled subset goes through index_select: contiguous whatever the layout says
    picked = list(make_loader(Subset(data, [3, 1, 2]), 3, "train_dataset").batches(layout))
    assert picked[0][0].is_contiguous()
    assert torch.equal(picked[0][0], data.tensors[0][[3, 1, 2]])


def test_subclasses_keep_their_own_getitem():
    class Doubled(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return 2 * x, y

    x, y = torch.arange(6.0).reshape(6, 1), torch.arange(6)
    loader = make_loader(Doubled(x, y), 4, "train_dataset")
    assert type(loader) is DataLoader
    assert torch.equal(torch.cat([b[0] for b in loader]), 2 * x)


def test_custom_sampler_or_workers_fall_back_to_per_example_loading():
    data = TensorDataset(*_stored_tensors())
    reference = DataLoader(data, batch_size=4, collate_fn=lambda items: len(items))
    custom = TensorRowsLoader(data, batch_size=4, collate_fn=lambda items: len(items))
    assert list(custom) == list(reference) == [4, 4, 3]


def test_shards_keep_the_slicing_loader():
    data = TensorDataset(*_stored_tensors())
    loader = make_loader(data, 2, "train_dataset")
    for rank in range(3):
        shard = shard_loader(loader, rank, 3, "train_dataset")
        assert type(shard) is TensorRowsLoader
        plain = shard_loader(DataLoader(data, batch_size=2), rank, 3, "train_dataset")
        _same_batches(shard, plain)


def test_a_model_that_edits_its_input_leaves_the_dataset_unchanged(tmp_path):
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.mul_(2.0))  # scales its input in place

    torch.manual_seed(0)
    model = InPlace()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    kept = x.clone()
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    tracin = TracInCPFast(
        model, "fc", TensorDataset(x, y), [str(path)], loss_fn=nn.CrossEntropyLoss(), batch_size=4
    )
    scores = tracin.self_influence()
    assert torch.equal(x, kept)
    # the reference: the same self-influence computed from copies of the inputs
    reference = TracInCPFast(
        model,
        "fc",
        DataLoader(TensorDataset(x.clone(), y), batch_size=4),
        [str(path)],
        loss_fn=nn.CrossEntropyLoss(),
    ).self_influence()
    torch.testing.assert_close(scores, reference)


class _Doubling(nn.Module):
    """The in-place model's arithmetic without the in-place edit: the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x * 2.0)


class _DoublingInPlace(_Doubling):
    def forward(self, x):
        return self.fc(x.mul_(2.0))


def _stepped_checkpoints(tmp_path, model=None, n=3):
    """``n`` checkpoints of ``model`` (default: a _DoublingInPlace), each a random step on."""
    torch.manual_seed(0)
    model, paths = model if model is not None else _DoublingInPlace(), []
    for c in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        paths.append(str(tmp_path / f"c{c}.pt"))
        torch.save(model.state_dict(), paths[-1])
    return model, paths


@pytest.mark.parametrize("method", ["fast", "randproj", "tracincp", "tracincp-generic"])
def test_a_model_that_edits_its_input_gets_the_same_input_at_every_checkpoint(tmp_path, method):
    """The test batch goes through the model once per checkpoint (and more than once on
    the first batch, for the checks): each run must see the inputs as given, and the
    caller's tensors stay untouched."""
    model, paths = _stepped_checkpoints(tmp_path)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    xt, yt = torch.randn(3, 4), torch.randint(0, 3, (3,))
    kept, kept_test = x.clone(), xt.clone()

    def scores(net, test_inputs):
        train = TensorDataset(x, y)
        if method == "fast":
            t = TracInCPFast(net, "fc", train, paths, loss_fn=nn.CrossEntropyLoss(), batch_size=4)
            return t.influence((test_inputs,), yt), t.self_influence((test_inputs, yt))
        if method == "randproj":
            t = TracInCPFastRandProj(
                net, "fc", train, paths, loss_fn=nn.CrossEntropyLoss(), batch_size=4
            )
            return t.influence((test_inputs,), yt, k=None), None
        t = TracInCP(
            net,
            train,
            paths,
            layers=["fc"] if method == "tracincp" else None,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=4,
            sample_wise_grads_per_batch=False,
        )
        if method == "tracincp-generic":
            t._engine.hooked, t._engine._checked = [], True
            t._engine._set_generic()
        return t.influence((test_inputs,), yt), t.self_influence((test_inputs, yt))

    got, got_self = scores(model, xt)
    assert torch.equal(x, kept) and torch.equal(xt, kept_test)
    reference = _Doubling()
    want, want_self = scores(reference, kept_test.clone())
    torch.testing.assert_close(got, want)
    if want_self is not None:
        torch.testing.assert_close(got_self, want_self)
    assert torch.equal(xt, kept_test)


def test_a_model_that_leaves_its_input_alone_is_not_given_copies(tmp_path):
    model, paths = _stepped_checkpoints(tmp_path)
    reference = _Doubling()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    for net, edits in ((model, True), (reference, False)):
        t = TracInCPFast(
            net, "fc", TensorDataset(x, y), paths, loss_fn=nn.CrossEntropyLoss(), batch_size=4
        )
        t.self_influence()
        assert t._engine._edits_inputs is edits


class _ScaledNoVmap(nn.Module):
    """A Linear layer and a free scale parameter (served by the generic path), with a
    Python branch on a tensor value that ``torch.func.vmap`` cannot run."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.in_place = in_place

    def forward(self, x):
        x = x.mul_(2.0) if self.in_place else x * 2.0
        if float(x.abs().sum()) < 0:  # never true; vmap fails here, after the edit
            x = -x
        return self.fc(x) * self.scale


@pytest.mark.parametrize("hooked", [True, False])
def test_the_per_example_fallback_sees_the_input_as_given(tmp_path, hooked):
    """When vmap fails part-way through a model that has already edited its input, the
    per-example loop that takes over must start from the batch as it was given."""
    model, paths = _stepped_checkpoints(tmp_path, _ScaledNoVmap(in_place=True), n=2)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    xt, yt = torch.randn(3, 4), torch.randint(0, 3, (3,))

    def scores(net):
        t = TracInCP(
            net,
            TensorDataset(x.clone(), y),
            paths,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=4,
        )
        if not hooked:  # every parameter through torch.func
            t._engine.hooked, t._engine._checked = [], True
            t._engine._set_generic()
        with pytest.warns(RuntimeWarning, match="fall back"):
            got = t.influence((xt.clone(),), yt)
        return got, t.self_influence()

    got, got_self = scores(model)
    want, want_self = scores(_ScaledNoVmap(in_place=False))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_self, want_self)


class _EditsFromTheSecondCallOn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:
            x.mul_(2.0)
            if float(x.abs().sum()) < 0:  # vmap fails here, after the edit
                x = -x
        return self.fc(x)


def test_an_input_edit_that_starts_late_and_defeats_vmap_is_an_error(tmp_path):
    """A model that leaves its input alone on the first batch is given the later batches
    without copies; if it then edits one and vmap fails, the batch as given is gone, and
    the call says so instead of scoring the edited batch."""
    model = _EditsFromTheSecondCallOn()
    path = str(tmp_path / "c.pt")
    torch.save(model.state_dict(), path)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    t = TracInCP(
        model,
        TensorDataset(x, y),
        [path],
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=4,
    )
    t._engine.hooked, t._engine._checked = [], True
    t._engine._set_generic()
    with pytest.raises(RuntimeError, match="changed its input in place"):
        t.self_influence()


@pytest.mark.parametrize("workers", [0, 2])
def test_random_augmentations_are_the_same_draw_at_every_checkpoint(tmp_path, workers):
    """Every pass over the data starts from the generators as the call found them, so
    each example is the same augmented input at every checkpoint (three copies of one
    checkpoint score exactly three times one), a repeated call gives the same bits, and
    the caller's torch, Python and NumPy generators are left where they were."""
    import random

    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 1.0}, path)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    loader = DataLoader(Augmented(x, y), batch_size=7, num_workers=workers)
    loss = nn.CrossEntropyLoss(reduction="sum")
    one = TracInCPFast(model, "2", loader, [path], loss_fn=loss, batch_size=7)
    three = TracInCPFast(model, "2", loader, [path] * 3, loss_fn=loss, batch_size=7)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    single = one.self_influence()
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert_close(three.self_influence(), 3 * single)
    assert torch.equal(one.self_influence(), single)
    test = (x[:4],), y[:4]
    assert_close(three.influence(*test), 3 * one.influence(*test))
