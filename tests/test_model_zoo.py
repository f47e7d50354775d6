"""Unusual but legitimate models: TracInCP and TracInCPFast against the float64 loop.

Each model here once crashed or gave wrong scores: a submodule registered under two names,
a layer called with a keyword argument, part of the forward under ``torch.no_grad()``,
activation checkpointing, a head applied to some of the examples, a Linear applied to a
parameter vector as long as the batch, a forward that sorts the batch around a Linear, a
sparse embedding.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as activation_checkpoint
from torch import nn

from conftest import Case, assert_close, reference_scores, reference_self, save_checkpoints
from proponents import TracInCP, TracInCPFast


class _Aliased(nn.Module):
    """One block reused under two names (``nn.ModuleList([block, block])``, ALBERT-style)
    and a head that is also reachable as ``self.out``."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Linear(5, 5)
        self.blocks = nn.ModuleList([block, block])
        self.head = nn.Linear(5, 3)
        self.out = self.head

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(x)


class _KeywordCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(input=torch.tanh(self.conv(input=x)).flatten(1))


class _FrozenPart(nn.Module):
    """A feature layer run under ``torch.no_grad()`` although its weights require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Linear(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.feat(x))
        return self.fc(h)


class _Checkpointed(nn.Module):
    """A block under activation checkpointing (rerun during the backward pass)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.block = nn.Linear(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        def block(t):
            return torch.tanh(self.block(t))

        h = activation_checkpoint.checkpoint(block, x, use_reentrant=self.reentrant)
        return self.fc(h)


class _TwoHeads(nn.Module):
    """Each example goes through the head of its task (rows routed by a second input)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_a = nn.Linear(5, 3)
        self.head_b = nn.Linear(5, 3)

    def forward(self, x, task):
        out = x.new_zeros(x.shape[0], 3)
        a = task == 0
        if a.any():
            out[a] = self.head_a(x[a])
        if (~a).any():
            out[~a] = self.head_b(x[~a])
        return out


class _VectorThroughLinear(nn.Module):
    """A Linear applied to a parameter vector of as many entries as a batch has examples."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(4))
        self.proj = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x * self.proj(self.q))


class _SortedInside(nn.Module):
    """Sorts the batch by its first feature before a Linear and restores the order after
    (as code that sorts sequences by length does): the Linear sees its rows in an order
    of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        order = torch.argsort(x[:, 0], descending=True)
        h = torch.tanh(self.proj(x[order]))
        return self.fc(h[torch.argsort(order)])


class _SparseEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4, sparse=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.fc(self.emb(tokens).mean(1))


def _case(tmp_path, model: nn.Module, inputs, name: str) -> Case:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (16,), generator=g)
    lrs = [0.5, 1.5]
    paths = save_checkpoints(model, tmp_path / name, lrs, g)
    train = tuple(t[:12] for t in inputs)
    test = tuple(t[12:] for t in inputs)
    return Case(name, model, train, y[:12], test, y[12:], "ce", paths, lrs)


def _zoo(tmp_path, name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 5, generator=g)
    if name == "aliased":
        return _case(tmp_path, _Aliased(), (x,), name)
    if name == "keywords":
        return _case(tmp_path, _KeywordCalls(), (torch.randn(16, 2, 6, generator=g),), name)
    if name == "no_grad part":
        return _case(tmp_path, _FrozenPart(), (x,), name)
    if name.startswith("checkpointed"):
        return _case(tmp_path, _Checkpointed(name.endswith("reentrant")), (x,), name)
    if name == "two heads":
        # the first batch of 4 all goes through head_a; later batches mix the heads
        task = torch.tensor([0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 1, 0])
        return _case(tmp_path, _TwoHeads(), (x, task), name)
    if name == "vector":
        return _case(tmp_path, _VectorThroughLinear(), (x,), name)
    if name == "sorted inside":
        # the first batch of 4 is already in sorted order: no row check can see it there
        x[:4, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])
        return _case(tmp_path, _SortedInside(), (x,), name)
    assert name == "sparse embedding"
    return _case(tmp_path, _SparseEmbedding(), (torch.randint(0, 9, (16, 3), generator=g),), name)


ZOO = [
    "aliased",
    "keywords",
    "no_grad part",
    "checkpointed",
    "checkpointed reentrant",
    "two heads",
    "vector",
    "sorted inside",
    "sparse embedding",
]


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.filterwarnings("ignore:.*torch.func.vmap could not run this model")
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad=True")
def test_scores_and_self_influence_equal_the_float64_loop(tmp_path, name):
    case = _zoo(tmp_path, name)
    loss = case.loss_fn("sum")
    paths = [str(p) for p in case.checkpoints]
    t = TracInCP(case.model, case.dataset, paths, loss_fn=loss, batch_size=4,
                 sample_wise_grads_per_batch=True)  # fmt: skip
    assert_close(t.influence(case.test_inputs, case.test_labels), reference_scores(case))
    assert_close(t.self_influence(), reference_self(case))
    final = "head" if name in ("aliased",) else None if name == "two heads" else "fc"
    if final is not None:  # the last-layer method on the layer the output comes from
        fast = TracInCPFast(case.model, final, case.dataset, paths, loss_fn=loss, batch_size=4)
        want = reference_scores(case, layers=[final])
        assert_close(fast.influence(case.test_inputs, case.test_labels), want)


def test_any_name_of_an_aliased_layer_selects_it(tmp_path):
    """``self.out = self.head``: ``layers=["out"]`` and ``final_fc_layer="out"`` select the
    head as its first name does (an index records that first name); the block repeated in
    the ModuleList is one layer under either of its names."""
    case = _zoo(tmp_path, "aliased")
    loss = case.loss_fn("sum")
    paths = [str(p) for p in case.checkpoints]
    want = reference_scores(case, layers=["head", "blocks.0"])
    for layers in (["out", "blocks.1"], ["head", "blocks.0"]):
        t = TracInCP(case.model, case.dataset, paths, loss_fn=loss, batch_size=4, layers=layers,
                     sample_wise_grads_per_batch=True)  # fmt: skip
        assert_close(t.influence(case.test_inputs, case.test_labels), want)
    fast = TracInCPFast(case.model, "out", case.dataset, paths, loss_fn=loss, batch_size=4)
    assert fast.final_fc_layer_name == "head"
    assert_close(
        fast.influence(case.test_inputs, case.test_labels), reference_scores(case, layers=["head"])
    )
