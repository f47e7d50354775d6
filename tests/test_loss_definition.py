"""The loss of an example is ``loss_fn`` applied to that example alone (DESIGN.md §2).

Checked against a float64 loop that does exactly that, for losses whose "mean" is not a
plain mean over the batch (class weights, ignored labels) and for models whose examples
interact inside a batch, whatever call comes first (a one-example test batch cannot show
an interaction, so the strategies must still be verified on a larger batch).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
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
    """Float64 gradients of ``loss_fn`` applied to each example alone."""
    m = copy.deepcopy(model).double().eval()
    m.load_state_dict(torch.load(ckpt, weights_only=True)["model_state_dict"])
    m.double()
    fn = copy.deepcopy(loss_fn).double()
    params = [p for name in layers for p in m.get_submodule(name).parameters()]
    rows = []
    for i in range(len(y)):
        value = fn(m(x[i : i + 1].double()), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def _reference(model, paths, lrs, xs, ys, xt, yt, loss_fn, layers):
    scores = self_inf = 0
    for ckpt, lr in zip(paths, lrs):
        gr = _own_loss_grads(model, ckpt, xs, ys, loss_fn, layers)
        gt = _own_loss_grads(model, ckpt, xt, yt, loss_fn, layers)
        scores = scores + lr * gt @ gr.T
        self_inf = self_inf + lr * gr.pow(2).sum(1)
    return scores, self_inf


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
        if method == "fast":
            obj = TracInCPFast(model, "fc2", train, paths, loss_fn=loss_fn, batch_size=batch_size)
        else:
            obj = TracInCP(
                model,
                train,
                paths,
                loss_fn=loss_fn,
                batch_size=batch_size,
                sample_wise_grads_per_batch=True,
            )
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
