"""The closed-form loss gradient at the model output, against autograd in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import assert_close, make_case, reference_scores, reference_self
from proponents import TracInCPFast
from proponents.gradients.engine import GradientEngine
from proponents.gradients.loss import LossSpec, output_gradient, resolve_loss


def _spec(loss):
    if loss is None:
        return LossSpec(None, "output")
    per_example = getattr(loss, "reduction", "sum") == "none"
    return resolve_loss(loss, not per_example, "test")


def _autograd_rows(loss, out, labels):
    """Row i: gradient of example i's own loss (a batch of one) by autograd, float64."""
    rows = []
    for i in range(out.shape[0]):
        z = out[i : i + 1].detach().clone().requires_grad_(True)
        value = z.sum() if loss is None else loss(z, labels[i : i + 1]).sum()
        (g,) = torch.autograd.grad(value, z)
        rows.append(g[0])
    return torch.stack(rows)


LOSSES = [
    nn.CrossEntropyLoss(reduction="sum"),
    nn.CrossEntropyLoss(reduction="mean"),
    nn.CrossEntropyLoss(reduction="none"),
    nn.MSELoss(reduction="sum"),
    nn.MSELoss(reduction="mean"),
    nn.MSELoss(reduction="none"),
    None,
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda f: repr(f) if f is None else f"{f}")
def test_output_gradient_equals_autograd_per_example(loss):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    if isinstance(loss, nn.CrossEntropyLoss):
        labels = torch.randint(0, 5, (7,), generator=g)
    else:
        labels = torch.randn(7, 5, generator=g, dtype=torch.float64)
    got = output_gradient(_spec(loss), out, labels)
    assert got is not None
    assert_close(got, _autograd_rows(loss, out, labels), rtol=1e-12)


@pytest.mark.parametrize(
    "loss, out_shape, labels",
    [
        (
            nn.CrossEntropyLoss(weight=torch.ones(5), reduction="sum"),
            (4, 5),
            torch.tensor([0, 1, 2, 3]),
        ),
        (
            nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"),
            (4, 5),
            torch.tensor([0, 1, 2, 3]),
        ),
        (nn.CrossEntropyLoss(reduction="sum"), (4, 5), torch.tensor([0, -100, 2, 3])),  # ignored
        (nn.CrossEntropyLoss(reduction="sum"), (4, 5), torch.full((4, 5), 0.2)),  # probabilities
        (nn.CrossEntropyLoss(reduction="sum"), (4, 5, 2), torch.zeros(4, 2, dtype=torch.long)),
        (
            type("MyCE", (nn.CrossEntropyLoss,), {})(reduction="sum"),
            (4, 5),
            torch.tensor([0, 1, 2, 3]),
        ),
        (nn.NLLLoss(reduction="sum"), (4, 5), torch.tensor([0, 1, 2, 3])),
        (nn.MSELoss(reduction="sum"), (4, 5), torch.zeros(4, 1)),  # broadcast target
    ],
)
def test_no_closed_form_where_it_would_not_be_exact(loss, out_shape, labels):
    assert output_gradient(_spec(loss), torch.randn(out_shape), labels) is None


def test_fast_uses_the_closed_form_and_stays_exact(tmp_path):
    case = make_case("mlp", tmp_path)
    t = TracInCPFast(
        case.model,
        "fc2",
        case.dataset,
        case.checkpoints,
        loss_fn=nn.CrossEntropyLoss(reduction="mean"),
        batch_size=4,
    )
    assert_close(t.influence(case.test_inputs, case.test_labels), reference_scores(case, ["fc2"]))
    assert_close(t.influence(), reference_self(case, ["fc2"]))
    assert t._engine._closed_form is True


def test_a_batch_with_an_ignored_label_goes_through_autograd(tmp_path, monkeypatch):
    case = make_case("mlp", tmp_path, n_train=12)
    labels = case.train_labels.clone()
    labels[5] = -100  # CrossEntropyLoss's ignore_index: this example has no loss
    data = TensorDataset(*case.train_inputs, labels)

    def make():
        return TracInCPFast(
            case.model,
            "fc2",
            data,
            case.checkpoints,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=4,
        )

    closed = make()
    got = closed.influence()
    assert closed._engine._closed_form is True  # the first batch has no ignored label
    monkeypatch.setattr(GradientEngine, "_closed_form_agrees", lambda self, b, r: False)
    plain = make()
    want = plain.influence()
    assert plain._engine._closed_form is False
    assert_close(got, want, rtol=1e-6)
    assert float(got[5]) == 0.0
    keep = [i for i in range(12) if i != 5]
    assert_close(got[keep], reference_self(case, ["fc2"])[keep])
