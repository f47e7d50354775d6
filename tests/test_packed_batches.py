"""Packed batches: examples a collate_fn concatenated, told apart only by the labels and
the model output (text for an nn.EmbeddingBag with offsets, graphs with a batch vector).

Captum's TracInCP differentiates each example's loss from the whole batch's output, so it
scores such batches; every TracIn method here must too, exactly. The reference is a
float64 loop that runs each example alone (one bag, one graph).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from proponents import TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.errors import BatchFormatError

LRS = (0.5, 1.5)


class BagText(nn.Module):
    """Text classifier over bags of tokens: model(tokens, offsets)."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(40, 6, mode="mean", sparse=sparse)
        self.hidden = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(self.bag(tokens, offsets))))


class MeanPoolGraph(nn.Module):
    """Graph classifier: node features averaged per graph of the batch vector."""

    def __init__(self) -> None:
        super().__init__()
        self.node = nn.Linear(4, 5)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, graph_of_node: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.node(x))
        n = int(graph_of_node.max()) + 1
        sums = h.new_zeros(n, h.shape[1]).index_add(0, graph_of_node, h)
        return self.fc(sums / torch.bincount(graph_of_node, minlength=n)[:, None].to(h.dtype))


def collate_graphs(batch):
    """Nodes of all graphs concatenated, with a vector naming each node's graph."""
    x = torch.cat([nodes for nodes, _ in batch])
    graph_of_node = torch.cat([torch.full((len(nodes),), i) for i, (nodes, _) in enumerate(batch)])
    return x, graph_of_node, torch.tensor([label for _, label in batch])


def random_graphs(n: int, seed: int = 3) -> list[tuple[torch.Tensor, int]]:
    """``n`` graphs of 1 to 4 nodes with 4 features, labels 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(int(torch.randint(1, 5, (1,), generator=g)), 4, generator=g),
            int(torch.randint(0, 2, (1,), generator=g)),
        )
        for _ in range(n)
    ]


def texts(n: int, seed: int, longest: int = 6) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, longest + 1, (1,), generator=g))
        out.append(
            (
                torch.randint(0, 40, (length,), generator=g),
                int(torch.randint(0, 3, (1,), generator=g)),
            )
        )
    return out


def collate_text(batch):
    tokens = [t for t, _ in batch]
    offsets = torch.tensor([0] + [len(t) for t in tokens[:-1]]).cumsum(0)
    return torch.cat(tokens), offsets, torch.tensor([label for _, label in batch])


def save_checkpoints(model: nn.Module, folder) -> list[str]:
    torch.manual_seed(1)
    paths = []
    for c, lr in enumerate(LRS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        path = str(folder / f"{c}.pt")
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, path)
        paths.append(path)
    return paths


def reference_grads(make, paths, examples, run_alone, only=None) -> list[torch.Tensor]:
    """Per checkpoint, ``(n, P)`` float64 gradients of each example run alone, times sqrt(lr)."""
    out = []
    for path in paths:
        state = torch.load(path)
        model = make().double()
        model.load_state_dict(state["model_state_dict"])
        rows = []
        for example, label in examples:
            model.zero_grad()
            loss = nn.functional.cross_entropy(run_alone(model, example), torch.tensor([label]))
            loss.backward()
            rows.append(
                torch.cat(
                    [
                        (p.grad.to_dense() if p.grad.is_sparse else p.grad).flatten()
                        for name, p in model.named_parameters()
                        if only is None or name.startswith(only)
                    ]
                )
            )
        out.append(torch.stack(rows) * state["learning_rate"] ** 0.5)
    return out


def bag_alone(model, tokens):
    return model(tokens, torch.tensor([0]))


def reference_scores(grads, test_rows):
    return sum(g[test_rows] @ g.T for g in grads)


def reference_self(grads):
    return sum((g * g).sum(1) for g in grads)


@pytest.fixture(scope="module")
def text_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed_text")
    torch.manual_seed(0)
    model = BagText()
    paths = save_checkpoints(model, folder)
    train = texts(23, seed=2)
    return model, paths, train


@pytest.mark.parametrize("per_batch", [False, True])
def test_tracincp_scores_packed_text_exactly(text_case, per_batch):
    model, paths, train = text_case
    loss = nn.CrossEntropyLoss(reduction="sum" if per_batch else "none")
    loader = DataLoader(train, batch_size=5, collate_fn=collate_text)
    tracin = TracInCP(
        model, loader, paths, loss_fn=loss, batch_size=5, sample_wise_grads_per_batch=per_batch
    )
    grads = reference_grads(BagText, paths, train, bag_alone)
    tokens, offsets, labels = collate_text(train[:4])
    want = reference_scores(grads, slice(0, 4))
    got = tracin.influence((tokens, offsets), labels, k=None)
    assert got.shape == (4, 23)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    top = tracin.influence((tokens, offsets), labels, k=3)
    assert torch.equal(top.indices, want.topk(3, dim=1).indices)
    low = tracin.influence((tokens, offsets), labels, k=3, proponents=False)
    assert torch.equal(low.indices, (-want).topk(3, dim=1).indices)
    torch.testing.assert_close(
        tracin.self_influence().double(), reference_self(grads), rtol=1e-4, atol=1e-4
    )
    # test examples as a DataLoader of packed batches too
    tests = DataLoader(train[:4], batch_size=3, collate_fn=collate_text)
    torch.testing.assert_close(tracin.influence(tests, k=None).double(), want, rtol=1e-4, atol=1e-4)


def test_packed_text_matches_captum(text_case):
    captum_influence = pytest.importorskip("captum.influence")
    model, paths, train = text_case
    loader = DataLoader(train, batch_size=5, collate_fn=collate_text)

    def load(net, path):
        state = torch.load(path)
        net.load_state_dict(state["model_state_dict"])
        return state["learning_rate"]

    loss = nn.CrossEntropyLoss(reduction="none")
    ours = TracInCP(model, loader, paths, load, loss_fn=loss, batch_size=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = captum_influence.TracInCP(model, loader, paths, load, loss_fn=loss, batch_size=5)
        tokens, offsets, labels = collate_text(train[:4])
        want = theirs.influence((tokens, offsets, labels), k=None)
    torch.testing.assert_close(
        ours.influence((tokens, offsets), labels, k=None), want, rtol=1e-4, atol=1e-5
    )


def test_last_layer_methods_score_packed_text_exactly(text_case):
    model, paths, train = text_case
    loader = DataLoader(train, batch_size=5, collate_fn=collate_text)
    loss = nn.CrossEntropyLoss(reduction="sum")
    grads = reference_grads(BagText, paths, train, bag_alone, only="fc")
    tokens, offsets, labels = collate_text(train[:4])
    want = reference_scores(grads, slice(0, 4))
    fast = TracInCPFast(model, "fc", loader, paths, loss_fn=loss, batch_size=5)
    torch.testing.assert_close(
        fast.influence((tokens, offsets), labels, k=None).double(), want, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        fast.self_influence().double(), reference_self(grads), rtol=1e-4, atol=1e-5
    )
    index = TracInCPFastRandProj(model, "fc", loader, paths, loss_fn=loss, batch_size=5)
    torch.testing.assert_close(
        index.influence((tokens, offsets), labels, k=None).double(), want, rtol=1e-4, atol=1e-5
    )
    top = index.influence((tokens, offsets), labels, k=4)
    assert torch.equal(top.indices, want.topk(4, dim=1).indices)


def test_packed_graphs_with_a_batch_vector(tmp_path):
    torch.manual_seed(0)
    model = MeanPoolGraph()
    paths = save_checkpoints(model, tmp_path)
    graphs = random_graphs(13)

    collate = collate_graphs

    loader = DataLoader(graphs, batch_size=4, collate_fn=collate)
    tracin = TracInCP(
        model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=4
    )
    grads = reference_grads(
        MeanPoolGraph,
        paths,
        graphs,
        lambda net, x: net(x.double(), torch.zeros(len(x), dtype=torch.long)),
    )
    x, graph_of_node, labels = collate(graphs[:3])
    torch.testing.assert_close(
        tracin.influence((x, graph_of_node), labels, k=None).double(),
        reference_scores(grads, slice(0, 3)),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        tracin.self_influence().double(), reference_self(grads), rtol=1e-4, atol=1e-5
    )


def test_a_batch_whose_rows_happen_to_match_is_still_read_as_packed(tmp_path):
    """A last batch of one-token texts has one row per example in every tensor; read by
    rows, each example would get offsets [i] into a one-token input (a wrong bag). Once
    the data showed packed batches, it is run whole like the others."""
    torch.manual_seed(0)
    model = BagText(sparse=True)  # sparse gradients: the Jacobian is taken per example
    paths = save_checkpoints(model, tmp_path)
    train = texts(9, seed=4, longest=3) + [(torch.tensor([t]), 1) for t in (3, 17, 29)]
    loader = DataLoader(train, batch_size=3, collate_fn=collate_text)
    tracin = TracInCP(
        model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=3
    )
    grads = reference_grads(lambda: BagText(sparse=True), paths, train, bag_alone)
    torch.testing.assert_close(
        tracin.self_influence().double(), reference_self(grads), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("case", ["one-node graphs", "one-token texts"])
def test_a_first_batch_whose_rows_happen_to_match_is_read_as_packed(tmp_path, case):
    """The first batch has one row per example in every tensor (graphs of one node each,
    texts of one token) though the data is packed: an example cut out by its rows gives the
    model a wrong batch (graph index 2 of a one-node input: three output rows; offsets [2]
    into a one-token text: an error from torch). Such a batch is read as packed, and the
    scores are those of each example run alone (before: torch's error on the shapes)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if case == "one-node graphs":
        make, collate = MeanPoolGraph, collate_graphs
        train = [(torch.randn(1, 4, generator=g), i % 2) for i in range(4)]
        train += [(torch.randn(3, 4, generator=g), i % 2) for i in range(6)]

        def alone(net, x):
            return net(x.double(), torch.zeros(len(x), dtype=torch.long))

    else:
        make, collate, alone = BagText, collate_text, bag_alone
        train = [(torch.tensor([t]), t % 2) for t in (3, 17, 29, 8)] + texts(6, seed=4)
    model = make()
    paths = save_checkpoints(model, tmp_path)
    loader = DataLoader(train, batch_size=4, collate_fn=collate)
    tracin = TracInCP(
        model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=4
    )
    grads = reference_grads(make, paths, train, alone)
    torch.testing.assert_close(
        tracin.self_influence().double(), reference_self(grads), rtol=1e-4, atol=1e-5
    )
    *inputs, labels = collate(train[:3])
    fresh = TracInCP(
        make(), loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=4
    )
    torch.testing.assert_close(
        fresh.influence(tuple(inputs), labels, k=None).double(),
        reference_scores(grads, slice(0, 3)),
        rtol=1e-4,
        atol=1e-5,
    )


class AuxiliaryFirst(nn.Module):
    """Returns prototypes of a fixed two rows first, then the logits (the loss reads [1])."""

    def __init__(self, rows: int = 2) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.proto = nn.Parameter(torch.randn(rows, 8))

    def forward(self, x):
        return self.proto * 1.0, self.fc2(torch.tanh(self.fc1(x)))


class NeedsABatch(nn.Module):
    """Centres by the batch mean, so it refuses a single example."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        assert x.shape[0] > 1, "needs a batch"
        h = self.fc1(x)
        return self.fc2(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize("prototypes", [2, 4], ids=["2 rows", "as many rows as a batch"])
def test_models_that_only_look_packed_are_run_as_before(tmp_path, prototypes):
    """Reading a first batch as packed needs evidence from the whole batch: an output
    whose first tensor has no row per example (prototypes before the logits, also as many
    as a batch has examples) keeps the usual convention and its exact scores, and a model
    that refuses one example alone raises its own error (before the fix: an internal
    exception without a message, or scores taken in a batch whose examples interact)."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = AuxiliaryFirst(prototypes)  # batches of 4: the second is a batch's rows
    path = tmp_path / "aux.pt"
    torch.save(model.state_dict(), path)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    xt, yt = torch.randn(3, 6), torch.randint(0, 3, (3,))

    def loss(out, labels):
        return nn.functional.cross_entropy(out[1], labels, reduction="sum")

    tracin = TracInCP(
        model,
        TensorDataset(x, y),
        [str(path)],
        loss_fn=loss,
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    reference = copy.deepcopy(model).double()
    params = list(reference.parameters())

    def grad(a, b):
        got = torch.autograd.grad(
            loss(reference(a[None].double()), b[None]), params, allow_unused=True
        )
        return torch.cat(
            [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(got, params)]
        )

    want = (
        torch.stack([grad(a, b) for a, b in zip(xt, yt)])
        @ torch.stack([grad(a, b) for a, b in zip(x, y)]).T
    )
    torch.testing.assert_close(tracin.influence((xt,), yt).double(), want, rtol=1e-4, atol=1e-6)

    torch.manual_seed(0)
    torch.save(NeedsABatch().state_dict(), tmp_path / "c.pt")
    centred = TracInCP(
        NeedsABatch(),
        TensorDataset(x, y),
        [str(tmp_path / "c.pt")],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    with pytest.raises(AssertionError, match="needs a batch"):
        centred.influence((xt,), yt)


def test_labels_that_fit_neither_the_inputs_nor_the_output_are_refused(tmp_path):
    net = nn.Linear(5, 2)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    data = torch.utils.data.TensorDataset(torch.randn(6, 5), torch.randint(0, 2, (6,)))
    tracin = TracInCP(
        net, data, [str(tmp_path / "net.pt")], loss_fn=nn.CrossEntropyLoss(reduction="none")
    )
    with pytest.raises(
        BatchFormatError, match=r"3 labels.*inputs of 4 examples.*output has 4 rows.*packed batch"
    ):
        tracin.influence((torch.randn(4, 5),), torch.tensor([0, 1, 1]))
    # the same in a training batch a collate_fn made
    loader = DataLoader(
        list(zip(torch.randn(6, 5), torch.randint(0, 2, (6,)))),
        batch_size=3,
        collate_fn=lambda b: (
            torch.stack([x for x, _ in b]),
            torch.tensor([int(y) for _, y in b][:2]),
        ),
    )
    bad = TracInCP(
        net, loader, [str(tmp_path / "net.pt")], loss_fn=nn.CrossEntropyLoss(reduction="none")
    )
    with pytest.raises(
        BatchFormatError, match=r"2 labels.*inputs of 3 examples.*output has 3 rows"
    ):
        bad.self_influence()


class ReversedHead(nn.Module):
    """Node-level Linear summed per graph, then a head that sees the graphs in reverse
    order (and gives the rows back in order): its rows are not the examples in order."""

    def __init__(self) -> None:
        super().__init__()
        self.node = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, graph_of_node: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.node(x))
        n = int(graph_of_node.max()) + 1
        pooled = h.new_zeros(n, h.shape[1]).index_add(0, graph_of_node, h)
        return self.fc(pooled.flip(0)).flip(0)


def test_layers_whose_rows_are_not_the_examples_leave_the_fast_path(tmp_path):
    """On packed batches the node-level Linear (rows are nodes) and a head that sees the
    examples in reverse order (rows of the batch's length, in another order) both move
    to the generic path: the first by its shape, the second by the check against each
    example's gradient in the whole batch. Scores equal the float64 loop."""
    torch.manual_seed(0)
    model = ReversedHead()
    paths = save_checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(7)
    counts = [2, 1, 3, 3, 1, 2, 4, 1]
    graphs = [(torch.randn(c, 3, generator=g), i % 2) for i, c in enumerate(counts)]

    def collate(batch):
        x = torch.cat([nodes for nodes, _ in batch])
        owner = torch.cat([torch.full((len(nodes),), i) for i, (nodes, _) in enumerate(batch)])
        return x, owner, torch.tensor([label for _, label in batch])

    loader = DataLoader(graphs, batch_size=3, collate_fn=collate)
    tracin = TracInCP(model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    grads = reference_grads(
        ReversedHead,
        paths,
        graphs,
        lambda net, x: net(x.double(), torch.zeros(len(x), dtype=torch.long)),
    )
    x, owner, labels = collate(graphs[:3])
    torch.testing.assert_close(
        tracin.influence((x, owner), labels, k=None).double(),
        reference_scores(grads, slice(0, 3)),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(
        tracin.self_influence().double(), reference_self(grads), rtol=1e-4, atol=1e-6
    )
    assert set(tracin._engine.strategies.values()) == {"generic"}
    fast = TracInCPFast(model, "fc", loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    head = reference_grads(
        ReversedHead,
        paths,
        graphs,
        lambda net, x: net(x.double(), torch.zeros(len(x), dtype=torch.long)),
        only="fc",
    )
    torch.testing.assert_close(
        fast.self_influence().double(), reference_self(head), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("one_pass_per_example", [False, True])
def test_both_jacobian_methods_are_exact(text_case, one_pass_per_example):
    """The packed path takes an example block's gradients by one vectorised backward pass
    or one pass per example, whichever it timed faster on the first block: each, forced,
    gives the float64 loop's self-influence and scores."""
    model, paths, train = text_case
    loader = DataLoader(train, batch_size=5, collate_fn=collate_text)
    tracin = TracInCP(model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    tokens, offsets, labels = collate_text(train[:4])
    tracin.influence((tokens, offsets), labels, k=None)  # strategies settled
    generic = tracin._engine.generic
    assert generic is not None and generic._packed_loop is not None  # it was timed
    generic._packed_loop = one_pass_per_example
    grads = reference_grads(BagText, paths, train, bag_alone)
    torch.testing.assert_close(
        tracin.self_influence().double(), reference_self(grads), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        tracin.influence((tokens, offsets), labels, k=None).double(),
        reference_scores(grads, slice(0, 4)),
        rtol=1e-4,
        atol=1e-4,
    )


class BagRegressor(BagText):
    """BagText with two outputs read as a regression."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0]), reduction="mean"),
        nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"),
        nn.NLLLoss(reduction="mean"),
        nn.MSELoss(reduction="mean"),
        nn.SmoothL1Loss(reduction="sum"),
    ],
    ids=["ce-weighted-mean", "ce-smoothed-sum", "nll-mean", "mse-mean", "smoothl1-sum"],
)
def test_reducing_losses_give_each_example_its_loss_alone(tmp_path, loss_fn):
    """Each example's loss in a packed batch is its loss alone (one batched evaluation for
    torch's own losses): class weights cancel in an example's own mean, smoothing and sums
    stay; the float64 loop runs the same loss on each example alone."""
    regression = isinstance(loss_fn, (nn.MSELoss, nn.SmoothL1Loss))
    make = BagRegressor if regression else BagText
    torch.manual_seed(0)
    model = make()
    paths = save_checkpoints(model, tmp_path)
    g = torch.Generator().manual_seed(11)
    train = [
        (t, torch.randn(2, generator=g)) if regression else (t, label)
        for t, label in texts(14, seed=6)
    ]

    def collate(batch):
        tokens = [t for t, _ in batch]
        offsets = torch.tensor([0] + [len(t) for t in tokens[:-1]]).cumsum(0)
        labels = [y for _, y in batch]
        return (
            torch.cat(tokens),
            offsets,
            torch.stack(labels) if regression else torch.tensor(labels),
        )

    def run(net, tokens):
        out = net(tokens, torch.tensor([0]))
        return torch.log_softmax(out, dim=1) if isinstance(loss_fn, nn.NLLLoss) else out

    class Model(make):  # NLL takes log-probabilities: the model gives them
        def forward(self, tokens, offsets):
            out = super().forward(tokens, offsets)
            return torch.log_softmax(out, dim=1) if isinstance(loss_fn, nn.NLLLoss) else out

    scored = Model()
    scored.load_state_dict(model.state_dict())
    loader = DataLoader(train, batch_size=5, collate_fn=collate)
    tracin = TracInCP(scored, loader, paths, loss_fn=loss_fn, sample_wise_grads_per_batch=True)
    ref_loss = copy.deepcopy(loss_fn).double()  # (its class weights in float64 too)
    want = []
    for path in paths:
        state = torch.load(path)
        net = make().double()
        net.load_state_dict(state["model_state_dict"])
        rows = []
        for tokens, y in train:
            net.zero_grad()
            target = y[None].double() if regression else torch.tensor([y])
            ref_loss(run(net, tokens), target).backward()
            rows.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        want.append(torch.stack(rows) * state["learning_rate"] ** 0.5)
    torch.testing.assert_close(
        tracin.self_influence().double(), reference_self(want), rtol=1e-4, atol=1e-5
    )


class WeightedBag(nn.Module):
    """Text classifier over bags of weighted tokens: model(tokens, offsets, weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(40, 5, mode="sum")
        self.hidden = nn.Linear(5, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, tokens, offsets, weights):
        pooled = self.bag(tokens, offsets, per_sample_weights=weights)
        return self.fc(torch.tanh(self.hidden(pooled)))


def collate_weighted(batch):
    tokens = [t for (t, _), _ in batch]
    offsets = torch.tensor([0] + [len(t) for t in tokens[:-1]]).cumsum(0)
    weights = torch.cat([w for (_, w), _ in batch])
    return torch.cat(tokens), offsets, weights, torch.tensor([label for _, label in batch])


def weighted_texts(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed + 100)
    return [((t, torch.rand(len(t), generator=g)), label) for t, label in texts(n, seed)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layers", [None, ["bag"]], ids=["all", "embedding"])
@pytest.mark.parametrize("one_pass_per_example", [False, True])
def test_a_non_finite_example_leaves_the_rest_of_its_packed_batch_exact(
    tmp_path, bad, layers, one_pass_per_example
):
    """One text whose token weight is NaN or infinite, in a packed batch: it alone gets
    non-finite scores and is the only one the warning names, on the training and the
    test side; every other example's scores and self-influence are the float64 loop's
    over single examples (the whole batch's backward pass multiplies that example's
    activations by zeros for the other examples, 0 * nan, before the pooling)."""
    torch.manual_seed(0)
    model = WeightedBag()
    paths = save_checkpoints(model, tmp_path)
    train, test = weighted_texts(11, seed=1), weighted_texts(4, seed=2)
    train[6][0][1][0] = bad
    test[1][0][1][0] = bad
    loader = DataLoader(train, batch_size=4, collate_fn=collate_weighted)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    tracin = TracInCP(model, loader, paths, loss_fn=loss_fn, layers=layers)
    *inputs, labels = collate_weighted(test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin.influence(tuple(inputs), labels, k=None)  # strategies settled
    generic = tracin._engine.generic
    assert generic is not None and generic._packed_loop is not None
    generic._packed_loop = one_pass_per_example
    grads = reference_grads(
        WeightedBag,
        paths,
        train + test,
        lambda net, ex: net(ex[0], torch.tensor([0]), ex[1].double()),
        only=None if layers is None else "bag",
    )
    want = sum(g[11:] @ g[:11].T for g in grads)
    with pytest.warns(RuntimeWarning, match=r"training examples \[6\]; test examples \[1\]\."):
        scores = tracin.influence(tuple(inputs), labels, k=None).double()
    with pytest.warns(RuntimeWarning, match=r"training examples \[6\]\. "):
        self_scores = tracin.self_influence().double()
    good_train = [j for j in range(11) if j != 6]
    good_test = [0, 2, 3]
    assert (~torch.isfinite(scores)).nonzero().tolist() == sorted(
        [[1, j] for j in range(11)] + [[i, 6] for i in good_test]
    )
    assert (~torch.isfinite(self_scores)).nonzero().flatten().tolist() == [6]
    torch.testing.assert_close(
        scores[good_test][:, good_train], want[good_test][:, good_train], rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        self_scores[good_train],
        reference_self([g[:11] for g in grads])[good_train],
        rtol=1e-4,
        atol=1e-5,
    )


class MaskedGraph(nn.Module):
    """MeanPoolGraph beside a log-softmax over node features with one column masked by
    ``-inf``: every example saves an infinity of its own for the backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.node = nn.Linear(4, 5)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, graph_of_node: torch.Tensor) -> torch.Tensor:
        h = self.node(x)
        mask = torch.zeros(5, dtype=h.dtype).index_fill(0, torch.tensor([4]), float("-inf"))
        h = torch.cat([torch.relu(h), torch.log_softmax(h + mask, dim=1)[:, :1]], 1)
        n = int(graph_of_node.max()) + 1
        sums = h.new_zeros(n, h.shape[1]).index_add(0, graph_of_node, h)
        return self.fc(sums / torch.bincount(graph_of_node, minlength=n)[:, None].to(h.dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("make", [MeanPoolGraph, MaskedGraph], ids=["mean", "masked"])
def test_a_graph_with_a_non_finite_node_leaves_the_other_graphs_exact(tmp_path, bad, make):
    """A node feature NaN or infinite in one graph of a packed batch: TracInCP (all
    layers, and the node layer before the pooling) and TracInCPFast score every other
    graph as the float64 loop over single graphs does, and name that graph alone; also
    where every graph's own backward pass reads an infinity (a ``-inf`` mask)."""
    torch.manual_seed(0)
    model = make()
    paths = save_checkpoints(model, tmp_path)
    graphs = random_graphs(10)
    graphs[3][0][0, 1] = bad

    collate = collate_graphs

    loader = DataLoader(graphs, batch_size=5, collate_fn=collate)
    good = [i for i in range(10) if i != 3]
    x, graph_of_node, labels = collate(graphs[:4])

    def alone(net, nodes):
        return net(nodes.double(), torch.zeros(len(nodes), dtype=torch.long))

    for layers in (None, ["node"]):
        tracin = TracInCP(
            model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"), layers=layers
        )
        grads = reference_grads(make, paths, graphs, alone, only=layers and "node")
        with pytest.warns(RuntimeWarning, match=r"training examples \[3\]\. "):
            self_scores = tracin.self_influence().double()
        assert (~torch.isfinite(self_scores)).nonzero().flatten().tolist() == [3]
        torch.testing.assert_close(
            self_scores[good], reference_self(grads)[good], rtol=1e-4, atol=1e-6
        )
        with pytest.warns(RuntimeWarning, match=r"training examples \[3\]; test examples \[3\]\."):
            scores = tracin.influence((x, graph_of_node), labels, k=None).double()
        torch.testing.assert_close(
            scores[:3][:, good], reference_scores(grads, slice(0, 3))[:, good], rtol=1e-4, atol=1e-6
        )
    fast = TracInCPFast(model, "fc", loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    head = reference_grads(make, paths, graphs, alone, only="fc")
    with pytest.warns(RuntimeWarning, match=r"training examples \[3\]\. "):
        self_scores = fast.self_influence().double()
    assert (~torch.isfinite(self_scores)).nonzero().flatten().tolist() == [3]
    torch.testing.assert_close(self_scores[good], reference_self(head)[good], rtol=1e-4, atol=1e-6)


def test_finite_packed_batches_are_not_taken_again(text_case, monkeypatch):
    """Only a batch with an example whose loss is not finite is taken again (see
    test_a_non_finite_example_leaves_the_rest_of_its_packed_batch_exact): a finite
    one costs its one forward pass and Jacobian, as before."""
    from proponents.gradients.generic import GenericGradients

    def taken_again(*args, **kwargs):
        raise AssertionError("a finite packed batch was taken again")

    monkeypatch.setattr(GenericGradients, "_contain", taken_again)
    model, paths, train = text_case
    loader = DataLoader(train, batch_size=5, collate_fn=collate_text)
    tracin = TracInCP(model, loader, paths, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    assert torch.isfinite(tracin.self_influence()).all()


class _OrderedBag(nn.Module):
    """An EmbeddingBag model called as model(tokens, offsets) or model(offsets, tokens)."""

    def __init__(self, offsets_first: bool) -> None:
        super().__init__()
        self.offsets_first = offsets_first
        self.bag = nn.EmbeddingBag(40, 6, mode="mean")
        self.fc = nn.Linear(6, 3)

    def forward(self, a, b):
        tokens, offsets = (b, a) if self.offsets_first else (a, b)
        return self.fc(torch.tanh(self.bag(tokens, offsets)))


@pytest.mark.parametrize("offsets_first, longest", [(False, 1), (True, 4)])
def test_a_large_packed_batch_that_looks_unpacked_is_run_whole(tmp_path, offsets_first, longest):
    """A packed batch whose first input has a row per example (one-token texts, or the
    offsets given first) is not flagged as packed; cutting it into pieces of 256 left
    offsets pointing into the whole batch ("offsets[0] has to be 0"). Such a batch is run
    whole: a large self_influence batch and a large RandProj test batch score as the same
    examples taken one by one."""
    from torch.utils.data import DataLoader

    from proponents import TracInCPFast, TracInCPFastRandProj

    def texts(n, seed):
        g = torch.Generator().manual_seed(seed)
        return [
            (
                torch.randint(
                    0, 40, (int(torch.randint(1, longest + 1, (1,), generator=g)),), generator=g
                ),
                int(torch.randint(0, 3, (1,), generator=g)),
            )
            for _ in range(n)
        ]

    def collate(batch):
        toks = [t for t, _ in batch]
        offsets = torch.tensor([0] + [len(t) for t in toks[:-1]]).cumsum(0)
        labels = torch.tensor([label for _, label in batch])
        inputs = (offsets, torch.cat(toks)) if offsets_first else (torch.cat(toks), offsets)
        return (*inputs, labels)

    torch.manual_seed(0)
    model = _OrderedBag(offsets_first)
    paths = []
    for c in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        paths.append(tmp_path / f"c{c}.pt")
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.5 + c}, paths[-1])
    train = DataLoader(texts(40, 1), batch_size=8, collate_fn=collate)
    big = texts(300, 2)
    batch = collate(big)
    one_by_one = DataLoader(big, batch_size=1, collate_fn=collate)
    loss = nn.CrossEntropyLoss(reduction="sum")
    fast = TracInCPFast(model, "fc", train, paths, loss_fn=loss)
    torch.testing.assert_close(fast.self_influence(batch), fast.self_influence(one_by_one))
    index = TracInCPFastRandProj(model, "fc", train, paths, loss_fn=loss)
    got = index.influence(tuple(batch[:-1]), batch[-1], k=None)
    want = torch.cat([index.influence(tuple(b[:-1]), b[-1], k=None) for b in one_by_one])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
