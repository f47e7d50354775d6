"""What a call leaves of the user's model: the same objects holding the same values,
against copies taken before the call."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import assert_unchanged, model_snapshot
from proponents import TracInCP, TracInCPFast
from proponents.model_guard import preserved


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4)
        self.back = nn.Linear(4, 6, bias=False)
        self.back.weight = self.out.weight  # one Parameter in two modules (4 x 6)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.mid(h) + x @ self.back.weight)
        return self.out(h)


def _checkpoints(tmp_path, n=2):
    paths = []
    for c in range(n):
        torch.manual_seed(10 + c)
        paths.append(tmp_path / f"c{c}.pt")
        torch.save(Tied().state_dict(), paths[-1])
    return paths


def test_a_call_leaves_the_same_objects_values_and_gradients(tmp_path):
    """Tied weights, a load function that replaces the Parameter objects
    (``assign=True``), gradients, and a view of a weight the user holds."""
    torch.manual_seed(0)
    model = Tied()
    x, y = torch.randn(10, 4), torch.randint(0, 4, (10,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    held_view = model.mid.weight.data[0]  # a view into the weight's storage
    held_values = held_view.clone()
    seen_during: list[torch.Tensor] = []

    def load(m, path):  # copies into the model's tensors, which keeps the tie
        m.load_state_dict(torch.load(path, weights_only=True))
        seen_during.append(held_view.clone())
        return 0.5

    def load_by_assigning(m, path):  # replaces the model's Parameter objects
        m.load_state_dict(torch.load(path, weights_only=True), assign=True)
        seen_during.append(held_view.clone())
        return 0.5

    snap = model_snapshot(model)
    loss = nn.CrossEntropyLoss(reduction="none")
    t = TracInCP(
        model, TensorDataset(x, y), _checkpoints(tmp_path), load, loss_fn=loss, batch_size=4
    )
    scores = t.influence((x[:3],), y[:3])
    fast = TracInCPFast(
        model,
        "out",
        TensorDataset(x, y),
        _checkpoints(tmp_path),
        load_by_assigning,
        batch_size=4,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
    )
    fast.self_influence()
    assert_unchanged(model, snap)
    assert model.back.weight is model.out.weight
    for n, p in model.named_parameters():
        assert p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1]), n
    assert torch.equal(held_view, held_values)
    # the checkpoints were loaded into copies: what the user holds never saw them
    assert all(torch.equal(v, held_values) for v in seen_during) and len(seen_during) == 4

    # the scores are those of the checkpoints, loaded into a fresh model without guard
    def reference_grads(path, xs, ys):
        ref = Tied()
        ref.load_state_dict(torch.load(path, weights_only=True))
        rows = []
        for xi, yi in zip(xs, ys):
            ref.zero_grad()
            nn.functional.cross_entropy(ref(xi[None]).double(), yi[None]).backward()
            rows.append(torch.cat([p.grad.double().flatten() for p in ref.parameters()]))
        return torch.stack(rows)

    expected = sum(
        0.5 * reference_grads(p, x[:3], y[:3]) @ reference_grads(p, x, y).T
        for p in _checkpoints(tmp_path)
    )
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)


def test_an_interrupted_body_still_restores_everything():
    torch.manual_seed(0)
    model = Tied()
    model.train()
    snap = model_snapshot(model)
    weight = model.mid.weight
    try:
        with preserved(model):
            model.mid.weight = nn.Parameter(torch.zeros(6, 6))
            model.out.weight.data.fill_(3.0)
            model.eval()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert model.mid.weight is weight
    assert_unchanged(model, snap)
    assert model.back.weight is model.out.weight
