"""Layers whose tensors are not what the per-layer fast paths assume, against a float64 loop.

Three ways a Linear/Conv layer can differ from the one its fast path was written for:

* its bias is not a registered parameter of the layer (a parametrization computes it, or it
  is a buffer or a plain tensor attribute);
* its weight is also used outside the layer's own ``forward``, and that use matters only
  for some examples;
* the model around it has a ``forward`` that depends on ``requires_grad`` flags
  (``nn.TransformerEncoder``'s inference fast path).

Every score is compared with this file's own reference: for each checkpoint, each
example's loss differentiated alone with ``torch.autograd.grad`` in float64, with every
parameter's ``requires_grad`` as the model has it (the selected ones switched on), and
``lr * <g_test, g_train>`` summed over checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset

import proponents.gradients.hooked as hooked
from proponents import TracInCP, TracInCPFast

LRS = (0.5, 1.5)


def _checkpoints(model: nn.Module, folder: Path, seed: int = 0) -> list[str]:
    """Two perturbed copies of ``model``'s state, saved with the learning rates ``LRS``."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for c, lr in enumerate(LRS):
        state = {
            k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            if v.is_floating_point()
            else v.clone()
            for k, v in model.state_dict().items()
        }
        path = folder / f"ckpt-{c}.pt"
        torch.save({"model_state_dict": state, "learning_rate": lr}, path)
        paths.append(str(path))
    return paths


def _example_grads(
    model: nn.Module,
    path: str,
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    loss_fn: nn.Module,
    layers: Sequence[str] | None,
) -> torch.Tensor:
    """``(n, P)`` float64 gradients of each example's own loss, one example at a time."""
    m = copy.deepcopy(model)
    m.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"])
    m.eval()
    if layers is None:
        params = [p for p in m.parameters() if p.requires_grad]
    else:
        params = list(
            dict.fromkeys(p for name in layers for p in m.get_submodule(name).parameters())
        )
    for p in params:
        p.requires_grad_(True)
    rows = []
    for i in range(labels.shape[0]):
        with torch.enable_grad():
            loss = loss_fn(m(*(x[i : i + 1] for x in inputs)), labels[i : i + 1]).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads)
                ]
            )
        )
    return torch.stack(rows).double()


def _reference(model, paths, train, test, loss_fn, layers):
    """Float64 ``(scores (n_test, n_train), self-influence (n_train,))``."""
    scores, self_inf = 0.0, 0.0
    for path, lr in zip(paths, LRS):
        g_train = _example_grads(model, path, train[:-1], train[-1], loss_fn, layers)
        g_test = _example_grads(model, path, test[:-1], test[-1], loss_fn, layers)
        scores = scores + lr * g_test @ g_train.T
        self_inf = self_inf + lr * (g_train * g_train).sum(1)
    return scores, self_inf


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-9) -> None:
    scale = max(float(want.abs().max()), 1e-12)
    err = float((got.double() - want).abs().max()) / scale
    assert err <= rtol, f"relative error {err:.2e}\ngot  {got}\nwant {want}"


def _tracincp(model, paths, train, loss_fn, layers, batch_size):
    return TracInCP(
        model,
        TensorDataset(*train),
        paths,
        layers=layers,
        loss_fn=loss_fn,
        batch_size=batch_size,
        sample_wise_grads_per_batch=loss_fn.reduction != "none",
    )


def _check_tracincp(model, tmp_path, train, test, layers, batch_sizes=(1, 3, None)):
    """TracInCP scores and self-influence on both flag settings equal the reference."""
    paths = _checkpoints(model, tmp_path)
    n = train[-1].shape[0]
    for reduction in ("sum", "none"):
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        want_scores, want_self = _reference(model, paths, train, test, loss_fn, layers)
        for bs in batch_sizes:
            tracin = _tracincp(model, paths, train, loss_fn, layers, bs or n)
            _assert_close(tracin.influence(test[:-1], test[-1]), want_scores)
            _assert_close(tracin.self_influence(), want_self)


class _Exp(nn.Module):
    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b.exp()


def _data(n: int, shape: tuple[int, ...], classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def test_a_parametrized_bias_is_differentiated_exactly(tmp_path: Path) -> None:
    """A Linear and a Conv2d whose bias is computed by ``parametrize`` (through its
    ``original``): TracInCP on that layer, on every layer, and TracInCPFast on such a final
    layer equal the float64 loop (before: a bare KeyError, an object id, in
    ``find_hooked_layers``)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    parametrize.register_parametrization(mlp[0], "bias", _Exp())
    x, y = _data(6, (4,))
    xt, yt = _data(2, (4,), seed=2)
    for layers in (["0"], None):
        _check_tracincp(mlp, tmp_path, (x, y), (xt, yt), layers, batch_sizes=(3,))

    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    parametrize.register_parametrization(cnn[0], "bias", _Exp())
    xc, yc = _data(5, (2, 4, 4))
    xct, yct = _data(2, (2, 4, 4), seed=2)
    _check_tracincp(cnn, tmp_path, (xc, yc), (xct, yct), ["0"], batch_sizes=(5,))

    head = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    parametrize.register_parametrization(head[2], "bias", _Exp())
    paths = _checkpoints(head, tmp_path)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    want_scores, want_self = _reference(head, paths, (x, y), (xt, yt), loss_fn, ["2"])
    fast = TracInCPFast(head, "2", TensorDataset(x, y), paths, loss_fn=loss_fn, batch_size=3)
    _assert_close(fast.influence(xt, yt), want_scores)
    _assert_close(fast.self_influence(), want_self)


class _BufferBias(nn.Module):
    """A Linear whose bias is a buffer, and one whose bias is a plain tensor attribute:
    neither is a parameter, so only the weights have gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        del self.fc1.bias
        self.fc1.register_buffer("bias", torch.linspace(-1, 1, 5))
        self.fc2 = nn.Linear(5, 3)
        del self.fc2.bias
        self.fc2.bias = torch.tensor([0.5, -0.5, 0.25])

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_a_bias_that_is_a_buffer_or_a_plain_tensor_is_a_constant(tmp_path: Path) -> None:
    """Linear layers whose ``bias`` is a buffer or an unregistered tensor: their weights'
    scores equal the float64 loop, the bias being a constant (before: a bare KeyError in
    ``find_hooked_layers``)."""
    torch.manual_seed(0)
    model = _BufferBias().double()
    model.fc2.bias = model.fc2.bias.double()
    x, y = _data(6, (4,))
    xt, yt = _data(2, (4,), seed=2)
    for layers in (["fc1"], None):
        _check_tracincp(model, tmp_path, (x, y), (xt, yt), layers, batch_sizes=(3,))


class _GatedReuse(nn.Module):
    """``fc``'s weight also enters the output through ``F.linear`` outside ``fc``, and
    ``conv``'s through ``F.conv2d`` outside ``conv``, both behind a gate that only an input
    with a large sum (example 4 here) opens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(16, 4)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        flat = x.flatten(1)
        gate = (flat.sum(1) > 20.0).to(x.dtype)  # depends on the input only
        extra = gate * (
            F.linear(flat, self.fc.weight).sum(1) + F.conv2d(x, self.conv.weight).sum((1, 2, 3))
        )
        h = torch.cat([torch.tanh(self.conv(x)).flatten(1), torch.tanh(self.fc(flat))], 1)
        return self.head(h) + torch.stack([extra, 0 * extra], 1)


def test_a_weight_used_outside_its_layer_keeps_that_gradient(tmp_path: Path) -> None:
    """A Linear and a Conv2d weight read again outside their layers, in a use that only one
    training example (4) activates: TracInCP on them and on every layer equals the float64
    loop for every batch size, and those layers are served by the generic path (before: the
    hooked path kept only the layers' own calls and the check, looking at a few rows of the
    first batch, never saw example 4: its scores lost that gradient)."""
    torch.manual_seed(0)
    model = _GatedReuse().double()
    x, y = _data(6, (1, 4, 4), classes=2)
    x = x.clamp(-1, 1)
    x[4] = 2.0
    train, test = (x, y), (x[:2].clone(), y[:2].clone())
    _check_tracincp(model, tmp_path, train, test, ["fc", "conv"])
    _check_tracincp(model, tmp_path, train, test, None, batch_sizes=(6,))
    paths = _checkpoints(model, tmp_path)
    tracin = _tracincp(model, paths, train, nn.CrossEntropyLoss(reduction="sum"), None, 6)
    tracin.self_influence()
    strategies = tracin._engine.strategies
    assert strategies["fc.weight"] == strategies["conv.weight"] == "generic"
    assert strategies["head.weight"] == "linear"


class _CalledTwice(nn.Module):
    """A layer called twice, a layer under two names, and a weight read for its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.out = self.head

    def forward(self, x):
        assert self.fc.weight.shape == (4, 4)
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def test_ordinary_reuse_keeps_the_fast_path_and_is_watched_on_the_check_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer called twice, a layer registered under two names and a weight whose shape is
    read stay on their per-layer path (and equal the float64 loop); the watch for uses
    outside a layer runs on the strategy check only, not on later batches or calls."""
    torch.manual_seed(0)
    model = _CalledTwice().double()
    made = []
    original = hooked.OutsideUses

    def counting(*args, **kwargs):
        made.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hooked, "OutsideUses", counting)
    x, y = _data(8, (4,))
    xt, yt = _data(2, (4,), seed=2)
    _check_tracincp(model, tmp_path, (x, y), (xt, yt), None, batch_sizes=(2,))
    paths = _checkpoints(model, tmp_path)
    tracin = _tracincp(model, paths, (x, y), nn.CrossEntropyLoss(reduction="sum"), None, 2)
    tracin.self_influence()
    assert set(tracin._engine.strategies.values()) == {"linear"}
    made.clear()
    tracin.self_influence()  # checked already: 2 checkpoints x 4 batches, none watched
    tracin.influence(xt, yt)
    assert made == []


class _Encoder(nn.Module):
    """A transformer encoder (with a padding mask) under a LayerNorm and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, pad):
        return self.head(self.norm(self.enc(x, src_key_padding_mask=pad).mean(1)))


@pytest.mark.filterwarnings("ignore:.*vmap could not run this model")
def test_a_transformer_is_scored_with_its_grad_enabled_forward(tmp_path: Path) -> None:
    """Differentiating only the head (hooked, TracInCPFast's closed form too) or only the
    LayerNorm (torch.func) of a model with ``nn.TransformerEncoder`` and padded inputs:
    scores equal the float64 loop over the grad-enabled forward, scores add up over layers,
    and the model's flags are left as they were (before: every other parameter was switched
    off, PyTorch took its inference fast path, which zeroes padded positions, and the head's
    self-influence of the padded example was 1.19 instead of 1.47)."""
    torch.manual_seed(0)
    model = _Encoder().double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 8, generator=g, dtype=torch.float64)
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[4, 2:] = True
    y = torch.randint(0, 3, (6,), generator=g)
    train, test = (x, pad, y), (x[:2].clone(), pad[:2].clone(), y[:2].clone())
    flags = [p.requires_grad for p in model.parameters()]
    for layers in (["head"], ["norm"]):
        _check_tracincp(model, tmp_path, train, test, layers, batch_sizes=(6,))
    assert [p.requires_grad for p in model.parameters()] == flags

    paths = _checkpoints(model, tmp_path)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    _, want_self = _reference(model, paths, train, test, loss_fn, ["head"])
    fast = TracInCPFast(model, "head", TensorDataset(*train), paths, loss_fn=loss_fn, batch_size=3)
    _assert_close(fast.self_influence(), want_self)
    parts = [
        _tracincp(model, paths, train, loss_fn, la, 6).self_influence()
        for la in (["head"], ["enc"])
    ]
    whole = _tracincp(model, paths, train, loss_fn, ["head", "enc"], 6).self_influence()
    _assert_close(parts[0] + parts[1], whole.double())


class _Counting(nn.Module):
    """A parametrization that returns its input and counts how often it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return weight


def test_choosing_strategies_runs_no_parametrization_and_changes_no_buffer() -> None:
    from torch.nn.utils.parametrizations import spectral_norm

    from proponents.gradients.selection import find_hooked_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), spectral_norm(nn.Linear(5, 3)))
    parametrize.register_parametrization(model[0], "bias", counting := _Counting())
    counting.calls = 0  # registering ran it once, to check it
    model.train()  # where spectral_norm's power iteration updates its buffers
    before = copy.deepcopy(model.state_dict())
    found = find_hooked_layers(model, [n for n, _ in model.named_parameters()])
    assert found == []  # both layers are computed: the generic path serves them
    assert counting.calls == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
