"""Edge cases of how training data and test inputs reach the engine.

Each test compares against a plain DataLoader over the same dataset, a float64
per-example autograd loop written here, or the documented error.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset

from proponents import TracInCP
from proponents.data import make_loader
from proponents.errors import BatchFormatError


def _model_and_checkpoints(folder):
    """A tiny MLP and two checkpoints ``(path, learning_rate)`` of it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    saved = []
    for c, lr in enumerate([0.5, 1.5]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        path = folder / f"ckpt-{c}.pt"
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, path)
        saved.append((path, lr))
    return model, saved


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loop_scores(model, saved, train, test):
    """Float64 ``(n_test, n_train)``: sum over checkpoints of lr * <g_test, g_train>, each
    gradient that of one example's cross-entropy alone."""

    def grads(m, x, y):
        rows = []
        for i in range(x.shape[0]):
            loss = nn.functional.cross_entropy(m(x[i : i + 1].double()), y[i : i + 1])
            g = torch.autograd.grad(loss, list(m.parameters()))
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows)

    total = torch.zeros(test[0].shape[0], train[0].shape[0], dtype=torch.float64)
    for path, lr in saved:
        m = copy.deepcopy(model).double()
        m.load_state_dict(torch.load(path)["model_state_dict"])
        m.eval()
        total += lr * grads(m, *test) @ grads(m, *train).T
    return total


def _assert_close(actual, expected, rtol=1e-4):
    actual = actual.detach().double()
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rtol * expected.abs().max()


def _outcome(loader):
    """The batches a loader yields, or the type and text of the error it raises."""
    try:
        return [list(batch) for batch in loader]
    except Exception as err:  # noqa: BLE001 - the error itself is what is compared
        return (type(err), str(err))


@pytest.mark.parametrize(
    "indices",
    [
        [True, False] * 3,
        torch.tensor([2.0, 0.0, 1.0]),
        torch.tensor([1, 0, 2], dtype=torch.uint8),
        torch.tensor([[0, 1], [2, 3], [4, 5]]),
    ],
    ids=["bool-mask", "float-tensor", "uint8-tensor", "2d-tensor"],
)
def test_subset_indices_that_are_not_row_numbers_load_as_a_plain_dataloader(indices):
    x, y = _data(6, 1)
    data = Subset(TensorDataset(x, y), indices)
    ours = _outcome(make_loader(data, 2, "train_dataset"))
    plain = _outcome(DataLoader(data, batch_size=2))
    if isinstance(plain, tuple):
        assert ours == plain
        return
    assert not isinstance(ours, tuple), ours
    assert len(ours) == len(plain)
    for got, want in zip(ours, plain):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_an_out_of_range_negative_subset_index_is_named_as_given():
    x, y = _data(10, 2)
    data = Subset(TensorDataset(x, y), [0, -11])
    with pytest.raises(IndexError, match="-11"):
        list(DataLoader(data, batch_size=2))
    with pytest.raises(IndexError, match="-11"):
        list(make_loader(data, 2, "train_dataset"))


class _Stream(IterableDataset):
    """Yields ``(x[i], y[i])``; ``__len__`` says ``hint``, which need not be true."""

    def __init__(self, x, y, hint):
        self.x, self.y, self.hint = x, y, hint

    def __iter__(self):
        return iter(zip(self.x, self.y))

    def __len__(self):
        return self.hint


@pytest.mark.parametrize("hint", [5, 20])
def test_an_iterable_dataset_whose_len_is_only_a_hint_is_scored_as_it_streams(tmp_path, hint):
    model, saved = _model_and_checkpoints(tmp_path)
    x, y = _data(10, 3)
    xt, yt = _data(4, 4)
    loader = DataLoader(_Stream(x, y, hint), batch_size=3, drop_last=True)
    t = TracInCP(
        model, loader, [p for p, _ in saved], loss_fn=nn.CrossEntropyLoss(reduction="none")
    )
    with warnings.catch_warnings():
        # torch's own note that the stream yields more than its __len__ says
        warnings.filterwarnings("ignore", "Length of IterableDataset", UserWarning)
        scores = t.influence(xt, yt)
    # drop_last keeps the 3 full batches: the first 9 examples
    _assert_close(scores, _loop_scores(model, saved, (x[:9], y[:9]), (xt, yt)))


def test_a_numpy_integer_batch_size_is_a_batch_size(tmp_path):
    model, saved = _model_and_checkpoints(tmp_path)
    x, y = _data(10, 5)
    xt, yt = _data(3, 6)
    data = TensorDataset(x, y)
    loader = make_loader(data, np.int64(4), "train_dataset")
    assert loader.batch_size == 4 and type(loader.batch_size) is int
    plain = list(DataLoader(data, batch_size=4))
    assert [len(b[1]) for b in loader] == [len(b[1]) for b in plain] == [4, 4, 2]
    t = TracInCP(
        model,
        data,
        [p for p, _ in saved],
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=np.int64(4),
    )
    _assert_close(t.influence(xt, yt), _loop_scores(model, saved, (x, y), (xt, yt)))


def test_a_dataset_given_as_test_inputs_is_refused_with_the_fix(tmp_path):
    model, saved = _model_and_checkpoints(tmp_path)
    x, y = _data(6, 7)
    t = TracInCP(
        model,
        TensorDataset(x, y),
        [p for p, _ in saved],
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=3,
    )
    test = TensorDataset(*_data(4, 8))
    with pytest.raises(BatchFormatError, match=r"inputs is a TensorDataset.*DataLoader\(inputs"):
        t.influence(test)
    # the fix the message names gives the scores of the loop
    scores = t.influence(DataLoader(test, batch_size=64))
    _assert_close(scores, _loop_scores(model, saved, (x, y), test.tensors))


def test_a_batch_sampler_that_shuffles_is_refused_like_shuffle_true(tmp_path):
    """DataLoader(batch_sampler=BatchSampler(RandomSampler(ds), ...)) shuffles exactly as
    shuffle=True does; before, it was accepted and the indices named other examples. The
    same batch sampler over a SequentialSampler is served, with the loop's scores."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    from proponents import SimilarityInfluence, TracInCPFast
    from proponents.errors import InvalidArgumentError

    model, saved = _model_and_checkpoints(tmp_path)
    paths = [p for p, _ in saved]
    x, y = _data(12, 1)
    xt, yt = _data(3, 2)
    ds = TensorDataset(x, y)

    def shuffled():
        return DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, False))

    pattern = "shuffling DataLoader .through its batch_sampler"
    with pytest.raises(InvalidArgumentError, match=pattern):
        TracInCP(model, shuffled(), paths, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(InvalidArgumentError, match=pattern):
        TracInCPFast(model, "2", shuffled(), paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(InvalidArgumentError, match=pattern):
        SimilarityInfluence(model, "0", shuffled(), tmp_path / "acts")
    tracin = TracInCP(model, ds, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=4)
    with pytest.raises(InvalidArgumentError, match=pattern):
        tracin.self_influence(shuffled())
    with pytest.raises(InvalidArgumentError, match=pattern):
        tracin.influence(shuffled())

    in_order = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 4, False))
    scores = TracInCP(
        model, in_order, paths, loss_fn=nn.CrossEntropyLoss(reduction="none")
    ).influence((xt,), yt)
    _assert_close(scores, _loop_scores(model, saved, (x, y), (xt, yt)))


class _Jittered(torch.utils.data.Dataset):
    """Examples with a random augmentation drawn from torch's generator (in the workers)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.5 * torch.randn(3), self.y[i]


@pytest.mark.parametrize("workers", ["persistent", "own generator"])
def test_workers_give_every_checkpoint_the_draws_of_the_first_pass(tmp_path, workers):
    """Before, persistent workers carried their random state over to the next checkpoint's
    pass, and a loader seeded by its own generator drew new worker seeds from it at each
    pass: each checkpoint scored other augmented inputs. The scores must be the float64
    loop's on the inputs of one pass of the loader, read from the state the call began in."""
    model, saved = _model_and_checkpoints(tmp_path)
    paths = [p for p, _ in saved]
    x, y = _data(8, 3)
    xt, yt = _data(2, 4)
    kwargs = {"persistent_workers": True}
    if workers == "own generator":
        kwargs = {"generator": torch.Generator().manual_seed(5)}
    loader = DataLoader(_Jittered(x, y), batch_size=4, num_workers=2, **kwargs)
    generator = loader.generator
    before = None if generator is None else generator.get_state()
    torch.manual_seed(11)
    tracin = TracInCP(model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    got = tracin.influence((xt,), yt)
    again = tracin.influence((xt,), yt)
    if generator is not None:  # the call leaves the loader's generator as it found it
        assert torch.equal(generator.get_state(), before)
    # the reference: one pass of a plain copy of the loader from the same states
    torch.manual_seed(11)
    plain = DataLoader(_Jittered(x, y), batch_size=4, num_workers=2, **kwargs)
    if generator is not None:
        plain.generator.set_state(before)
    seen = [b for b in plain]
    drawn = (torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen]))
    assert not torch.allclose(drawn[0], x)  # the augmentation does draw
    _assert_close(got, _loop_scores(model, saved, drawn, (xt, yt)))
    assert torch.equal(got, again)


def test_a_list_of_tensors_and_examples_of_different_shapes_get_errors_that_say_what_to_do(
    tmp_path,
):
    """Before, both ended in torch's own "stack expects each tensor to be equal size"
    RuntimeError from inside the DataLoader."""
    from proponents.errors import ArgumentTypeError

    model, saved = _model_and_checkpoints(tmp_path)
    paths = [p for p, _ in saved]
    x, y = _data(6, 5)
    loss = nn.CrossEntropyLoss(reduction="none")
    with pytest.raises(ArgumentTypeError, match=r"list of tensors.*TensorDataset\(\*tensors\)"):
        TracInCP(model, [x, y], paths, loss_fn=loss)

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3 if i < 2 else 4), 0

    for workers in (0, 2):
        tracin = TracInCP(
            model, DataLoader(Ragged(), batch_size=4, num_workers=workers), paths, loss_fn=loss
        )
        with pytest.raises(BatchFormatError, match="different shapes.*collate_fn"):
            tracin.self_influence()


def test_numpy_test_inputs_are_named_as_numpy(tmp_path):
    """Before, NumPy test inputs were told that no model input *or label* was a tensor with
    a batch dimension, beside tensor labels that had one."""
    model, saved = _model_and_checkpoints(tmp_path)
    x, y = _data(6, 6)
    tracin = TracInCP(
        model,
        TensorDataset(x, y),
        [p for p, _ in saved],
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
    )
    for given in ((x[:2].numpy(),), x[:2].numpy()):
        with pytest.raises(BatchFormatError, match=r"NumPy arrays.*torch.from_numpy"):
            tracin.influence(given, y[:2])
    want = tracin.influence((x[:2],), y[:2])  # the same rows as tensors are served
    _assert_close(want, _loop_scores(model, saved, (x, y), (x[:2], y[:2])))
