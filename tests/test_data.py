"""Batches: the TensorDataset slicing loader, structured test inputs, targets, batch checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SequentialSampler,
    Subset,
    TensorDataset,
)

from conftest import (
    Augmented,
    assert_close,
    make_case,
    reference_scores,
    reference_self,
    save_checkpoints,
)
from proponents import TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.data import (
    Batch,
    TensorRowsLoader,
    batch_size_of,
    chunk_batch,
    make_loader,
)
from proponents.data import test_batches as normalise_test_side
from proponents.distributed import shard_loader
from proponents.errors import BatchFormatError, InvalidArgumentError


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


# --------------------------------------------------------------- structured test inputs
class _DictNet(nn.Module):
    """A model called with one dict (or, as _TupleNet, one tuple) of tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.e = nn.Embedding(10, 5)
        self.fc = nn.Linear(5, 3)

    def parts(self, inp):
        return inp["x"], inp["tok"]

    def forward(self, inp):
        x, tok = self.parts(inp)
        return self.fc(torch.tanh(self.a(x) + self.e(tok).mean(1)))


class _TupleNet(_DictNet):
    def parts(self, inp):
        return inp[0], inp[1]


def _structured(kind, x, tok):
    return {"x": x, "tok": tok} if kind == "dict" else (x, tok)


class _StructuredItems(Dataset):
    """Items ``(structured input, label)``, collated into dicts/tuples of batches."""

    def __init__(self, kind, x, tok, y):
        self.kind, self.x, self.tok, self.y = kind, x, tok, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return _structured(self.kind, self.x[i], self.tok[i]), self.y[i]


def _structured_setup(tmp_path, kind, n_train=9, n_test=3):
    torch.manual_seed(0)
    model = _DictNet() if kind == "dict" else _TupleNet()
    g = torch.Generator().manual_seed(5)
    x, tok = torch.randn(n_train, 4, generator=g), torch.randint(0, 10, (n_train, 3), generator=g)
    y = torch.randint(0, 3, (n_train,), generator=g)
    xt, tokt = torch.randn(n_test, 4, generator=g), torch.randint(0, 10, (n_test, 3), generator=g)
    yt = torch.randint(0, 3, (n_test,), generator=g)
    lrs = [0.5, 1.5]
    paths = save_checkpoints(model, tmp_path, lrs, g)
    return model, paths, lrs, (x, tok, y), (xt, tokt, yt)


def _loop_grads(model, path, kind, x, tok, y, prefix):
    """Float64 per-example gradients by plain autograd, one example at a time."""
    import copy

    net = copy.deepcopy(model).double().eval()
    net.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
    net.double()
    params = [p for n, p in net.named_parameters() if n.startswith(prefix)]
    rows = []
    for i in range(len(y)):
        out = net(_structured(kind, x[i : i + 1].double(), tok[i : i + 1]))
        loss = nn.functional.cross_entropy(out, y[i : i + 1], reduction="sum")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _loop_scores(model, paths, lrs, kind, train, test, prefix=""):
    total = 0
    for path, lr in zip(paths, lrs):
        gr = _loop_grads(model, path, kind, *train, prefix)
        gt = _loop_grads(model, path, kind, *test, prefix)
        total = total + lr * gt @ gr.T
    return total


@pytest.mark.parametrize("kind", ["dict", "tuple"])
@pytest.mark.parametrize("method", ["cp-sum", "cp-none", "fast"])
def test_a_dict_or_tuple_test_batch_with_unpack_inputs_false_matches_the_loop(
    tmp_path, kind, method
):
    """model(inputs) with inputs a dict or a tuple: the batch size comes from the tensors
    inside it, and the scores equal a float64 per-example autograd loop."""
    model, paths, lrs, train, (xt, tokt, yt) = _structured_setup(tmp_path, kind)
    data = _StructuredItems(kind, *train)
    if method == "fast":
        t = TracInCPFast(
            model, "fc", data, paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4
        )
        want = _loop_scores(model, paths, lrs, kind, train, (xt, tokt, yt), prefix="fc.")
    else:
        reduction = "sum" if method == "cp-sum" else "none"
        t = TracInCP(
            model,
            data,
            paths,
            loss_fn=nn.CrossEntropyLoss(reduction=reduction),
            batch_size=4,
            sample_wise_grads_per_batch=reduction == "sum",
        )
        want = _loop_scores(model, paths, lrs, kind, train, (xt, tokt, yt))
    inputs = _structured(kind, xt, tokt)
    assert_close(t.influence(inputs, yt, unpack_inputs=False), want)
    top = t.influence(inputs, yt, k=2, unpack_inputs=False)
    assert_close(top.influence_scores, want.sort(dim=1, descending=True).values[:, :2])
    # the same test batch through a DataLoader of (input, label) items
    loader = DataLoader(_StructuredItems(kind, xt, tokt, yt), batch_size=2)
    assert_close(t.influence(loader), want)


def test_a_large_dict_test_batch_is_chunked_like_its_tensors(tmp_path):
    """A dict test batch larger than a test chunk (256 examples) is split inside the dict,
    with the labels: the scores still equal the loop's."""
    model, paths, lrs, train, _ = _structured_setup(tmp_path, "dict", n_train=5, n_test=1)
    g = torch.Generator().manual_seed(9)
    xt, tokt = torch.randn(300, 4, generator=g), torch.randint(0, 10, (300, 3), generator=g)
    yt = torch.randint(0, 3, (300,), generator=g)
    t = TracInCPFast(
        model,
        "fc",
        _StructuredItems("dict", *train),
        paths,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=5,
    )
    want = _loop_scores(model, paths, lrs, "dict", train, (xt, tokt, yt), prefix="fc.")
    assert_close(t.influence({"x": xt, "tok": tokt}, yt, unpack_inputs=False), want)


def test_batch_size_of_reads_nested_tensors_then_the_labels():
    x, tok, y = torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3)
    assert batch_size_of((x,)) == 3
    assert batch_size_of(({"x": x, "tok": tok},)) == 3
    assert batch_size_of(((x, [tok]),)) == 3
    # nested tensors that disagree: the labels decide, else a clear error
    odd = {"x": x, "table": torch.zeros(7, 4)}
    assert batch_size_of((odd,), y) == 3
    with pytest.raises(BatchFormatError, match=r"different first dimensions \(3, 7\)"):
        batch_size_of((odd,))
    # inputs without tensors (e.g. strings for a model that tokenizes): the labels
    assert batch_size_of((["a", "b", "c"],), y) == 3
    # a tensor without a batch dimension is not silently replaced by the labels
    with pytest.raises(BatchFormatError, match="batch dimension"):
        batch_size_of((torch.tensor(1.0),), y)


def test_chunk_batch_slices_inside_dicts_and_leaves_other_inputs_whole():
    x, tok, y = torch.arange(10.0).view(5, 2), torch.arange(5), torch.arange(5) * 10
    table = torch.ones(3, 3)  # not per example: handed to every chunk
    batch = Batch(inputs=({"x": x, "tok": [tok], "table": table},), labels=y, size=5)
    parts = chunk_batch(batch, 2)
    assert [p.size for p in parts] == [2, 2, 1]
    for p, start in zip(parts, (0, 2, 4)):
        stop = start + p.size
        (inp,) = p.inputs
        assert torch.equal(inp["x"], x[start:stop]) and torch.equal(inp["tok"][0], tok[start:stop])
        assert inp["table"] is table
        assert torch.equal(p.labels, y[start:stop])
    # one string per example is cut like a tensor's rows
    names = [f"w{i}" for i in range(5)]
    words = Batch(inputs=(names,), labels=y, size=5)
    assert [p.inputs[0] for p in chunk_batch(words, 2)] == [names[:2], names[2:4], names[4:]]
    # inputs in which nothing carries the examples cannot be split: one chunk
    other = Batch(inputs=({"scale": 2.0, "mode": "fast"},), labels=y, size=5)
    assert chunk_batch(other, 2) == [other]


def test_a_test_batch_of_strings_takes_its_size_from_the_targets():
    (batch,), is_loader = normalise_test_side(["a", "b"], torch.tensor([0, 1]), unpack_inputs=False)
    assert not is_loader and batch.size == 2


@pytest.mark.parametrize(
    "given",
    [[2, 0, 1], (2, 0, 1), np.array([2, 0, 1]), [np.int64(2), np.int64(0), np.int64(1)]],
    ids=["list", "tuple", "ndarray", "numpy-scalars"],
)
def test_numeric_targets_are_converted_like_torch_as_tensor(given):
    (batch,), _ = normalise_test_side((torch.zeros(3, 2),), given, unpack_inputs=True)
    assert torch.equal(batch.labels, torch.as_tensor(given))
    assert batch.labels.dtype == torch.int64
    floats = [[0.5, 1.0], [2.0, 3.0], [4.0, 5.0]]
    (batch,), _ = normalise_test_side((torch.zeros(3, 2),), floats, unpack_inputs=True)
    assert torch.equal(batch.labels, torch.tensor(floats))
    # anything but numbers is the custom loss's business: passed on as given
    words = ["cat", "dog", "cow"]
    (batch,), _ = normalise_test_side((torch.zeros(3, 2),), words, unpack_inputs=True)
    assert batch.labels is words


def test_list_targets_give_the_scores_of_tensor_targets(tmp_path):
    case = make_case("mlp", tmp_path / "ck")
    t = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    want = reference_scores(case)
    assert_close(t.influence(case.test_inputs, case.test_labels.tolist()), want)
    assert_close(t.influence(case.test_inputs, case.test_labels.numpy()), want)
    assert_close(t.influence(case.test_inputs, list(case.test_labels)), want)  # 0-d tensors
    # labels as a list in a self-influence batch, and from a collate_fn that returns lists
    own = reference_self(case)
    assert_close(t.self_influence((*case.train_inputs, case.train_labels.tolist())), own)

    def listing(items):
        return torch.stack([x for x, _ in items]), [int(y) for _, y in items]

    listed = DataLoader(case.dataset, batch_size=4, collate_fn=listing)
    assert_close(t.self_influence(listed), own)
    reg = make_case("regression", tmp_path / "reg")
    t = TracInCP(
        reg.model,
        reg.dataset,
        reg.checkpoints,
        loss_fn=nn.MSELoss(reduction="sum"),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    assert_close(t.influence(reg.test_inputs, reg.test_labels.tolist()), reference_scores(reg))


# ------------------------------------------------- DataLoaders that yield single examples
def test_a_dataloader_without_batch_size_is_refused_with_the_fix(tmp_path):
    """DataLoader(batch_size=None) yields single examples: the feature dimension would be
    read as the batch; the error names batch_size=None and what to pass instead."""
    case = make_case("mlp", tmp_path / "ck")
    unbatched = DataLoader(case.dataset, batch_size=None)
    t = TracInCP(
        case.model,
        unbatched,
        case.checkpoints,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        sample_wise_grads_per_batch=True,
    )
    for call in (lambda: t.influence(case.test_inputs, case.test_labels), t.influence):
        with pytest.raises(BatchFormatError, match=r"batch_size=None.*batch_size=32"):
            call()
    # regression labels of one value per example: the row counts disagree
    torch.manual_seed(0)
    net, x, y = nn.Linear(6, 1), torch.randn(8, 6), torch.randn(8, 1)
    torch.save(net.state_dict(), tmp_path / "lin.pt")
    t = TracInCP(
        net,
        DataLoader(TensorDataset(x, y), batch_size=None),
        [tmp_path / "lin.pt"],
        loss_fn=nn.MSELoss(reduction="sum"),
        sample_wise_grads_per_batch=True,
    )
    with pytest.raises(
        BatchFormatError,
        match=r"labels with 1 row but model inputs of 6 "
        r"examples.*batch_size=None",
    ):
        t.influence()


class _TwoTaskLoss(nn.Module):
    """Cross-entropy on the first three outputs plus squared error on the last two, for
    targets given as a pair ``(classes, values)``."""

    reduction = "sum"

    def forward(self, out, targets):
        classes, values = targets
        ce = nn.functional.cross_entropy(out[:, :3], classes, reduction="sum")
        return ce + (out[:, 3:] - values).pow(2).sum()


class _TwoTaskItems(Dataset):
    def __init__(self, x, classes, values) -> None:
        self.x, self.classes, self.values = x, classes, values

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (self.classes[i], self.values[i])


def _two_task_loop(model, path, x, classes, values):
    """Float64 per-example gradients of the two-task loss, one example at a time."""
    import copy

    net = copy.deepcopy(model).double()
    net.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
    net.double()
    rows = []
    for i in range(len(x)):
        value = _TwoTaskLoss()(net(x[i : i + 1].double()), (classes[i : i + 1], values[i : i + 1]))
        grads = torch.autograd.grad(value, list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("n_test", [2, 5, 300])
def test_targets_of_several_tasks_as_a_tuple_of_tensors(tmp_path, n_test):
    """``targets=(classes, values)``: the examples are counted in the tensors' dim 0, not
    by the tuple's length (5 test examples used to be refused as '2 entries'), also when a
    test batch is cut into chunks (300); scores equal a float64 per-example loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.5}, path)
    g = torch.Generator().manual_seed(2)
    n = 12 + n_test
    x = torch.randn(n, 4, generator=g)
    classes, values = torch.randint(0, 3, (n,), generator=g), torch.randn(n, 2, generator=g)
    train = _TwoTaskItems(x[:12], classes[:12], values[:12])
    t = TracInCP(model, train, [str(path)], loss_fn=_TwoTaskLoss(), batch_size=5,
                 sample_wise_grads_per_batch=True)  # fmt: skip
    test = (x[12:], (classes[12:], values[12:]))
    got = t.influence(test[0], test[1])
    gt = _two_task_loop(model, path, x[12:], classes[12:], values[12:])
    gr = _two_task_loop(model, path, x[:12], classes[:12], values[:12])
    assert_close(got, 0.5 * gt @ gr.T)
    with pytest.raises(InvalidArgumentError, match=r"2 entries \(or 3 rows per task\).*4 examples"):
        t.influence(x[:4], (classes[:3], values[:3]))


def test_a_list_of_per_example_labels_is_cut_with_its_chunks(tmp_path):
    """Test labels as a list of 0-d tensors (one per example) for a test batch larger than
    a chunk: each chunk gets its own labels (every chunk used to get all 300)."""

    class StackingLoss(nn.Module):
        reduction = "sum"

        def forward(self, out, labels):
            return nn.functional.cross_entropy(out, torch.stack(list(labels)), reduction="sum")

    case = make_case("mlp", tmp_path, n_train=10, n_test=300)
    paths = [str(p) for p in case.checkpoints]
    t = TracInCP(case.model, case.dataset, paths, loss_fn=StackingLoss(), batch_size=5,
                 sample_wise_grads_per_batch=True)  # fmt: skip
    got = t.influence(case.test_inputs, list(case.test_labels.unbind()))
    assert_close(got, reference_scores(case))


class _MaskedAttention(nn.Module):
    """Self-attention over ``(B, T, D)`` with an additive mask given beside the batch;
    ``scale`` is a free parameter, so the per-example (``torch.func``) path serves it."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))
        self.out = nn.Linear(3, 2)

    def forward(self, x, mask):
        h = self.q(x) * self.scale
        attended = torch.softmax(h @ h.transpose(1, 2) + mask, dim=-1) @ h
        return self.out(attended.mean(1))


def _masked_loop(model, x, mask, y):
    """Float64 per-example gradients, each example run alone with the whole mask."""
    import copy

    net = copy.deepcopy(model).double()
    rows = []
    for i in range(len(y)):
        out = net(x[i : i + 1].double(), mask.double())
        value = nn.functional.cross_entropy(out, y[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(value, list(net.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("n_test", [3, 6, 300])
def test_a_shared_mask_beside_the_batch_reaches_every_example_whole(tmp_path, n_test):
    """A ``(T, T)`` mask passed with a test batch of another size is common to all
    examples: the per-example path used to slice it by example (2-8% wrong scores, or
    a shape error for more examples than T). A mask of shape ``(1, T, T)`` is never
    taken for per-example rows, whatever the batch size (here also B = T)."""
    torch.manual_seed(0)
    model = _MaskedAttention()
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 1.0}, path)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 4, 3, generator=g), torch.randint(0, 2, (10,), generator=g)
    xt, yt = torch.randn(n_test, 4, 3, generator=g), torch.randint(0, 2, (n_test,), generator=g)
    mask = torch.triu(torch.full((4, 4), -1e9), 1)
    train = TensorDataset(x, mask.expand(10, 4, 4), y)  # the mask of each training item
    t = TracInCP(model, train, [str(path)], loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                 batch_size=5, sample_wise_grads_per_batch=True)  # fmt: skip
    expected = _masked_loop(model, xt, mask, yt) @ _masked_loop(model, x, mask, y).T
    assert_close(t.influence((xt, mask), yt), expected)
    if n_test == 3:  # four examples as many as the mask's rows: shared only as (1, T, T)
        xt4, yt4 = torch.cat([xt, x[:1]]), torch.cat([yt, y[:1]])
        want = _masked_loop(model, xt4, mask, yt4) @ _masked_loop(model, x, mask, y).T
        assert_close(t.influence((xt4, mask[None]), yt4), want)


def test_a_batch_sampler_of_some_examples_defines_the_training_set(tmp_path):
    """A DataLoader whose own batch_sampler picks 9 of 13 examples: the training set is
    those 9, in the sampler's order (the length used to be taken from the dataset and
    the second checkpoint's pass refused); scores equal the loop's columns for them."""
    case = make_case("mlp", tmp_path, n_train=13)
    order = [[0, 1, 2, 3], [5, 7, 9], [12, 10]]
    loader = DataLoader(case.dataset, batch_sampler=order)
    picked = [i for batch in order for i in batch]
    paths = [str(p) for p in case.checkpoints]
    loss = nn.CrossEntropyLoss(reduction="sum")
    expected = reference_scores(case)[:, picked]
    for t in (
        TracInCP(case.model, loader, paths, loss_fn=loss, sample_wise_grads_per_batch=True),
        TracInCPFast(case.model, "fc2", loader, paths, loss_fn=loss),
        TracInCPFastRandProj(case.model, "fc2", loader, paths, loss_fn=loss),
    ):
        layers = None if isinstance(t, TracInCP) else ["fc2"]
        want = expected if layers is None else reference_scores(case, layers)[:, picked]
        if isinstance(t, TracInCPFastRandProj):
            got = t.influence(case.test_inputs, case.test_labels, k=None)
        else:
            got = t.influence(case.test_inputs, case.test_labels)
            assert_close(t.self_influence(), reference_self(case, layers)[picked])
        assert_close(got, want)


def test_a_one_shot_batch_sampler_is_refused(tmp_path):
    case = make_case("mlp", tmp_path, n_train=13)
    paths = [str(p) for p in case.checkpoints]
    one_shot = DataLoader(case.dataset, batch_sampler=iter([[0, 1, 2], [3, 4]]))
    with pytest.raises(InvalidArgumentError, match="batch_sampler is a one-shot iterator"):
        TracInCP(case.model, one_shot, paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                 sample_wise_grads_per_batch=True)  # fmt: skip


class _StringLabels(Dataset):
    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], ["zero", "one", "two"][int(self.y[i])]


class _NamedClassLoss(nn.Module):
    """Cross-entropy over labels given as class names (a list of strings per batch)."""

    reduction = "sum"

    def forward(self, out, names):
        targets = torch.tensor([["zero", "one", "two"].index(n) for n in names])
        return nn.functional.cross_entropy(out, targets, reduction="sum")


@pytest.mark.filterwarnings("ignore:.*torch.func.vmap could not run this model")
def test_labels_given_as_a_list_of_strings_are_taken_per_example(tmp_path):
    """Class names as labels, for a loss that maps them to classes: every path that takes
    one example at a time (the strategy check, the per-example loop) takes that example's
    name (all of them reached the loss, which then failed on mismatched sizes); the scores
    equal those of the same data with integer labels and plain cross-entropy."""
    case = make_case("cnn", tmp_path, n_train=10)  # a conv layer and the generic path
    paths = [str(p) for p in case.checkpoints]
    names = _StringLabels(case.train_inputs[0], case.train_labels)
    t = TracInCP(case.model, names, paths, loss_fn=_NamedClassLoss(), batch_size=4,
                 sample_wise_grads_per_batch=True)  # fmt: skip
    test_names = [["zero", "one", "two"][int(v)] for v in case.test_labels]
    assert_close(t.influence(case.test_inputs, test_names), reference_scores(case))
    assert_close(t.self_influence(), reference_self(case))


class _Tokenizing(nn.Module):
    """Takes a tuple of words (one per example) and, optionally, a float tensor beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(26, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)

    def forward(self, words, extra=None):
        ids = torch.tensor([[ord(c) - 97 for c in (w * 5)[:5]] for w in words])
        h = self.norm(self.emb(ids).mean(1))
        if extra is not None:
            h = h + extra
        return self.out(torch.tanh(h))


class _Words(Dataset):
    def __init__(self, words, labels, extra=None) -> None:
        self.words, self.labels, self.extra = words, labels, extra

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i):
        if self.extra is None:
            return self.words[i], self.labels[i]
        return self.words[i], self.extra[i], self.labels[i]


@pytest.mark.parametrize("with_tensor", [False, True], ids=["strings-only", "strings-and-tensor"])
@pytest.mark.parametrize("method", ["cp-none", "cp-sum", "fast"])
def test_inputs_with_one_string_per_example(tmp_path, method, with_tensor):
    """A model that tokenizes a tuple of words itself: the words are cut per example
    like tensor rows (the strategy check, the per-example loop). Before, every example
    alone was handed all the batch's words: torch's loss raised on B outputs for 1 label."""
    import copy

    torch.manual_seed(0)
    model = _Tokenizing()
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    words = ["abc", "b", "ccdd", "d", "eeee", "fa", "gbc", "hh", "ia"]
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (9,), generator=g)
    extra = torch.randn(9, 4, generator=g) if with_tensor else None
    test_words, test_labels = ["bcd", "aa"], torch.tensor([2, 0])
    test_extra = torch.randn(2, 4, generator=g) if with_tensor else None

    ref = copy.deepcopy(model).double()
    names = (
        ["out.weight", "out.bias"] if method == "fast" else [n for n, _ in ref.named_parameters()]
    )
    params = [dict(ref.named_parameters())[n] for n in names]

    def grads(ws, xs, ys):
        rows = []
        for i in range(len(ws)):
            ex = None if xs is None else xs[i : i + 1].double()
            loss = nn.functional.cross_entropy(ref(ws[i : i + 1], ex), ys[i : i + 1])
            rows.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    want = grads(test_words, test_extra, test_labels) @ grads(words, extra, labels).T
    data = _Words(words, labels, extra)
    if method == "fast":
        obj = TracInCPFast(
            model, "out", data, [path], loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4
        )
    else:
        reduction = "none" if method == "cp-none" else "sum"
        obj = TracInCP(
            model,
            data,
            [path],
            loss_fn=nn.CrossEntropyLoss(reduction=reduction),
            batch_size=4,
            sample_wise_grads_per_batch=reduction == "sum",
        )
    inputs = (test_words,) if not with_tensor else (test_words, test_extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the loop's notice
        if with_tensor:
            got = obj.influence(inputs, test_labels)
        else:
            got = obj.influence(inputs, test_labels, unpack_inputs=True)
    assert_close(got, want)


@pytest.mark.parametrize(
    "make",
    [
        lambda y: y.numpy().astype(np.int32),
        lambda y: y.numpy().astype(np.uint16),
        lambda y: [np.int32(v) for v in y.tolist()],
    ],
    ids=["int32-array", "uint16-array", "int32-list"],
)
def test_numpy_integer_targets_are_class_indices(tmp_path, make):
    """NumPy integers of any width are int64 class indices (NumPy's default integer is 32
    bits on Windows); before, an int32 array stayed int32 and cross-entropy refused it."""
    case = make_case("mlp", tmp_path)
    obj = TracInCP(
        case.model, case.dataset, case.checkpoints, loss_fn=case.loss_fn("none"), batch_size=4
    )
    want = obj.influence(case.test_inputs, case.test_labels)
    assert torch.equal(obj.influence(case.test_inputs, make(case.test_labels)), want)


def test_a_loader_that_drops_its_last_batch_says_so(tmp_path):
    """drop_last=True never yields the last examples: they are left out of the results
    (the loader's batches are the examples, as with a batch sampler that picks some),
    and a warning names how many (before: silently). The scores of the others are those
    of the full training set's first columns."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss(reduction="none")
    full = TracInCP(net, data, [str(tmp_path / "net.pt")], loss_fn=loss, batch_size=4)
    with pytest.warns(
        UserWarning, match=r"train_dataset .*drop_last=True: its last 2 examples \(of 10\)"
    ):
        dropped = TracInCP(
            net,
            DataLoader(data, batch_size=4, drop_last=True),
            [str(tmp_path / "net.pt")],
            loss_fn=loss,
        )
    torch.testing.assert_close(dropped.self_influence(), full.self_influence()[:8])
    tests = DataLoader(TensorDataset(x, y), batch_size=2, drop_last=True)
    with pytest.warns(UserWarning, match=r"inputs .*drop_last=True: its last 1 example \(of 5\)"):
        scores = full.influence(tests, k=None)
    torch.testing.assert_close(scores, full.influence((x[:4],), y[:4], k=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        TracInCP(
            net,
            DataLoader(data, batch_size=5, drop_last=True),
            [str(tmp_path / "net.pt")],
            loss_fn=loss,
        )


def _dropping_loader(data, size, drop_last=True):
    """A DataLoader batched by a BatchSampler of the user's: loader.drop_last is False."""
    return DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), size, drop_last))


def test_a_batch_sampler_that_drops_its_last_batch_says_so(tmp_path):
    """A batch_sampler=BatchSampler(..., drop_last=True) drops the last partial batch as
    DataLoader(drop_last=True) does, but loader.drop_last is False: it was not warned
    about. Now it is, naming how many and how to keep them, for train and test loaders;
    the scores are those over the examples it yields."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    path = [str(tmp_path / "net.pt")]
    torch.save(net.state_dict(), path[0])
    x_train, y_train = torch.randn(10, 4), torch.randint(0, 3, (10,))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss(reduction="none")
    kept = TracInCP(net, TensorDataset(x_train[:8], y_train[:8]), path, loss_fn=loss, batch_size=4)
    with pytest.warns(
        UserWarning,
        match=r"train_dataset .*batch_sampler is a BatchSampler with drop_last=True: its last "
        r"2 examples \(of 10\) .*give the BatchSampler drop_last=False",
    ):
        dropped = TracInCP(
            net, _dropping_loader(TensorDataset(x_train, y_train), 4), path, loss_fn=loss
        )
    torch.testing.assert_close(dropped.self_influence(), kept.self_influence())
    torch.testing.assert_close(dropped.influence((x,), y, k=None), kept.influence((x,), y, k=None))
    with pytest.warns(
        UserWarning,
        match=r"inputs .*batch_sampler is a BatchSampler with drop_last=True: its last "
        r"1 example \(of 5\)",
    ):
        scores = kept.influence(_dropping_loader(TensorDataset(x, y), 2), k=None)
    torch.testing.assert_close(scores, kept.influence((x[:4],), y[:4], k=None))


def test_a_batch_sampler_that_drops_nothing_is_not_warned_about(tmp_path):
    """drop_last=False, or a length the batch size divides: nothing is dropped, no warning."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    path = [str(tmp_path / "net.pt")]
    torch.save(net.state_dict(), path[0])
    ten = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    twelve = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    loss = nn.CrossEntropyLoss(reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = TracInCP(net, _dropping_loader(ten, 4, drop_last=False), path, loss_fn=loss)
        TracInCP(net, _dropping_loader(twelve, 4), path, loss_fn=loss)
        kept.influence(_dropping_loader(TensorDataset(*twelve[:4]), 2), k=None)
    assert kept.self_influence().shape == (10,)


class _Batches:
    """A batch sampler of the user's, not torch's: consecutive batches of ``batch_size``
    over ``sampler``, the last partial one dropped with ``drop_last``."""

    def __init__(self, sampler, batch_size, drop_last) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class _NoLength(torch.utils.data.Sampler):
    """A reusable sampler without ``len()``."""

    def __init__(self, n) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def test_other_batch_samplers_are_warned_about_by_their_lengths_alone(tmp_path):
    """A batch sampler of the user's with batch_size, drop_last, a sampler and len() that
    tell it drops examples is warned about; one whose sampler has no len() is not (nor is
    anything read to find out), and is scored as it is."""
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    path = [str(tmp_path / "net.pt")]
    torch.save(net.state_dict(), path[0])
    data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    loss = nn.CrossEntropyLoss(reduction="none")
    custom = DataLoader(data, batch_sampler=_Batches(SequentialSampler(data), 4, True))
    with pytest.warns(
        UserWarning, match=r"batch_sampler is a _Batches with drop_last=True: its last 2 examples"
    ):
        TracInCP(net, custom, path, loss_fn=loss)
    for batches in (_Batches(_NoLength(10), 4, True), BatchSampler(_NoLength(10), 4, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t = TracInCP(net, DataLoader(data, batch_sampler=batches), path, loss_fn=loss)
        assert t.self_influence().shape == (8,)
