"""Tiny seeded models, checkpoints, and the float64 per-example reference loop."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from torch import nn
from torch.utils.data import TensorDataset

# Property tests draw the same examples on every run (a green CI stays green); set
# PROPONENTS_HYPOTHESIS=explore to let hypothesis search with fresh random draws.
settings.register_profile("stable", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("PROPONENTS_HYPOTHESIS", "stable"))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class EmbedNorm(nn.Module):
    """Embedding + LayerNorm + a linear layer applied at every position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        h = torch.tanh(self.proj(self.norm(self.embed(tokens))))
        return self.head(h.mean(dim=1))


class TwoInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, a, b):
        return self.out(torch.relu(self.a(a) + self.b(b)))


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5, 2)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).flatten(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.embed(tokens)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


@dataclass
class Case:
    """A model with data, a loss and saved checkpoints."""

    name: str
    model: nn.Module
    train_inputs: tuple[torch.Tensor, ...]
    train_labels: torch.Tensor
    test_inputs: tuple[torch.Tensor, ...]
    test_labels: torch.Tensor
    loss: str  # "ce" or "mse"
    checkpoints: list[Path]
    lrs: list[float]

    @property
    def dataset(self) -> TensorDataset:
        return TensorDataset(*self.train_inputs, self.train_labels)

    def loss_fn(self, reduction: str) -> nn.Module:
        return (nn.CrossEntropyLoss if self.loss == "ce" else nn.MSELoss)(reduction=reduction)


def _data(name: str, n: int, g: torch.Generator):
    if name == "mlp":
        return (torch.randn(n, 6, generator=g),), torch.randint(0, 3, (n,), generator=g)
    if name == "cnn":
        return (torch.randn(n, 2, 7, 7, generator=g),), torch.randint(0, 3, (n,), generator=g)
    if name in ("embed", "attention"):
        vocab = 12 if name == "embed" else 10
        return (torch.randint(0, vocab, (n, 4), generator=g),), torch.randint(
            0, 3, (n,), generator=g
        )
    if name == "two_input":
        return (torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)), torch.randint(
            0, 2, (n,), generator=g
        )
    if name == "regression":
        return (torch.randn(n, 2, 5, generator=g),), torch.randn(n, 2, generator=g)
    raise KeyError(name)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": SmallCNN,
    "embed": EmbedNorm,
    "two_input": TwoInput,
    "regression": Regressor,
    "attention": Attention,
}


def save_checkpoints(
    model: nn.Module, folder: Path, lrs: Sequence[float], g: torch.Generator, prefix: str = "ckpt-"
) -> list[Path]:
    """One checkpoint per learning rate, ``{"model_state_dict", "learning_rate"}``, each
    after moving every parameter of ``model`` (in place) by ``0.2 * N(0, 1)`` from ``g``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, lr in enumerate(lrs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        paths.append(folder / f"{prefix}{c}.pt")
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, paths[-1])
    return paths


def make_case(name: str, folder: Path, n_train: int = 13, n_test: int = 4, n_ckpt: int = 3) -> Case:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = MODELS[name]()
    x, y = _data(name, n_train + n_test, g)
    lrs = [0.5, 1.5, 0.25][:n_ckpt]
    paths = save_checkpoints(model, folder, lrs, g)
    return Case(
        name=name,
        model=model,
        train_inputs=tuple(t[:n_train] for t in x),
        train_labels=y[:n_train],
        test_inputs=tuple(t[n_train:] for t in x),
        test_labels=y[n_train:],
        loss="mse" if name == "regression" else "ce",
        checkpoints=paths,
        lrs=lrs,
    )


class ForwardWatch:
    """Counts the forward calls of one module (:attr:`calls`), calling :meth:`hit` on each.

    It wraps the ``forward`` of the module's class for that instance instead of
    registering a hook: hooks are part of a model's fingerprint, so a counting hook
    would make SimilarityInfluence's store look stale. :meth:`remove` (or leaving the
    ``with`` block) puts the class back; nested watches must be removed in reverse order.
    """

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.cls = type(module)
        self.own = self.cls.__dict__.get("forward")
        original = self.cls.forward

        def forward(m, *args, **kwargs):
            if m is module:
                self.calls += 1
                self.hit()
            return original(m, *args, **kwargs)

        self.cls.forward = forward

    def hit(self) -> None:
        """Called at every forward call of the module, after counting it."""

    def remove(self) -> None:
        if self.own is not None:
            self.cls.forward = self.own
        else:
            del self.cls.forward

    def __enter__(self) -> ForwardWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@pytest.fixture
def watch_forwards():
    """``watch_forwards(module) -> ForwardWatch``, each removed after the test."""
    watches: list[ForwardWatch] = []

    def start(module: nn.Module) -> ForwardWatch:
        watches.append(ForwardWatch(module))
        return watches[-1]

    yield start
    for watch in reversed(watches):
        watch.remove()


@pytest.fixture(params=list(MODELS))
def case(request, tmp_path) -> Case:
    return make_case(request.param, tmp_path / request.param)


def reference_grads(
    case: Case,
    ckpt: Path,
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    layers: Sequence[str] | None = None,
    loss: str | None = "default",
) -> torch.Tensor:
    """Per-example gradients in float64 by a plain autograd loop (one example at a time)."""
    model = copy.deepcopy(case.model).double().eval()
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    model.load_state_dict(state)
    model.double()
    if layers is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = [p for name in layers for p in model.get_submodule(name).parameters()]
    rows = []
    for i in range(labels.shape[0]):
        xs = [t[i : i + 1].double() if t.is_floating_point() else t[i : i + 1] for t in inputs]
        out = model(*xs)
        if loss is None:
            value = out.sum()
        elif case.loss == "ce":
            value = nn.functional.cross_entropy(out, labels[i : i + 1])
        else:
            value = nn.functional.mse_loss(out, labels[i : i + 1].double(), reduction="sum")
        # a parameter the loss does not reach (a layer run under no_grad) has no gradient
        grads = torch.autograd.grad(value, params, allow_unused=True)
        dense = [
            torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g
            for p, g in zip(params, grads)
        ]
        rows.append(torch.cat([g.reshape(-1) for g in dense]))
    return torch.stack(rows)


def reference_scores(case: Case, layers=None, loss="default") -> torch.Tensor:
    """Float64 ``(n_test, n_train)`` TracIn scores from the loop reference."""
    total = 0
    for ckpt, lr in zip(case.checkpoints, case.lrs):
        gt = reference_grads(case, ckpt, case.test_inputs, case.test_labels, layers, loss)
        gr = reference_grads(case, ckpt, case.train_inputs, case.train_labels, layers, loss)
        total = total + lr * gt @ gr.T
    return total


def reference_self(case: Case, layers=None) -> torch.Tensor:
    total = 0
    for ckpt, lr in zip(case.checkpoints, case.lrs):
        gr = reference_grads(case, ckpt, case.train_inputs, case.train_labels, layers)
        total = total + lr * gr.pow(2).sum(1)
    return total


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-4) -> None:
    """Relative agreement measured against the scale of the expected values."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3e} vs scale {scale:.3e}"


def model_snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "ids": [id(p) for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = model_snapshot(model)
    assert now["flags"] == snap["flags"]
    assert now["modes"] == snap["modes"]
    assert now["ids"] == snap["ids"]
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k


class Augmented(torch.utils.data.Dataset):
    """``(x[i] + noise, y[i])`` with noise of scale ``scale`` drawn at every read from
    torch's, Python's and NumPy's global generators, like random augmentations."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, scale: float = 0.3) -> None:
        self.x, self.y, self.scale = x, y, scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        import random

        import numpy as np

        draws = torch.randn(self.x.shape[1]) + random.gauss(0, 1) + float(np.random.normal())
        return self.x[i] + self.scale * draws, self.y[i]
