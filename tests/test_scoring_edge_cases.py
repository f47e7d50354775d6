"""Scores of TracInCP and TracInCPFast in corners of the engine, against a float64 loop.

Each case is one a user meets with an ordinary model: a final layer followed by an
in-place activation, a sequence-first attention model whose linear layer sees the batch
in dim 1, a mean loss of the user's own with class weights over a label-sorted
training set. The reference loads each checkpoint into a float64 copy of the model and takes
each example's loss alone (DESIGN.md §2).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from conftest import save_checkpoints
from proponents import TracInCP, TracInCPFast


def _save(model: nn.Module, folder, lrs=(0.5, 1.25)) -> tuple[list, list[float]]:
    paths = save_checkpoints(model, folder, lrs, torch.Generator().manual_seed(3), prefix="c")
    return paths, list(lrs)


def _grads(model, ckpt, x, y, loss_fn, layers) -> torch.Tensor:
    m = copy.deepcopy(model).double().eval()
    m.load_state_dict(torch.load(ckpt, weights_only=True)["model_state_dict"])
    params = [p for name in layers for p in m.get_submodule(name).parameters()]
    rows = []
    for i in range(len(y)):
        value = loss_fn(
            m(x[i : i + 1].double()),
            y[i : i + 1].to(torch.float64 if y.is_floating_point() else y.dtype),
        )
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def _reference(model, paths, lrs, x, y, xt, yt, loss_fn, layers):
    scores = self_inf = 0
    for ckpt, lr in zip(paths, lrs):
        train = _grads(model, ckpt, x, y, loss_fn, layers)
        test = _grads(model, ckpt, xt, yt, loss_fn, layers)
        scores = scores + lr * test @ train.T
        self_inf = self_inf + lr * train.pow(2).sum(1)
    return scores, self_inf


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_a_final_layer_edited_in_place_after_it_gets_its_true_gradient(tmp_path):
    # A regression head ending in ReLU(inplace=True): the model returns the final layer's
    # own output tensor, edited in place. The first batch has only positive outputs, so
    # the ReLU changes nothing there; the later examples have negative pre-activations,
    # whose gradient the ReLU cuts to zero.
    model = nn.Sequential(nn.Linear(3, 1), nn.ReLU(inplace=True))
    paths, lrs = [], [0.5, 1.25]
    for c, (w, b) in enumerate((([1.0, 0.2, -0.1], 0.1), ([0.8, -0.1, 0.3], -0.1))):
        state = {"0.weight": torch.tensor([w]), "0.bias": torch.tensor([b])}
        paths.append(tmp_path / f"c{c}.pt")
        torch.save({"model_state_dict": state, "learning_rate": lrs[c]}, paths[-1])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, generator=g) - 0.5
    # the sign of the first feature is the sign of the pre-activation, at both checkpoints
    x[:, 0] = torch.tensor([2.0, 2.5, 3.0, 2.2, -2.0, 2.4, -3.0, -2.5, 2.8, -2.2, 2.1, -2.6])
    y = torch.randn(12, 1, generator=g)
    xt, yt = x[[6, 8, 9]], torch.tensor([[0.5], [1.0], [-0.5]])
    loss = nn.MSELoss(reduction="sum")
    want, want_self = _reference(model, paths, lrs, x, y, xt, yt, loss, ["0"])
    for tracin in (
        TracInCPFast(model, "0", TensorDataset(x, y), paths, loss_fn=loss, batch_size=4),
        TracInCP(
            model,
            TensorDataset(x, y),
            paths,
            layers=["0"],
            loss_fn=loss,
            batch_size=4,
            sample_wise_grads_per_batch=True,
        ),
    ):
        _close(tracin.influence(xt, yt), want)
        _close(tracin.self_influence(), want_self)


class _SequenceFirst(nn.Module):
    """Attention in PyTorch's default (sequence, batch, features) layout, then a Linear
    applied at every position: the Linear sees the batch in dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = x.transpose(0, 1)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(h).mean(0)


def test_a_layer_moved_off_its_fast_path_on_a_one_example_batch_is_scored(tmp_path):
    # batch_size=1: the first training batch moves `out` to the generic path (its input
    # does not hold the batch in dim 0), and the test batch of two is checked again with
    # no layer left to check.
    torch.manual_seed(0)
    model = _SequenceFirst()
    paths, lrs = _save(model, tmp_path)
    x, y = torch.randn(6, 5, 4), torch.tensor([0, 2, 1, 1, 0, 2])
    loss = nn.CrossEntropyLoss(reduction="none")
    tracin = TracInCP(model, TensorDataset(x[:4], y[:4]), paths, layers=["out"], loss_fn=loss)
    want, want_self = _reference(
        model, paths, lrs, x[:4], y[:4], x[4:], y[4:], nn.CrossEntropyLoss(), ["out"]
    )
    _close(tracin.influence(x[4:], y[4:]), want)
    _close(tracin.self_influence(), want_self)


class _WeightedMean(nn.Module):
    """A user's class-weighted cross-entropy that states reduction="mean" and keeps its
    weights under a name of its own: its mean divides by the batch's summed weights."""

    reduction = "mean"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("class_weights", torch.tensor([0.2, 1.0, 3.0]))

    def forward(self, out, target):
        return F.cross_entropy(out, target, weight=self.class_weights.to(out.dtype))


def test_a_user_mean_loss_with_hidden_class_weights_after_a_one_class_batch(tmp_path):
    # A training set sorted by label: the first batch holds one class, where the weighted
    # mean is a plain mean and the first-batch check sees nothing; the later batches are not.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    paths, lrs = _save(model, tmp_path)
    x = torch.randn(12, 6)
    y = torch.tensor([0, 0, 0, 0, 1, 2, 1, 2, 0, 1, 2, 2])
    loss = _WeightedMean()
    want, want_self = _reference(model, paths, lrs, x[:9], y[:9], x[9:], y[9:], loss, ["2"])
    for tracin in (
        TracInCPFast(model, "2", TensorDataset(x[:9], y[:9]), paths, loss_fn=loss, batch_size=4),
        TracInCP(
            model,
            TensorDataset(x[:9], y[:9]),
            paths,
            layers=["2"],
            loss_fn=loss,
            batch_size=4,
            sample_wise_grads_per_batch=True,
        ),
    ):
        _close(tracin.influence(x[9:], y[9:]), want)
        _close(tracin.self_influence(), want_self)
