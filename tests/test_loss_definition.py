"""The loss of an example is ``loss_fn`` applied to that example alone (DESIGN.md §2).

Checked against a float64 loop that does exactly that, for losses whose "mean" is not a
plain mean over the batch (class weights, ignored labels) and for models whose examples
interact inside a batch, whatever call comes first (a one-example test batch cannot show
an interaction, so the strategies must still be verified on a larger batch).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from conftest import MLP
from proponents import TracInCP, TracInCPFast


def _checkpoints(model: nn.Module, folder, n: int = 2) -> tuple[list, list[float]]:
    g = torch.Generator().manual_seed(5)
    paths, lrs = [], [0.5, 1.25][:n]
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        path = folder / f"c{c}.pt"
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": lrs[c]}, path)
        paths.append(path)
    return paths, lrs


def _own_loss_grads(model, ckpt, x, y, loss_fn, layers) -> torch.Tensor:
    """Float64 gradients of ``loss_fn`` applied to each example alone; NaN for an example
    whose own loss is not finite (DESIGN.md §2), even where autograd's gradient is zero."""
    m = copy.deepcopy(model).double().eval()
    m.load_state_dict(torch.load(ckpt, weights_only=True)["model_state_dict"])
    m.double()
    fn = copy.deepcopy(loss_fn)
    if isinstance(fn, nn.Module):
        fn = fn.double()
    if isinstance(fn, functools.partial):  # class weights in float64 too
        bound = {
            k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in fn.keywords.items()
        }
        fn = functools.partial(fn.func, *fn.args, **bound)
    params = [p for name in layers for p in m.get_submodule(name).parameters()]
    rows = []
    for i in range(len(y)):
        value = fn(m(x[i : i + 1].double()), y[i : i + 1])
        row = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])
        rows.append(row if bool(torch.isfinite(value)) else torch.full_like(row, float("nan")))
    return torch.stack(rows)


def _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, layers):
    scores = self_inf = 0
    for ckpt, lr in zip(paths, lrs):
        gr = _own_loss_grads(model, ckpt, xs, ys, loss_fn, layers)
        gt = _own_loss_grads(model, ckpt, xt, yt, loss_fn, layers)
        scores = scores + lr * gt @ gr.T
        self_inf = self_inf + lr * gr.pow(2).sum(1)
    return scores, self_inf


def _tracin(method: str, model, data, paths, loss_fn, batch_size: int):
    """TracInCPFast on ``fc2`` for ``"fast"``, else TracInCP over a reducing loss."""
    if method == "fast":
        return TracInCPFast(model, "fc2", data, paths, loss_fn=loss_fn, batch_size=batch_size)
    return TracInCP(
        model,
        data,
        paths,
        loss_fn=loss_fn,
        batch_size=batch_size,
        sample_wise_grads_per_batch=True,
    )


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    scale = want[ok].abs().max()
    assert float((got[ok] - want[ok]).abs().max()) <= 2e-5 * float(scale)


@pytest.mark.parametrize("method", ["tracincp", "fast"])
@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0])),
        nn.CrossEntropyLoss(ignore_index=1),
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0]), label_smoothing=0.1),
    ],
    ids=["class-weights", "ignore-index", "weights-and-smoothing"],
)
def test_mean_losses_that_divide_by_label_weights(tmp_path, method, loss_fn):
    """Class weights or ignored labels under reduction="mean": each example's own loss, for
    every batch size, whether the first call scores one test example or self-influence.
    (Before, the batch mean times the batch size was used: off by B * w_y / sum(w) per
    example, unnoticed when the first batch checked had one example.) An example whose
    only label is ignored has an undefined loss of its own (0/0): NaN, with a warning."""
    torch.manual_seed(0)
    model = MLP()
    paths, lrs = _checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(23, 6, generator=g), torch.randint(0, 3, (23,), generator=g)
    xt, yt = torch.randn(1, 6, generator=g), torch.tensor([2])
    layers = ["fc2"] if method == "fast" else ["fc1", "fc2"]
    want_scores, want_self = _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, layers)
    train = TensorDataset(xs, ys)
    for batch_size in (1, 5, 23):
        obj = _tracin(method, model, train, paths, loss_fn, batch_size)
        for call, want in (
            (lambda o=obj: o.influence((xt,), yt), want_scores),
            (obj.self_influence, want_self),
        ):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _assert_same(call(), want)
            warned = any("non-finite" in str(w.message) for w in caught)
            assert warned == bool(want.isnan().any())


class _BatchStatsCNN(nn.Module):
    """Normalises with the statistics of the batch it is given, also in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3, track_running_stats=False)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


class _Column(nn.Module):
    """A regressor returning ``(B, 1)``, compared with ``(B,)`` targets (broadcasting)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("first", ["one-test-example", "self-influence"])
@pytest.mark.parametrize("kind", ["batch-statistics", "broadcast-loss"])
def test_examples_interacting_in_a_batch_are_seen_after_a_one_example_batch(tmp_path, kind, first):
    """The strategies are verified on a batch of two or more examples even when the first
    call differentiates a single test example (before, that one-example check passed and
    every later training batch used a fast path that mixed the examples of a batch)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if kind == "batch-statistics":
        model, final = _BatchStatsCNN(), "fc"
        xs, xt = torch.randn(8, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
        ys, yt = torch.randint(0, 3, (8,), generator=g), torch.tensor([1])
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        layers = ["conv", "norm", "fc"]
    else:
        model, final = _Column(), "fc2"
        xs, xt = torch.randn(12, 6, generator=g), torch.randn(1, 6, generator=g)
        ys, yt = torch.randn(12, generator=g), torch.randn(1, generator=g)
        loss_fn = nn.MSELoss(reduction="sum")
        layers = ["fc1", "fc2"]
    paths, lrs = _checkpoints(model, tmp_path)
    train = TensorDataset(xs, ys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's broadcasting warning
        want_scores, want_self = _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, layers)
        want_fast_scores, want_fast_self = _reference(
            model, paths, lrs, xs, ys, xt, yt, loss_fn, [final]
        )
        for obj, scores, self_inf in (
            (
                TracInCP(
                    model,
                    train,
                    paths,
                    loss_fn=loss_fn,
                    batch_size=4,
                    sample_wise_grads_per_batch=True,
                ),
                want_scores,
                want_self,
            ),
            (
                TracInCPFast(model, final, train, paths, loss_fn=loss_fn, batch_size=4),
                want_fast_scores,
                want_fast_self,
            ),
        ):
            if first == "one-test-example":
                _assert_same(obj.influence((xt,), yt), scores)
                _assert_same(obj.self_influence(), self_inf)
            else:
                _assert_same(obj.self_influence(), self_inf)
                _assert_same(obj.influence((xt,), yt), scores)


def _hinge_mean(out, y):
    """A perceptron loss averaged over the batch, with no ``reduction`` attribute."""
    return F.relu(-y * out[:, 0]).mean()


@pytest.mark.parametrize("method", ["tracincp", "fast"])
def test_an_unstated_mean_is_scored_by_each_examples_own_loss(tmp_path, method):
    """A loss without a ``reduction`` attribute or parameter that averages: each example's
    own loss is evaluated, so it is exact whatever the batch shows. Before, it was taken as
    a sum and only the first-batch check could catch it; here the first, middle and last
    rows satisfy the hinge (zero gradient, so any scaling agrees with them), the check
    passed, and every score came out B_train * B_test too small."""
    torch.manual_seed(0)
    model = _Column()
    paths, lrs = _checkpoints(model, tmp_path, n=1)
    m = copy.deepcopy(model)
    m.load_state_dict(torch.load(paths[0], weights_only=True)["model_state_dict"])
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(10, 6, generator=g)
    with torch.no_grad():
        ys = torch.sign(m(xs)[:, 0])
    ys[[1, 3, 5, 6, 7, 8, 9]] *= -1  # a loss for all rows but 0, 2 and 4 (= 5 // 2)
    xt, yt = torch.randn(2, 6, generator=g), torch.tensor([1.0, -1.0])
    layers = ["fc2"] if method == "fast" else ["fc1", "fc2"]
    want_scores, want_self = _reference(model, paths, lrs, xs, ys, xt, yt, _hinge_mean, layers)
    others = [1, 3, 5, 6, 7, 8, 9]
    assert float(want_self[[0, 2, 4]].abs().max()) == 0 < float(want_self[others].min())
    for call, want in (("influence", want_scores), ("self_influence", want_self)):
        train = TensorDataset(xs, ys)
        obj = _tracin(method, model, train, paths, _hinge_mean, 5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = obj.influence((xt,), yt) if call == "influence" else obj.self_influence()
        _assert_same(got, want)
        # the batched path serves it: nothing had to move to the per-example one
        assert set(obj._engine.strategies.values()) == {"linear"}


@pytest.mark.parametrize(
    "loss_fn",
    [functools.partial(F.cross_entropy, reduction="mean"), F.cross_entropy],
    ids=["partial", "default"],
)
def test_a_reduction_stated_by_the_signature_is_used(tmp_path, loss_fn):
    """``partial(F.cross_entropy, reduction="mean")`` and ``F.cross_entropy`` itself average;
    their signature says so, and the batched path serves them (no fall-back, no warning)
    with the scores of each example's own loss."""
    torch.manual_seed(0)
    model = MLP()
    paths, lrs = _checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(4)
    xs, ys = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    xt, yt = torch.randn(3, 6, generator=g), torch.randint(0, 3, (3,), generator=g)
    want_scores, _ = _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, ["fc1", "fc2"])
    obj = _tracin("tracincp", model, TensorDataset(xs, ys), paths, loss_fn, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(obj.influence((xt,), yt), want_scores)
    assert set(obj._engine.strategies.values()) == {"linear"}


class _TokenLoss(nn.Module):
    """A user's wrapper: states "mean", averages over the labels it does not ignore."""

    reduction = "mean"

    def forward(self, logits, target):
        return F.cross_entropy(logits, target)


@pytest.mark.parametrize("method", ["tracincp", "fast"])
def test_a_wrapped_mean_with_ignored_labels_only_in_a_later_batch(tmp_path, method):
    """The first batch has no ignored label, so the check sees a plain mean; a later batch
    with a -100 label is averaged over fewer entries. Each example's own loss is used for
    such a batch (before: its other examples were scaled by B / kept, (4/3)^2 here), and
    the example whose only label is ignored has the undefined loss 0/0 (NaN, warned)."""
    torch.manual_seed(0)
    model = MLP()
    paths, lrs = _checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(6)
    xs, ys = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    ys[5] = -100
    xt, yt = torch.randn(2, 6, generator=g), torch.tensor([0, 2])
    layers = ["fc2"] if method == "fast" else ["fc1", "fc2"]
    loss_fn = _TokenLoss()
    want_scores, want_self = _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, layers)
    assert bool(want_self.isnan().any())
    for call, want in (("influence", want_scores), ("self_influence", want_self)):
        train = TensorDataset(xs, ys)
        obj = _tracin(method, model, train, paths, loss_fn, 4)
        with pytest.warns(RuntimeWarning, match=r"training examples \[5\]"):
            got = obj.influence((xt,), yt) if call == "influence" else obj.self_influence()
        _assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_class_weights_with_labels_of_a_small_integer_dtype(tmp_path, dtype):
    """Class weights looked up with uint8 labels: a uint8 index is a boolean mask to
    torch, which raised (or, with as many examples as classes, picked the wrong weights)."""
    torch.manual_seed(0)
    model = MLP()
    paths, lrs = _checkpoints(model, tmp_path)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0]))
    g = torch.Generator().manual_seed(7)
    xs, ys = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
    xt, yt = torch.randn(2, 6, generator=g), torch.tensor([0, 2])
    want, _ = _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, ["fc2"])
    obj = TracInCPFast(
        model, "fc2", TensorDataset(xs, ys.to(dtype)), paths, loss_fn=loss_fn, batch_size=6
    )
    _assert_same(obj.influence((xt,), yt.to(dtype)), want)


@pytest.mark.parametrize(
    "loss_fn",
    [
        functools.partial(F.cross_entropy, weight=torch.tensor([1.0, 3.0, 0.5])),
        functools.partial(F.cross_entropy, ignore_index=2),
    ],
    ids=["partial-weight", "partial-ignore-index"],
)
def test_a_partial_with_class_weights_or_an_ignored_label(tmp_path, loss_fn):
    """A partial binding class weights or ``ignore_index`` averages over label weights, not
    examples. The first batch holds one class only (where a weighted mean equals a plain
    one), so only reading the bound keywords gives each example its own loss; before, a
    read "mean" scaled every batch by B (0.97 relative error, or 4/3 on the batch that
    holds the ignored label)."""
    torch.manual_seed(0)
    model = MLP()
    paths, lrs = _checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(8)
    xs = torch.randn(8, 6, generator=g)
    ys = torch.tensor([0, 0, 0, 0, 1, 2, 1, 0])
    xt, yt = torch.randn(2, 6, generator=g), torch.tensor([1, 0])
    want_scores, want_self = _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, ["fc1", "fc2"])
    obj = _tracin("tracincp", model, TensorDataset(xs, ys), paths, loss_fn, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the NaN of the ignored example
        _assert_same(obj.influence((xt,), yt), want_scores)
        _assert_same(obj.self_influence(), want_self)


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return {"logits": self.fc(x)}


def test_a_mean_loss_over_a_dict_output_with_an_ignored_label(tmp_path):
    """Evaluating each example's own loss cuts a dict output per example (it sliced the
    dict itself: TypeError)."""
    torch.manual_seed(0)
    model = _DictOut()
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)

    class Loss(nn.Module):
        reduction = "mean"

        def forward(self, out, y):
            return F.cross_entropy(out["logits"], y)

    g = torch.Generator().manual_seed(9)
    xs, ys = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    ys[5] = -100
    obj = TracInCP(
        model,
        TensorDataset(xs, ys),
        [path],
        loss_fn=Loss(),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    ref = copy.deepcopy(model).double()
    want = []
    for i in range(8):
        value = F.cross_entropy(ref(xs[i : i + 1].double())["logits"], ys[i : i + 1])
        row = torch.cat([t.reshape(-1) for t in torch.autograd.grad(value, list(ref.parameters()))])
        want.append(row.pow(2).sum() if bool(torch.isfinite(value)) else torch.tensor(float("nan")))
    with pytest.warns(RuntimeWarning, match=r"training examples \[5\]"):
        _assert_same(obj.self_influence(), torch.stack(want))


def test_a_sorting_forward_is_caught_also_when_an_example_has_no_loss(tmp_path):
    """An example whose only label is ignored has NaN gradients; the reversed-batch check
    used to give up on the whole layer at the first non-finite row, so a forward that
    sorts the batch around a layer was served by the fast path (0.6 relative error)."""

    class Sorting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            order = torch.argsort(x[:, 0])  # b sees the rows sorted by their first input
            return self.b(torch.tanh(self.a(x))[order])[torch.argsort(order)]

    torch.manual_seed(0)
    model = Sorting()
    paths, lrs = _checkpoints(model, tmp_path, n=1)
    g = torch.Generator().manual_seed(10)
    xs = torch.randn(7, 6, generator=g)
    # sorting swaps rows 2 and 5 only, which no row check looks at (0, 3, 6; and 1, 4, 6
    # among the rows with a gradient): only the reversed pass can see it
    xs[:, 0] = torch.tensor([0.0, 1, 5, 3, 4, 2, 6])
    ys = torch.tensor([-100, 1, 2, 0, 1, 2, 0])
    loss_fn = nn.CrossEntropyLoss()
    _, want_self = _reference(model, paths, lrs, xs, ys, xs[:1], ys[:1], loss_fn, ["a", "b"])
    obj = _tracin("tracincp", model, TensorDataset(xs, ys), paths, loss_fn, 7)
    with pytest.warns(RuntimeWarning, match=r"training examples \[0\]"):
        _assert_same(obj.self_influence(), want_self)


@pytest.mark.parametrize("layers", [None, ["0"]])
def test_an_undefined_loss_stays_nan_below_a_relu_that_is_off(tmp_path, layers):
    """The NaN that marks an example without a loss of its own (its only label ignored,
    under "mean") was sent back from the model output; a ReLU that is off for the example
    turned it into 0 for the layers below (finite 0 scores, no warning). It is now put on
    the gradients at each differentiated layer itself."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.zero_()
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    loss_fn = nn.CrossEntropyLoss(ignore_index=1)
    x, y = torch.tensor([[1.0, 2.0], [2.0, 0.5]]), torch.tensor([0, 2])
    xt, yt = torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), torch.tensor([1, 1])  # ReLUs off / on
    obj = TracInCP(
        model,
        TensorDataset(x, y),
        [path],
        layers=layers,
        loss_fn=loss_fn,
        batch_size=2,
        sample_wise_grads_per_batch=True,
    )
    with pytest.warns(RuntimeWarning, match=r"test examples \[0, 1\]"):
        scores = obj.influence((xt,), yt)
    assert torch.isnan(scores).all()
    with pytest.warns(RuntimeWarning, match=r"training examples \[0, 1\]"):
        assert torch.isnan(obj.self_influence((xt, yt))).all()


def _token_mean(out, target):
    """A wrapper that averages over the labels it keeps, stating nothing."""
    return F.cross_entropy(out, target)


@pytest.mark.parametrize("method", ["tracincp", "fast"])
def test_an_unstated_mean_with_ignored_labels_whatever_the_call_history(tmp_path, method):
    """The batches a check sees cannot show such a mean when at most one label counts in
    them; later batches were not compared again, so a first query with labels [-100, 1]
    left a second query scored a third too small. Each example's own loss is used now:
    both queries equal the float64 loop, the ignored examples NaN."""
    torch.manual_seed(0)
    model = MLP()
    paths, lrs = _checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(11)
    xs, ys = torch.randn(6, 6, generator=g), torch.tensor([0, -100, 2, 1, -100, 0])
    first_x, first_y = torch.randn(2, 6, generator=g), torch.tensor([-100, 1])
    second_x, second_y = torch.randn(3, 6, generator=g), torch.tensor([0, 1, 2])
    layers = ["fc2"] if method == "fast" else ["fc1", "fc2"]
    obj = _tracin(method, model, TensorDataset(xs, ys), paths, _token_mean, 1)
    for xt, yt in ((first_x, first_y), (second_x, second_y)):
        want, _ = _reference(model, paths, lrs, xs, ys, xt, yt, _token_mean, layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the ignored examples' NaN
            _assert_same(obj.influence((xt,), yt), want)


class _OneOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    "method, loss_fn",
    [
        ("tracincp", nn.MSELoss(reduction="sum")),
        ("tracincp", nn.L1Loss(reduction="mean")),
        ("fast", nn.MSELoss(reduction="sum")),
        ("fast", nn.HuberLoss(reduction="mean")),
        ("per-example", nn.MSELoss(reduction="none")),
    ],
)
@pytest.mark.parametrize("train_targets", ["column", "flat"])
def test_targets_that_broadcast_against_the_output_meet_only_their_own_example(
    tmp_path, method, loss_fn, train_targets
):
    """An ``(n, 1)`` output with ``(n,)`` targets: torch broadcasts the batch to ``(n, n)``
    differences (every example against every target, with a warning), while each example
    alone meets only its own target. Before, test batches (and per-example losses) were
    scored from the broadcast batch whenever the training batch the strategies were
    checked on had targets of the output's shape."""
    torch.manual_seed(0)
    model = _OneOutput()
    paths, lrs = _checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(9, 6, generator=g), torch.randn(9, generator=g)
    xt, yt = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    if train_targets == "column":  # (n, 1) like the output: only the test side broadcasts
        ys = ys[:, None]
    if method == "per-example":
        tracin = TracInCP(
            model,
            TensorDataset(xs, ys),
            paths,
            loss_fn=loss_fn,
            batch_size=4,
            sample_wise_grads_per_batch=False,
        )
        reference_loss = nn.MSELoss(reduction="sum")
    else:
        tracin = _tracin(method, model, TensorDataset(xs, ys), paths, loss_fn, 4)
        reference_loss = loss_fn
    layers = ["fc2"] if method == "fast" else ["fc1", "fc2"]
    want, want_self = _reference(
        model, paths, lrs, xs, ys.double(), xt, yt.double(), reference_loss, layers
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "target size" warning
        got = tracin.influence((xt,), yt)
        got_self = tracin.self_influence()
    _assert_same(got, want)
    _assert_same(got_self, want_self)


@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    note: str = "kept"


_Pair = collections.namedtuple("_Pair", ["logits", "hidden"])


@dataclasses.dataclass
class _Late:
    logits: torch.Tensor
    temperature: dataclasses.InitVar[float]
    margin: torch.Tensor | None = dataclasses.field(init=False, default=None)

    def __post_init__(self, temperature: float) -> None:
        self.logits = self.logits / temperature


@dataclasses.dataclass
class _Locked:
    """Read-only once built, by a __setattr__ of its own (not frozen=True)."""

    logits: torch.Tensor

    def __setattr__(self, name, value):
        if name in self.__dict__:
            raise AttributeError(f"{name} is read-only")
        super().__setattr__(name, value)


class _StructuredOutput(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.kind == "dataclass":
            return _Output(self.fc2(h))
        if self.kind == "locked":
            return _Locked(self.fc2(h))
        if self.kind == "late fields":  # an InitVar, and a field filled in after __init__
            out = _Late(self.fc2(h), 2.0)
            out.margin = h[:, :3]
            return out
        return _Pair(self.fc2(h), h)


@pytest.mark.parametrize("kind", ["dataclass", "namedtuple", "late fields", "locked"])
@pytest.mark.parametrize("method", ["tracincp", "fast"])
def test_a_plain_loss_on_a_dataclass_or_named_tuple_output(tmp_path, kind, method):
    """A loss that states no reduction is evaluated on each example's rows of the output.
    Before, a dataclass output was handed over whole beside one example's label (torch:
    "Expected input batch_size (5) to match target batch_size (1)"), and a named tuple
    could not be rebuilt from its rows where vmap cannot run the loss."""
    torch.manual_seed(0)
    model = _StructuredOutput(kind)
    paths, lrs = _checkpoints(model, tmp_path)

    def loss_fn(out, y):
        # y.tolist() is beyond vmap: the examples are taken one by one through map_rows
        logits = out.logits if getattr(out, "margin", None) is None else out.logits + out.margin
        return F.cross_entropy(logits, torch.tensor(y.tolist()), reduction="sum")

    g = torch.Generator().manual_seed(4)
    xs, ys = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    xt, yt = torch.randn(3, 6, generator=g), torch.randint(0, 3, (3,), generator=g)
    tracin = _tracin(method, model, TensorDataset(xs, ys), paths, loss_fn, 5)
    layers = ["fc2"] if method == "fast" else ["fc1", "fc2"]
    want, want_self = _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, layers)
    _assert_same(tracin.influence((xt,), yt), want)
    _assert_same(tracin.self_influence(), want_self)


@pytest.mark.parametrize("method", ["tracincp", "fast"])
def test_gradient_hooks_on_parameters_are_named_and_left_out_of_the_scores(tmp_path, method):
    """``param.register_hook`` transforms a gradient that the per-example gradients never
    pass through (they come from layer outputs or parameter copies). Before, such hooks
    were passed over in silence; now the parameters are named, and the scores are those of
    the loss gradient before the hooks, as documented."""
    torch.manual_seed(0)
    model = MLP()
    paths, lrs = _checkpoints(model, tmp_path)
    mask = torch.zeros(3, 8)
    mask[0] = 1
    model.fc2.weight.register_hook(lambda g: g * mask)
    g = torch.Generator().manual_seed(6)
    xs, ys = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    xt, yt = torch.randn(2, 6, generator=g), torch.randint(0, 3, (2,), generator=g)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with pytest.warns(UserWarning, match=r"fc2\.weight have gradient hooks"):
        tracin = _tracin(method, model, TensorDataset(xs, ys), paths, loss_fn, 4)
    layers = ["fc2"] if method == "fast" else ["fc1", "fc2"]
    plain = MLP()  # the same architecture without the hook: the reference
    want, want_self = _reference(plain, paths, lrs, xs, ys, xt, yt, loss_fn, layers)
    _assert_same(tracin.influence((xt,), yt), want)
    _assert_same(tracin.self_influence(), want_self)
    if method == "tracincp":  # a hook on a parameter left out is no concern
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            TracInCP(model, TensorDataset(xs, ys), paths, loss_fn=loss_fn, layers=["fc1"],
                     sample_wise_grads_per_batch=True)  # fmt: skip
