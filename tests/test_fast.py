"""TracInCPFast and TracInCPFastRandProj: exact last-layer TracIn, embeddings, persistence."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import (
    MODELS,
    assert_close,
    assert_unchanged,
    make_case,
    model_snapshot,
    reference_scores,
    reference_self,
    save_checkpoints,
)
from proponents import (
    AnnoyNearestNeighbors,
    ExactNearestNeighbors,
    FaissNearestNeighbors,
    TracInCP,
    TracInCPFast,
    TracInCPFastRandProj,
)
from proponents.errors import (
    ArgumentTypeError,
    CheckpointChangedError,
    IndexMismatchError,
    IndexNotFoundError,
    InvalidArgumentError,
)
from proponents.gradients.engine import GradientEngine

FINAL = {
    "mlp": "fc2",
    "cnn": "fc",
    "embed": "head",
    "two_input": "out",
    "regression": "fc",
    "attention": "head",
}


def fast(case, cls=TracInCPFast, reduction="sum", batch_size=4, **kw):
    return cls(
        case.model,
        FINAL[case.name],
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn(reduction),
        batch_size=batch_size,
        **kw,
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_fast_equals_tracincp_on_the_final_layer_and_the_loop_reference(name, tmp_path):
    case = make_case(name, tmp_path)
    layer = [FINAL[name]]
    t = fast(case)
    full = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        layers=layer,
        loss_fn=case.loss_fn("sum"),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    scores = t.influence(case.test_inputs, case.test_labels)
    assert_close(scores, full.influence(case.test_inputs, case.test_labels), rtol=1e-5)
    assert_close(scores, reference_scores(case, layer))
    assert_close(t.influence(), reference_self(case, layer))
    top = t.influence(case.test_inputs, case.test_labels, k=3, proponents=False)
    want = torch.sort(scores, dim=1)
    assert torch.equal(top.indices, want.indices[:, :3])


def test_frozen_parameters_are_differentiated_and_stay_frozen(tmp_path):
    case = make_case("cnn", tmp_path)
    layer = [FINAL["cnn"]]
    want, want_self = reference_scores(case, layer), reference_self(case, layer)
    for p in case.model.parameters():
        p.requires_grad_(False)
    t = fast(case)
    assert_close(t.influence(case.test_inputs, case.test_labels), want)
    assert_close(t.influence(), want_self)
    assert not any(p.requires_grad for p in case.model.parameters())
    assert all(p.grad is None for p in case.model.parameters())


def test_fast_includes_the_bias(tmp_path):
    case = make_case("mlp", tmp_path)
    with_bias = fast(case).influence(case.test_inputs, case.test_labels)
    weight_only = 0
    for ckpt, lr in zip(case.checkpoints, case.lrs):
        from conftest import reference_grads

        gt = reference_grads(case, ckpt, case.test_inputs, case.test_labels, ["fc2"])[:, :24]
        gr = reference_grads(case, ckpt, case.train_inputs, case.train_labels, ["fc2"])[:, :24]
        weight_only = weight_only + lr * gt @ gr.T
    assert not torch.allclose(with_bias.double(), weight_only, rtol=1e-3)


class SquashedHead(nn.Module):
    """A final Linear followed by a nonlinearity: the loss sees tanh(fc(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return torch.tanh(self.fc(torch.relu(self.body(x))))


def test_layer_followed_by_a_nonlinearity_is_exact(tmp_path):
    torch.manual_seed(0)
    model = SquashedHead()
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.3}, path)
    t = TracInCPFast(
        model,
        model.fc,
        TensorDataset(x, y),
        [path],
        loss_fn=nn.MSELoss(reduction="sum"),
        batch_size=3,
    )
    scores = t.influence((x[:3],), y[:3])
    rows = []
    m = model.double()
    for i in range(10):
        m.zero_grad()
        nn.functional.mse_loss(
            m(x[i : i + 1].double()), y[i : i + 1].double(), reduction="sum"
        ).backward()
        rows.append(torch.cat([m.fc.weight.grad.flatten(), m.fc.bias.grad]))
    g = torch.stack(rows)
    assert_close(scores, 0.3 * g[:3] @ g.T)
    assert t._engine._closed_form is False  # the loss does not see fc's output itself


def test_final_layer_by_module_or_dotted_name(tmp_path):
    case = make_case("attention", tmp_path)
    by_name = TracInCPFast(
        case.model,
        "attn.out_proj",
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=5,
    )
    by_module = TracInCPFast(
        case.model,
        case.model.attn.out_proj,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=5,
    )
    a = by_name.influence(case.test_inputs, case.test_labels)
    assert_close(a, by_module.influence(case.test_inputs, case.test_labels), rtol=1e-6)
    assert_close(a, reference_scores(case, ["attn.out_proj"]))


def test_bad_final_layer_and_loss(tmp_path):
    case = make_case("cnn", tmp_path)
    with pytest.raises(InvalidArgumentError, match="Linear layers are: fc"):
        TracInCPFast(
            case.model, "conv1", case.dataset, case.checkpoints, loss_fn=case.loss_fn("sum")
        )
    with pytest.raises(InvalidArgumentError, match="fc"):
        TracInCPFast(
            case.model, "nope", case.dataset, case.checkpoints, loss_fn=case.loss_fn("sum")
        )
    with pytest.raises(InvalidArgumentError, match="not a submodule"):
        TracInCPFast(
            case.model, nn.Linear(2, 2), case.dataset, case.checkpoints, loss_fn=case.loss_fn("sum")
        )
    with pytest.raises(ArgumentTypeError, match="final_fc_layer"):
        TracInCPFast(case.model, 3, case.dataset, case.checkpoints, loss_fn=case.loss_fn("sum"))
    with pytest.raises(InvalidArgumentError, match="reduction='none'"):
        fast(case, reduction="none")
    with pytest.raises(InvalidArgumentError, match="needs loss_fn"):
        TracInCPFast(case.model, "fc", case.dataset, case.checkpoints)
    for dim in (0, -3):
        with pytest.raises(InvalidArgumentError, match="projection_dim"):
            fast(case, TracInCPFastRandProj, projection_dim=dim)
    with pytest.raises(ArgumentTypeError, match="projection_dim"):
        fast(case, TracInCPFastRandProj, projection_dim=2.5)


def test_randproj_unprojected_equals_fast(tmp_path):
    case = make_case("embed", tmp_path)
    exact = fast(case).influence(case.test_inputs, case.test_labels)
    rp = fast(case, TracInCPFastRandProj)
    assert rp.embedding_dim == 3 * 3 * 6  # 3 checkpoints x (3 outputs x (5 inputs + bias))
    assert_close(rp.influence(case.test_inputs, case.test_labels, k=None), exact, rtol=1e-5)
    top = rp.influence(case.test_inputs, case.test_labels)  # k defaults to 5
    want = torch.sort(exact, dim=1, descending=True)
    assert top.indices.shape == (4, 5)
    assert torch.equal(top.indices, want.indices[:, :5])
    assert_close(top.influence_scores, want.values[:, :5], rtol=1e-5)
    low = rp.influence(case.test_inputs, case.test_labels, k=2, proponents=False)
    want = torch.sort(exact, dim=1)
    assert torch.equal(low.indices, want.indices[:, :2])
    assert_close(low.influence_scores, want.values[:, :2], rtol=1e-5)


def test_randproj_has_no_self_influence(tmp_path):
    rp = fast(make_case("mlp", tmp_path), TracInCPFastRandProj)
    with pytest.raises(NotImplementedError, match="TracInCPFast"):
        rp.self_influence()
    with pytest.raises(NotImplementedError, match="TracInCPFast"):
        rp.influence()


BACKENDS = {
    "exact": (None, lambda: ExactNearestNeighbors(block_size=3)),
    "annoy": ("annoy", lambda: AnnoyNearestNeighbors(num_trees=50, search_k=100000)),
    "faiss": ("faiss", lambda: FaissNearestNeighbors("Flat")),
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_gives_the_exact_top_k(tmp_path, name):
    extra, backend = BACKENDS[name]
    if extra is not None:
        pytest.importorskip(extra, reason=f"optional extra [{extra}] not installed")
    case = make_case("mlp", tmp_path)
    rp = fast(case, TracInCPFastRandProj, nearest_neighbors=backend())
    exact = fast(case).influence(case.test_inputs, case.test_labels)
    for proponents in (True, False):
        top = rp.influence(case.test_inputs, case.test_labels, k=4, proponents=proponents)
        want = torch.sort(exact, dim=1, descending=proponents)
        assert torch.equal(top.indices, want.indices[:, :4])
        assert_close(top.influence_scores, want.values[:, :4], rtol=1e-5)


def _wide_case(tmp_path, n_train=300):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 8))
    x, y = torch.randn(n_train + 20, 10), torch.randint(0, 8, (n_train + 20,))
    paths = []
    for c in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        paths.append(tmp_path / f"c{c}.pt")
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.5 + c}, paths[-1])
    return model, TensorDataset(x[:n_train], y[:n_train]), x[n_train:], y[n_train:], paths


def test_projection_is_seeded_unbiased_and_faithful(tmp_path):
    model, train, xt, yt, paths = _wide_case(tmp_path)
    loss = nn.CrossEntropyLoss(reduction="sum")
    exact = TracInCPFast(model, "2", train, paths, loss_fn=loss, batch_size=64).influence((xt,), yt)
    state = torch.get_rng_state()
    a = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=loss, batch_size=64, projection_dim=64, seed=7
    )
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=loss, batch_size=64, projection_dim=64, seed=7
    )
    assert torch.equal(a.embeddings, b.embeddings)
    assert a.embedding_dim == 2 * 64
    estimates = []
    for seed in range(5):
        rp = TracInCPFastRandProj(
            model, "2", train, paths, loss_fn=loss, batch_size=64, projection_dim=256, seed=seed
        )
        s = rp.influence((xt,), yt, k=None)
        corr = torch.corrcoef(torch.stack([s.flatten(), exact.flatten()]))[0, 1]
        assert corr > 0.85
        estimates.append(s)
    # the average of independent projections approaches the exact scores
    mean_err = (torch.stack(estimates).mean(0) - exact).abs().mean()
    single_err = (estimates[0] - exact).abs().mean()
    assert mean_err < single_err


def test_projection_never_goes_up():
    from proponents.projection import GradientProjection

    p = GradientProjection.create(3, 4, 100, 0, torch.float32, torch.device("cpu"))
    assert p.kind == "none" and p.dim == 12
    q = GradientProjection.create(1000, 2049, 64, 0, torch.float32, torch.device("cpu"))
    assert q.kind == "kronecker" and q.dim == 64
    r = GradientProjection.create(2, 2049, 100, 0, torch.float32, torch.device("cpu"))
    assert r.dim == 100 and r.kind == "dense"


@pytest.mark.parametrize("projection_dim", [1, 2, 10, 99, 100, 101, 1000, 4095])
@pytest.mark.parametrize("out_features, in_features", [(1, 7), (3, 2049), (10, 1000), (1000, 2049)])
def test_kronecker_dimension_is_at_most_projection_dim(out_features, in_features, projection_dim):
    from proponents.projection import GradientProjection

    p = GradientProjection.create(
        out_features,
        in_features,
        projection_dim,
        0,
        torch.float64,
        torch.device("cpu"),
        max_matrix_elements=0,
    )
    full = out_features * in_features
    if projection_dim >= full:
        assert p.kind == "none" and p.dim == full
        return
    assert p.kind == "kronecker"
    r_g, r_a = p.matrices
    assert r_g.shape[0] == out_features and r_a.shape[0] == in_features
    assert p.dim == r_g.shape[1] * r_a.shape[1] <= projection_dim
    # as close to projection_dim as the rule allows: a factor is full, or within d_g of it
    d_g = r_g.shape[1]
    assert d_g == out_features or r_a.shape[1] == in_features or projection_dim - p.dim < d_g


def test_kronecker_projection_is_unbiased():
    from proponents.gradients.representations import FactoredGrads
    from proponents.projection import GradientProjection

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 1, 40, generator=g, dtype=torch.float64)
    gr = torch.randn(6, 1, 30, generator=g, dtype=torch.float64)
    rep = FactoredGrads(a, gr)
    exact = rep.dense() @ rep.dense().T
    est = 0
    n = 400
    for seed in range(n):
        p = GradientProjection.create(
            30, 40, 64, seed, torch.float64, torch.device("cpu"), max_matrix_elements=0
        )
        assert p.kind == "kronecker"
        e = p(rep)
        est = est + e @ e.T / n
        dense = GradientProjection("kronecker", p.dim, p.matrices)(
            type(rep)(a, gr, _dense=rep.dense())
        )
        assert_close(dense, e, rtol=1e-10) if seed == 0 else None
    assert_close(est, exact, rtol=0.15)


def test_save_and_load_without_re_embedding(tmp_path):
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=120)
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=loss, batch_size=50, projection_dim=32, seed=3
    )
    want = rp.influence((xt,), yt, k=6)
    rp.save(tmp_path / "index")
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    restored = TracInCPFastRandProj.load(
        tmp_path / "index", model, paths, loss, train_dataset=train
    )
    assert calls == []  # nothing re-embedded
    handle.remove()
    got = restored.influence((xt,), yt, k=6)
    assert torch.equal(got.indices, want.indices)
    assert_close(got.influence_scores, want.influence_scores, rtol=1e-6)
    assert restored.seed == 3 and restored.projection_dim == 32


def test_load_refuses_other_checkpoints_or_data(tmp_path):
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=50)
    rp.save(tmp_path / "index")
    with pytest.raises(IndexMismatchError, match="built from 2, 1 were given") as refused:
        TracInCPFastRandProj.load(tmp_path / "index", model, paths[:1], loss)
    assert "final_fc_layer:" not in str(refused.value)  # the layer is the same one
    # reversed: both positions hold other contents, each named with its file
    first, second = (re.escape(os.path.basename(str(p))) for p in paths[::-1])
    with pytest.raises(
        IndexMismatchError, match=rf"checkpoint\(s\) 1 \({first}\), 2 \({second}\) of 2 differ"
    ):
        TracInCPFastRandProj.load(tmp_path / "index", model, paths[::-1], loss)
    shorter = TensorDataset(*train[:50])
    with pytest.raises(IndexMismatchError, match="holds 60 examples, the dataset given has 50"):
        TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss, train_dataset=shorter)
    mean = nn.CrossEntropyLoss(reduction="mean")
    with pytest.raises(IndexMismatchError, match="loss_fn: .*'sum', this one reduces by 'mean'"):
        TracInCPFastRandProj.load(tmp_path / "index", model, paths, mean)
    # the same reduction, another loss or other settings: the embeddings are of another loss
    margin = nn.MultiMarginLoss(reduction="sum")
    with pytest.raises(IndexMismatchError, match="CrossEntropyLoss, this one is .*MultiMarginLoss"):
        TracInCPFastRandProj.load(tmp_path / "index", model, paths, margin)
    for other in (
        nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
        nn.CrossEntropyLoss(reduction="sum", weight=torch.linspace(1, 2, 8)),
    ):
        with pytest.raises(IndexMismatchError, match="CrossEntropyLoss with other settings"):
            TracInCPFastRandProj.load(tmp_path / "index", model, paths, other)
    same = TracInCPFastRandProj.load(  # a new object with the same settings is the same loss
        tmp_path / "index", model, paths, nn.CrossEntropyLoss(reduction="sum")
    )
    assert torch.equal(same.embeddings, rp.embeddings)
    with pytest.raises(IndexMismatchError, match="final_fc_layer: .*'2', not '0'"):
        TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss, final_fc_layer="0")
    with pytest.raises(FileNotFoundError):
        TracInCPFastRandProj.load(tmp_path / "nothing", model, paths, loss)


def test_load_tells_lambda_losses_apart_by_their_code(tmp_path):
    """Two lambdas share one name, "<lambda>": an index built with one loaded with another
    of the same reduction (an MSE for a cross-entropy, a lambda capturing other class
    weights) was accepted, and its embeddings were gradients of the other loss."""
    import torch.nn.functional as F

    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=30)
    weights = torch.linspace(1, 2, 8)

    def weighted(w, margin=False):
        """Lambdas of one qualified name, as a script edited between sessions gives."""
        if margin:
            return lambda out, y: F.multi_margin_loss(out, y, reduction="sum")
        return lambda out, y: F.cross_entropy(out, y, weight=w, reduction="sum")

    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=weighted(weights))
    want = rp.influence((xt,), yt, k=None)
    rp.save(tmp_path / "index")
    again = TracInCPFastRandProj.load(tmp_path / "index", model, paths, weighted(weights.clone()))
    torch.testing.assert_close(again.influence((xt,), yt, k=None), want, rtol=0, atol=0)
    others = (
        weighted(torch.linspace(1, 3, 8)),  # the same code, other captured weights
        weighted(weights, margin=True),  # other code
    )
    for other in others:
        with pytest.raises(IndexMismatchError, match="a function of the same name whose code"):
            TracInCPFastRandProj.load(tmp_path / "index", model, paths, other)


def test_loss_codes_count_only_under_one_python_version():
    from proponents.fingerprints import loss_fingerprint, losses_differ

    a = loss_fingerprint(lambda out, y: (out - y).pow(2).sum())
    b = loss_fingerprint(lambda out, y: (out - y).abs().sum())
    assert a["class"] == b["class"] and a["code"] != b["code"]
    assert losses_differ(a, b)
    older = {"class": a["class"], "digest": a["digest"]}  # saved before codes were recorded
    assert not losses_differ(older, b) and not losses_differ(b, older)
    assert not losses_differ({**a, "python": "2.7"}, b)  # bytecode of another interpreter
    assert not losses_differ(a, loss_fingerprint(lambda out, y: (out - y).pow(2).sum()))
    module = loss_fingerprint(nn.MSELoss(reduction="sum"))
    assert "code" not in module  # a loss module is described by its class and settings


def test_an_index_built_from_loaded_checkpoints_loads_with_their_files(tmp_path):
    """Checkpoints given as loaded objects at build time and as the files they came from
    at load time: each file is compared by what it loads as, so the index loads and
    answers as before; a file with other weights is refused as changed content, and
    loaded objects for an index built from files are refused, saying why."""
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=40)
    loss = nn.CrossEntropyLoss(reduction="sum")
    objects = [torch.load(p, weights_only=True) for p in paths]
    rp = TracInCPFastRandProj(model, "2", train, objects, loss_fn=loss, projection_dim=6)
    want = rp.influence((xt,), yt, k=None)
    rp.save(tmp_path / "from-objects")
    loaded = TracInCPFastRandProj.load(tmp_path / "from-objects", model, paths, loss)
    torch.testing.assert_close(loaded.influence((xt,), yt, k=None), want, rtol=0, atol=0)
    other = torch.load(paths[1], weights_only=True)
    other["model_state_dict"]["2.bias"] = other["model_state_dict"]["2.bias"] + 1.0
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(
        IndexMismatchError, match=r"contents of checkpoint\(s\) 2 \(other\.pt\) of 2"
    ):
        TracInCPFastRandProj.load(tmp_path / "from-objects", model,
                                  [paths[0], tmp_path / "other.pt"], loss)  # fmt: skip
    TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss).save(tmp_path / "from-files")
    with pytest.raises(IndexMismatchError, match=r"1 \(file then, object now\), 2 \(file"):
        TracInCPFastRandProj.load(tmp_path / "from-files", model, objects, loss)


def test_loading_with_another_backend_builds_it_without_a_warning(tmp_path):
    """An index saved with exact search, loaded with Faiss: nothing of Faiss was saved, so
    it is built from the embeddings, silently (it used to warn of a damaged index)."""
    from proponents import FaissNearestNeighbors

    pytest.importorskip("faiss", reason="the faiss extra is not installed")
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=30)
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss)
    want = rp.influence((xt,), yt, k=4)
    rp.save(tmp_path / "index")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss,
                                           nearest_neighbors=FaissNearestNeighbors())  # fmt: skip
    got = loaded.influence((xt,), yt, k=4)
    assert got.indices.tolist() == want.indices.tolist()


def test_load_compares_the_examples_a_loader_reads_in_its_order(tmp_path):
    """A DataLoader's sampler or batch sampler decides which examples it reads, in which
    order: an index built from examples 0-9 (through a batch sampler) loads with any
    wrapper over those examples in that order (a Subset, the same sampler) and is refused
    for examples 10-19 or the same ones reversed, which it used to accept."""
    from torch.utils.data import DataLoader, Subset

    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=20)
    loss = nn.CrossEntropyLoss(reduction="sum")
    first = DataLoader(train, batch_sampler=[list(range(0, 6)), list(range(6, 10))])
    rp = TracInCPFastRandProj(model, "2", first, paths, loss_fn=loss)
    want = rp.influence((xt,), yt, k=None)
    rp.save(tmp_path / "index")
    same = [Subset(train, range(10)), DataLoader(train, sampler=list(range(10)), batch_size=3)]
    for data in same:
        got = TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss, train_dataset=data)
        assert torch.equal(got.influence((xt,), yt, k=None), want)
    others = [
        DataLoader(train, batch_sampler=[list(range(10, 20))]),
        DataLoader(train, sampler=list(range(9, -1, -1)), batch_size=4),
    ]
    for data in others:
        with pytest.raises(IndexMismatchError, match="train_dataset: it has as many examples"):
            TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss, train_dataset=data)


def test_load_refuses_a_tensor_dataset_changed_where_it_is_not_sampled(tmp_path):
    """One value of one example changed at a position the sample does not read: a
    TensorDataset's probe covers every value, so the index is refused; the unchanged
    tensors (a copy of them, too) load."""
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=50).save(
        tmp_path / "index"
    )
    x, y = train.tensors
    TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss,
                              train_dataset=TensorDataset(x.clone(), y.clone()))  # fmt: skip
    changed = x.clone()
    changed[7, 0] += 1.0  # 7 is not one of the sampled 0, 15, 30, 44, 59
    with pytest.raises(IndexMismatchError, match="or for a TensorDataset any of its values"):
        TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss,
                                  train_dataset=TensorDataset(changed, y))  # fmt: skip


def test_load_refuses_a_dataset_of_the_same_length_with_other_examples(tmp_path):
    """The index records a sample of the examples it embedded (first, last, three in
    between): a dataset of the right length with another last example, or the same
    examples in another order, is refused by name; the same examples behind another
    wrapper (a DataLoader, a Subset) load, and a re-saved index keeps the sample."""
    from torch.utils.data import DataLoader, Subset

    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=50)
    want = rp.influence((xt,), yt, k=4)
    rp.save(tmp_path / "index")
    x, y = train.tensors
    last_changed = TensorDataset(torch.cat([x[:-1], x[:1]]), y)
    reversed_order = TensorDataset(x.flip(0), y.flip(0))
    for other in (last_changed, reversed_order, TensorDataset(x.double(), y)):
        with pytest.raises(IndexMismatchError, match="train_dataset: it has as many examples"):
            TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss, train_dataset=other)
    for same in (DataLoader(train, batch_size=7), Subset(train, range(60))):
        got = TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss, train_dataset=same)
        r = got.influence((xt,), yt, k=4)
        assert torch.equal(r.indices, want.indices)
    # restored without the dataset, saved again: the sample still travels with the index
    bare = TracInCPFastRandProj.load(tmp_path / "index", model, paths, loss)
    bare.save(tmp_path / "again")
    with pytest.raises(IndexMismatchError, match="train_dataset: it has as many examples"):
        TracInCPFastRandProj.load(
            tmp_path / "again", model, paths, loss, train_dataset=reversed_order
        )
    TracInCPFastRandProj.load(tmp_path / "again", model, paths, loss, train_dataset=train)


def test_float16_index_refuses_embeddings_beyond_its_range(tmp_path):
    """Embeddings above 65504 would be stored as inf and ranked last as if not finite:
    float16 storage refuses them, naming the examples a float32 index shows to exceed it
    (before: a warning about non-finite gradients and wrong rankings)."""
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=40)
    big = []
    for i, path in enumerate(paths):
        state = torch.load(path, weights_only=True)
        state["learning_rate"] = 1e9 * (i + 1)
        big.append(tmp_path / f"big{i}.pt")
        torch.save(state, big[-1])
    loss = nn.CrossEntropyLoss(reduction="sum")
    full = TracInCPFastRandProj(model, "2", train, big, loss_fn=loss, batch_size=16)
    over = (full.embeddings.abs() > 65504).any(dim=1).nonzero().flatten().tolist()
    assert 0 < len(over) < 40
    # refused at the first batch that overflows: the first checkpoint's first 16 rows
    first = full.embeddings[:16, : full.embedding_dim // 2]
    first_batch = (first.abs() > 65504).any(dim=1).nonzero().flatten().tolist()
    assert first_batch
    with pytest.raises(InvalidArgumentError, match="float16 cannot hold") as err:
        TracInCPFastRandProj(
            model, "2", train, big, loss_fn=loss, batch_size=16, index_dtype=torch.float16
        )
    more = f" and {len(first_batch) - 10} more" if len(first_batch) > 10 else ""
    assert f"[{', '.join(map(str, first_batch[:10]))}{more}]" in str(err.value)
    # nor does a float32 index saved and loaded as float16 store them as infinite (before:
    # accepted without a word, the overflowing rows ranked last), in memory or mapped
    full.save(tmp_path / "index")
    for budget in (None, 1):
        with pytest.raises(InvalidArgumentError, match="load: index_dtype=torch.float16") as err:
            TracInCPFastRandProj.load(tmp_path / "index", model, big, loss_fn=loss,
                                      index_dtype=torch.float16, memory_budget=budget)  # fmt: skip
        more = f" and {len(over) - 10} more" if len(over) > 10 else ""
        assert f"[{', '.join(map(str, over[:10]))}{more}]" in str(err.value)
    # within range, float16 storage still answers like float32 (to its precision)
    small = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=loss, batch_size=16, index_dtype=torch.float16
    )
    exact = TracInCPFast(model, "2", train, paths, loss_fn=loss).influence((xt,), yt)
    assert_close(small.influence((xt,), yt, k=None), exact, rtol=2e-3)


def test_a_float64_index_keeps_its_precision_through_save_and_load(tmp_path):
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=50)
    model = model.double()
    train = TensorDataset(train.tensors[0].double(), train.tensors[1])
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=20)
    assert rp.embeddings.dtype == torch.float64
    want = rp.influence((xt.double(),), yt, k=None)
    rp.save(tmp_path / "index")
    for budget in (None, 1):  # read, and memory-mapped from the saved file
        back = TracInCPFastRandProj.load(
            tmp_path / "index", model, paths, loss, train_dataset=train, memory_budget=budget
        )
        assert back.embeddings.dtype == torch.float64
        assert torch.equal(back.influence((xt.double(),), yt, k=None), want)


def test_load_refuses_embeddings_of_another_width(tmp_path):
    """A model whose final layer lost its bias (loaded leniently) gives 8-wide gradients per
    row instead of 33: refused by name instead of a shape error or silent scores."""
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=30)
    loss = nn.CrossEntropyLoss(reduction="sum")
    TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=30).save(
        tmp_path / "index"
    )
    other = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))

    def lenient(m, path):
        m.load_state_dict(torch.load(path, weights_only=True)["model_state_dict"], strict=False)
        return 1.0

    with pytest.raises(IndexMismatchError, match="final_fc_layer: the index holds embeddings"):
        TracInCPFastRandProj.load(
            tmp_path / "index", other, paths, loss, checkpoints_load_func=lenient
        )


def test_seed_projection_dim_and_k_take_any_integer_and_refuse_out_of_range_seeds(tmp_path):
    import numpy as np

    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=30)
    loss = nn.CrossEntropyLoss(reduction="sum")
    a = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=loss, projection_dim=12, seed=3, batch_size=30
    )
    b = TracInCPFastRandProj(
        model,
        "2",
        train,
        paths,
        loss_fn=loss,
        projection_dim=np.int64(12),
        seed=np.int32(3),
        batch_size=30,
    )
    assert torch.equal(a.embeddings, b.embeddings)
    ra, rb = a.influence((xt,), yt, k=4), b.influence((xt,), yt, k=np.int64(4))
    assert torch.equal(ra.indices, rb.indices)
    for seed in (2**43, -(2**43), 2**45):
        with pytest.raises(InvalidArgumentError, match="seed=.* is out of range"):
            TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, seed=seed)
    TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, seed=2**43 - 1, projection_dim=4)


def test_save_refuses_paths_that_cannot_hold_an_index_before_writing(tmp_path, monkeypatch):
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=30)
    rp = TracInCPFastRandProj(
        model, "2", train, paths, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=30
    )
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InvalidArgumentError, match="path is empty"):
        rp.save("")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file, not a directory"):
        rp.save(tmp_path / "a-file")
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "neighbors").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="neighbors' is a file"):
        rp.save(clash)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["a-file", "clash"])
    assert sorted(p.name for p in clash.iterdir()) == ["neighbors"]


def test_checkpoints_that_change_after_embedding_are_refused(tmp_path):
    """Queries and save() answer only for the checkpoints the training set was embedded
    with: other bytes (or a removed file) are refused by name, nothing is saved; a file
    only touched, or replaced by a copy of itself, still gives the same answers."""
    import os
    import shutil

    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=50)
    before = rp.influence((xt,), yt, k=None)
    exact = TracInCPFast(model, "2", train, paths, loss_fn=loss, batch_size=50)
    assert_close(before, exact.influence((xt,), yt))
    os.utime(paths[0], ns=(1, 1))  # touched: same bytes
    copy = tmp_path / "copy.pt"
    shutil.copy(paths[1], copy)
    os.replace(copy, paths[1])  # a new inode with the same bytes
    assert torch.equal(rp.influence((xt,), yt, k=None), before)
    original = paths[1].read_bytes()
    state = torch.load(paths[1], weights_only=True)
    state["model_state_dict"]["2.weight"] += 1.0
    torch.save(state, paths[1])  # overwritten in place, as a training run would
    with pytest.raises(CheckpointChangedError, match="c1.pt holds other content"):
        rp.influence((xt,), yt, k=3)
    with pytest.raises(CheckpointChangedError, match="c1.pt"):
        rp.save(tmp_path / "index")
    assert not (tmp_path / "index").exists()
    paths[1].write_bytes(original)  # put back: answers again
    assert torch.equal(rp.influence((xt,), yt, k=None), before)
    rp.save(tmp_path / "index")
    paths[0].unlink()
    with pytest.raises(CheckpointChangedError, match="c0.pt is gone"):
        rp.influence((xt,), yt, k=3)


def test_old_unchanged_checkpoints_are_not_read_again_and_fresh_ones_are(tmp_path, monkeypatch):
    """A file last modified long before it was recorded is trusted by its stat; a fresh
    one is hashed at every check, so a same-size rewrite within one timestamp tick (stat
    identical) is still caught."""
    import os

    import proponents.checkpoints as ckpts

    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    for p in paths:
        os.utime(p, ns=(10**18, 10**18))  # 2001: long before
    hashed = []
    full = ckpts.checkpoint_fingerprint
    monkeypatch.setattr(ckpts, "checkpoint_fingerprint", lambda c: hashed.append(c) or full(c))
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=50)
    assert len(hashed) == 2  # recorded once
    rp.influence((xt,), yt, k=3)
    rp.influence((xt,), yt, k=3)
    assert len(hashed) == 2  # trusted by stat: no reads

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _, _, _, _, new_paths = _wide_case(fresh, n_train=60)  # written just now
    rp = TracInCPFastRandProj(model, "2", train, new_paths, loss_fn=loss, batch_size=50)
    stat = new_paths[0].stat()
    data = bytearray(new_paths[0].read_bytes())
    state = torch.load(new_paths[0], weights_only=True)
    state["model_state_dict"]["2.bias"] += 1.0
    torch.save(state, new_paths[0])
    assert new_paths[0].stat().st_size == len(data)
    os.utime(new_paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same tick
    assert ckpts.checkpoint_signature(new_paths[0])[2:4] == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(CheckpointChangedError, match="c0.pt holds other content"):
        rp.influence((xt,), yt, k=3)


def test_an_old_checkpoint_rewritten_in_place_with_its_times_put_back_is_refused(tmp_path):
    """A same-size rewrite through the same inode whose modification time is then restored
    (os.utime, or a copy tool that keeps times): before, device, inode, size and
    modification time all matched and the change went unseen by queries and save. The
    status-change time cannot be put back, so the file is hashed again and refused."""
    import os

    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    for p in paths:
        os.utime(p, ns=(10**18, 10**18))  # long before: trusted by its stat
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=50)
    rp.influence((xt,), yt, k=3)
    stat = paths[1].stat()
    state = torch.load(paths[1], weights_only=True)
    state["model_state_dict"]["2.weight"] *= 5
    (tmp_path / "other").mkdir()
    torch.save(state, tmp_path / "other" / paths[1].name)  # the same name inside
    new = (tmp_path / "other" / paths[1].name).read_bytes()
    assert len(new) == stat.st_size
    with open(paths[1], "r+b") as handle:  # the same inode
        handle.write(new)
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = paths[1].stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        stat.st_ino, stat.st_size, stat.st_mtime_ns,
    )  # fmt: skip
    with pytest.raises(CheckpointChangedError, match="c1.pt holds other content"):
        rp.influence((xt,), yt, k=3)
    with pytest.raises(CheckpointChangedError, match="c1.pt"):
        rp.save(tmp_path / "index")


def test_a_loaded_checkpoint_object_changed_before_save_is_refused(tmp_path):
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=60)
    states = [torch.load(p, weights_only=True) for p in paths]
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(model, "2", train, states, loss_fn=loss, batch_size=50)
    with torch.no_grad():
        states[0]["model_state_dict"]["0.bias"].add_(1.0)
    with pytest.raises(CheckpointChangedError, match="checkpoint object #0"):
        rp.save(tmp_path / "index")
    assert not (tmp_path / "index").exists()


def test_randproj_leaves_the_model_unchanged(tmp_path):
    case = make_case("cnn", tmp_path)
    case.model.train()
    snap = model_snapshot(case.model)
    rp = fast(case, TracInCPFastRandProj, projection_dim=8)
    rp.influence(case.test_inputs, case.test_labels, k=2)
    fast(case).influence()
    assert_unchanged(case.model, snap)


def test_randproj_k_out_of_range(tmp_path):
    case = make_case("mlp", tmp_path)
    rp = fast(case, TracInCPFastRandProj)
    for k in (0, 14):
        with pytest.raises(InvalidArgumentError, match=f"k={k}"):
            rp.influence(case.test_inputs, case.test_labels, k=k)


@pytest.mark.parametrize("backend", ["exact", "annoy", "faiss"])
@pytest.mark.filterwarnings("ignore:TracInCPFast. non-finite loss")
def test_scores_that_overflow_rank_last_with_every_backend(tmp_path, backend):
    """Finite embeddings whose product overflows to +-inf: proponents and opponents rank
    that score last, as TracInCPFast does (RandProj used to put it first), for every
    nearest-neighbour backend; the k results are k_most of the k=None scores."""
    from proponents import AnnoyNearestNeighbors, FaissNearestNeighbors
    from proponents.scoring import k_most

    search = {"exact": ExactNearestNeighbors, "annoy": AnnoyNearestNeighbors,
              "faiss": FaissNearestNeighbors}[backend]()  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(3)
    paths = save_checkpoints(model, tmp_path, [1.0], g)
    x, y = torch.randn(12, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    x[4] *= 1e20  # finite input, finite embedding; its products with itself overflow
    data = TensorDataset(x, y)
    loss = nn.CrossEntropyLoss(reduction="sum")
    query = ((x[4:5],), y[4:5])
    with pytest.warns(RuntimeWarning, match=r"training examples \[4\]"):
        fast = TracInCPFast(model, "2", data, paths, loss_fn=loss)
        fast.influence(*query)
    rp = TracInCPFastRandProj(model, "2", data, paths, loss_fn=loss, nearest_neighbors=search)
    assert bool(torch.isfinite(rp.embeddings).all())
    full = rp.influence(*query, k=None)
    assert not bool(torch.isfinite(full[0, 4]))
    for proponents in (True, False):
        want = k_most(full, 5, proponents)
        got = rp.influence(*query, k=5, proponents=proponents)
        assert got.indices.tolist() == want[0].tolist()
        assert 4 not in got.indices.tolist()[0]  # the overflowing score is last
        fast_top = fast.influence(*query, k=5, proponents=proponents)
        assert got.indices.tolist() == fast_top.indices.tolist()


def test_randproj_ranks_non_finite_training_examples_last(tmp_path):
    case = make_case("mlp", tmp_path)
    x = case.train_inputs[0].clone()
    x[2, 1] = float("nan")
    data = TensorDataset(x, case.train_labels)
    with pytest.warns(RuntimeWarning, match=r"training examples \[2\]"):
        rp = TracInCPFastRandProj(
            case.model, "fc2", data, case.checkpoints, loss_fn=case.loss_fn("sum"), batch_size=4
        )
    exact = TracInCPFast(
        case.model, "fc2", data, case.checkpoints, loss_fn=case.loss_fn("sum"), batch_size=4
    )
    with pytest.warns(RuntimeWarning):
        want = exact.influence(case.test_inputs, case.test_labels, k=3)
    for proponents in (True, False):
        got = rp.influence(case.test_inputs, case.test_labels, k=3, proponents=proponents)
        assert not (got.indices == 2).any()
        assert torch.isfinite(got.influence_scores).all()
    got = rp.influence(case.test_inputs, case.test_labels, k=3)
    assert torch.equal(got.indices, want.indices)


def test_randproj_over_tensors_made_under_inference_mode(tmp_path):
    """A training set made under ``torch.inference_mode()`` keeps no version counters; the
    dataset fingerprint read them and raised. The index is built, saved and loaded, with
    TracInCPFast's scores."""
    case = make_case("mlp", tmp_path)
    with torch.inference_mode():
        data = TensorDataset(case.train_inputs[0] * 1, case.train_labels * 1)
    loss = case.loss_fn("sum")
    rp = TracInCPFastRandProj(case.model, "fc2", data, case.checkpoints, loss_fn=loss, batch_size=4)
    exact = TracInCPFast(case.model, "fc2", data, case.checkpoints, loss_fn=loss, batch_size=4)
    want = exact.influence(case.test_inputs, case.test_labels)
    assert_close(rp.influence(case.test_inputs, case.test_labels, k=None), want)
    rp.save(tmp_path / "index")
    back = TracInCPFastRandProj.load(
        tmp_path / "index",
        case.model,
        case.checkpoints,
        train_dataset=data,
        loss_fn=loss,
        batch_size=4,
    )
    assert_close(back.influence(case.test_inputs, case.test_labels, k=None), want)


def test_infinite_and_nan_scores_rank_last_as_proponents_and_opponents():
    """k_most (TracInCP and TracInCPFast rankings) puts every non-finite score last, as
    RandProj's search does; +inf was ranked the top proponent, -inf the top opponent.
    Reference: the finite scores sorted by hand, then the non-finite in dataset order."""
    from proponents.scoring import k_most

    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[0.5, inf, -2.0, nan, 3.0, -inf, 0.5]])
    for proponents in (True, False):
        finite = [0, 2, 4, 6]
        finite.sort(key=lambda j: -float(scores[0, j]) if proponents else float(scores[0, j]))
        indices, values = k_most(scores, 7, proponents)
        assert indices[0].tolist() == finite + [1, 3, 5], proponents
        assert torch.equal(values.isnan(), scores[:, indices[0]].isnan())


@pytest.mark.parametrize("sub_batch", [None, 1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_gives_the_same_scores_in_any_pass_shape(
    tmp_path, monkeypatch, channels_last, sub_batch
):
    """Memory layout and sub-batch size are chosen by timing; every choice must be exact."""

    def forced(engine, batch):
        engine._channels_last, engine._sub_batch = channels_last, sub_batch

    monkeypatch.setattr(GradientEngine, "_choose_pass", forced)
    case = make_case("cnn", tmp_path)
    t = fast(case)  # batches of 4: sub-batches of 3 leave a remainder of 1
    assert_close(t.influence(case.test_inputs, case.test_labels), reference_scores(case, ["fc"]))
    assert_close(t.influence(), reference_self(case, ["fc"]))
    assert (t._engine._channels_last, t._engine._sub_batch) == (channels_last, sub_batch)
    rp = fast(case, TracInCPFastRandProj)  # the embeddings go through the same passes
    assert_close(
        rp.influence(case.test_inputs, case.test_labels, k=None), reference_scores(case, ["fc"])
    )


def test_channels_last_passes_get_their_training_batches_copied_once_into_that_layout(
    tmp_path, monkeypatch
):
    """The loader copies each batch straight into the layout the engine converts it to."""

    def forced(engine, batch):
        engine._channels_last, engine._sub_batch = True, None

    monkeypatch.setattr(GradientEngine, "_choose_pass", forced)
    conversions = []
    real = torch.Tensor.contiguous

    def counting(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        conversions.append(out is not self)
        return out

    case = make_case("cnn", tmp_path)
    t = fast(case)
    t.influence()  # chooses the layout on the first batch
    kept = case.dataset.tensors[0].clone()
    seen = []
    handle = case.model.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    monkeypatch.setattr(torch.Tensor, "contiguous", counting)
    try:
        got = t.influence()
    finally:
        monkeypatch.undo()
        handle.remove()
    assert_close(got, reference_self(case, ["fc"]))
    assert seen and all(x.is_contiguous(memory_format=torch.channels_last) for x in seen)
    assert not any(conversions)  # nothing left to convert: the loader made them so
    assert torch.equal(case.dataset.tensors[0], kept)
    image = case.dataset.tensors[0][:2]
    assert t._engine.input_layout(image) == torch.channels_last
    assert t._engine.input_layout(case.dataset.tensors[1]) == torch.contiguous_format


def test_a_pass_shape_chosen_again_times_the_standard_layout_as_standard(tmp_path, monkeypatch):
    """A first call chooses on a small batch (here the self-influence of three examples);
    the larger training batches of the next call then arrive already channels-last from
    the loader, and choosing again must still time the standard layout on standard tensors
    (else both timings are channels-last, the plain shape wins and every later pass runs
    in the slow layout)."""
    from proponents.gradients import engine as engine_module

    seen = []
    real_record, real_time = engine_module.record_parts, GradientEngine._time_pass

    def spy(model, layers, loss, parts, *args, **kwargs):
        image = parts[0].inputs[0]
        seen.append(
            (sum(p.size for p in parts), current[0]._channels_last, not image.is_contiguous())
        )
        return real_record(model, layers, loss, parts, *args, **kwargs)

    def timed(engine, batch, channels_last, sub_batch):
        current[0] = engine
        real_time(engine, batch, channels_last, sub_batch)
        return 1.0 if channels_last and sub_batch is None else 2.0  # channels-last wins

    current: list = [None]
    monkeypatch.setattr(engine_module, "record_parts", spy)
    monkeypatch.setattr(GradientEngine, "_time_pass", timed)
    case = make_case("cnn", tmp_path, n_train=40, n_test=3)
    t = fast(case, batch_size=32)
    t.self_influence((*case.test_inputs, case.test_labels))
    scores = t.influence(case.test_inputs, case.test_labels)
    assert_close(scores, reference_scores(case, ["fc"]))
    assert {size for size, _, _ in seen} == {3, 32}  # chosen on the small batch, then again
    assert all(flag == laid_out for _, flag, laid_out in seen)
    assert t._engine._channels_last is True


def test_pass_shape_is_tuned_only_for_forward_dominated_cpu_passes(tmp_path):
    case = make_case("cnn", tmp_path, n_train=70, n_test=4)
    conv = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=64,
        sample_wise_grads_per_batch=True,
    )
    conv.influence()  # convolutions differentiated: the backward pass dominates
    assert conv._engine._sub_batch is None and conv._engine._channels_last is False
    last = TracInCPFast(
        case.model,
        "fc",
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=64,
    )
    assert_close(last.influence(), reference_self(case, ["fc"]))
    assert last._engine._sub_batch in (None, 32, 16)  # halved while faster, never below 16


def _batch_sizes_seen_by(monkeypatch, method: str) -> list[int]:
    """Sizes of the batches that ``GradientEngine.<method>`` is called with, in order."""
    sizes: list[int] = []
    original = getattr(GradientEngine, method)

    def spy(engine, batch):
        sizes.append(batch.size)
        return original(engine, batch)

    monkeypatch.setattr(GradientEngine, method, spy)
    return sizes


def test_pass_shape_is_timed_once_per_model_and_batch_shape(tmp_path, monkeypatch):
    case = make_case("cnn", tmp_path, n_train=70, n_test=4)
    timed = _batch_sizes_seen_by(monkeypatch, "_time_pass_shapes")

    def self_influence(batch_size):
        t = TracInCPFast(
            case.model,
            "fc",
            case.dataset,
            case.checkpoints,
            loss_fn=case.loss_fn("sum"),
            batch_size=batch_size,
        )
        return t.influence(), (t._engine._channels_last, t._engine._sub_batch)

    first, shape = self_influence(64)
    again, same = self_influence(64)  # a second object over the same model: no timing
    assert timed == [64] and same == shape
    assert_close(again, first, rtol=1e-6)
    self_influence(32)  # another batch size is timed for itself
    assert timed == [64, 32]


def test_pass_shape_is_chosen_again_for_larger_training_batches(tmp_path, monkeypatch):
    case = make_case("cnn", tmp_path, n_train=70, n_test=16)
    seen = _batch_sizes_seen_by(monkeypatch, "_choose_pass")
    t = TracInCPFast(
        case.model,
        "fc",
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=64,
    )
    scores = t.influence(case.test_inputs, case.test_labels)
    # settled on the first training batch (64) before the test side (16), which is
    # smaller and so not timed; never on the last training batch (6)
    assert seen == [64]
    assert_close(scores, reference_scores(case, ["fc"]))
    # a first call on a small batch chooses for it, and the training batches choose again
    seen.clear()
    again = TracInCPFast(
        case.model,
        "fc",
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=64,
    )
    again.self_influence((*case.test_inputs, case.test_labels))
    assert_close(again.influence(case.test_inputs, case.test_labels), scores, rtol=1e-5)
    assert seen == [16, 64]


@pytest.mark.parametrize("seconds, rounds", [(0.001, 4), (0.05, 2), (0.5, 1)])
def test_slow_passes_are_timed_in_fewer_rounds(tmp_path, monkeypatch, seconds, rounds):
    case = make_case("cnn", tmp_path, n_train=70, n_test=4)
    calls = []

    def fake_timing(engine, batch, channels_last, sub_batch):
        calls.append((channels_last, sub_batch))
        return seconds * (0.5 if (channels_last, sub_batch) == (True, 32) else 1.0)

    monkeypatch.setattr(GradientEngine, "_time_pass", fake_timing)
    t = TracInCPFast(
        case.model,
        "fc",
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=64,
    )
    assert_close(t.influence(), reference_self(case, ["fc"]))
    shapes = {(cl, size) for cl in (False, True) for size in (None, 32, 16)}
    assert set(calls) == shapes and len(calls) == rounds * len(shapes)
    assert (t._engine._channels_last, t._engine._sub_batch) == (True, 32)  # the fastest


def test_a_parametrized_final_layer_is_exact_in_tracincpfast_and_refused_by_randproj(
    tmp_path,
):
    """With ``weight_norm`` on the final layer, TracInCPFast equals TracInCP restricted to
    that layer's parameters; TracInCPFastRandProj, whose embeddings assume a plain Linear
    weight, refuses it by name instead of failing on a shape."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), weight_norm(nn.Linear(6, 3)))
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.5}, path)
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    train = TensorDataset(x, y)
    fast_scores = TracInCPFast(
        model, "2", train, [path], loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4
    ).influence((x[:3],), y[:3])
    exact = TracInCP(
        model,
        train,
        [path],
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=4,
        layers=["2"],
    ).influence((x[:3],), y[:3])
    assert_close(fast_scores, exact)
    with pytest.raises(InvalidArgumentError, match="'2' computes its weight through a param"):
        TracInCPFastRandProj(
            model, "2", train, [path], loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4
        )
    # the hook-based forms keep no weight Parameter at all
    for wrap in (nn.utils.weight_norm, nn.utils.spectral_norm):
        with warnings.catch_warnings():  # weight_norm's deprecation notice
            warnings.simplefilter("ignore")
            hooked = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), wrap(nn.Linear(6, 3)))
        torch.save(hooked.state_dict(), tmp_path / "h.pt")
        with pytest.raises(InvalidArgumentError, match="weight_norm, spectral_norm"):
            TracInCPFastRandProj(
                hooked, "2", train, [tmp_path / "h.pt"], loss_fn=nn.CrossEntropyLoss()
            )


def test_randproj_answers_an_empty_test_batch_like_a_full_one(tmp_path):
    model, train, xt, yt, paths = _wide_case(tmp_path, n_train=30)
    calls = []
    rp = TracInCPFastRandProj(
        model,
        "2",
        train,
        paths,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=30,
        projection_dim=6,
    )
    full, top = rp.influence((xt,), yt, k=None), rp.influence((xt,), yt, k=3)
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    empty, empty_top = rp.influence((xt[:0],), yt[:0], k=None), rp.influence((xt[:0],), yt[:0], k=3)
    handle.remove()
    assert calls == []  # no model run
    assert empty.shape == (0, 30) and empty.dtype == full.dtype
    assert empty_top.indices.shape == (0, 3) and empty_top.indices.dtype == top.indices.dtype
    assert empty_top.influence_scores.shape == (0, 3)
    assert empty_top.influence_scores.dtype == top.influence_scores.dtype


class _BatchCentred(nn.Module):
    """Examples interact inside a batch of two or more (each hidden vector is pulled
    towards the batch mean), so the engine's check on such a batch moves the final layer
    from its hooks to torch.func; a batch of one cannot show it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.shape[0] > 1:
            h = h - 0.5 * h.mean(0, keepdim=True)
        return self.fc(h)


def test_embeddings_line_up_when_a_later_batch_changes_the_strategy(tmp_path):
    """Training set embedded in batches of one (final layer served by its hooks), then a
    test batch of four whose check moves the layer to torch.func: both sides must be in
    the same coordinates. Unprojected scores equal a float64 loop over single examples,
    projected ones those of an index built in one batch, and a saved index answers the
    same after loading."""
    torch.manual_seed(3)
    paths = []
    for c in range(2):
        paths.append(tmp_path / f"c{c}.pt")
        torch.save({"model_state_dict": _BatchCentred().state_dict(), "lr": 0.5 + c}, paths[-1])
    data = TensorDataset(torch.randn(7, 5), torch.randint(0, 3, (7,)))
    xt, yt = torch.randn(4, 5), torch.randint(0, 3, (4,))
    loss = nn.CrossEntropyLoss(reduction="sum")

    reference = torch.zeros(4, 7, dtype=torch.float64)
    for c, path in enumerate(paths):
        m = _BatchCentred().double()
        m.load_state_dict(torch.load(path)["model_state_dict"])

        def grad(x, y, m=m):
            m.zero_grad()
            loss(m(x[None].double()), y[None]).backward()
            return torch.cat([m.fc.weight.grad.flatten(), m.fc.bias.grad])

        train = torch.stack([grad(*data[i]) for i in range(7)])
        test = torch.stack([grad(xt[i], yt[i]) for i in range(4)])
        reference += (0.5 + c) * test @ train.T

    def build(batch_size, projection_dim):
        return TracInCPFastRandProj(
            _BatchCentred(), "fc", data, paths, loss_fn=loss, batch_size=batch_size,
            projection_dim=projection_dim,
        )  # fmt: skip

    exact = build(1, None)
    assert set(exact._engine.strategies.values()) == {"linear"}
    assert_close(exact.influence(xt, yt, k=None), reference, rtol=1e-5)
    assert set(exact._engine.strategies.values()) == {"generic"}
    for dim in (4, 8):
        mixed = build(1, dim)
        mixed.save(tmp_path / f"index-{dim}")
        whole = build(7, dim)  # checked on seven examples: torch.func from the start
        expected = whole.influence(xt, yt, k=None)
        assert_close(mixed.influence(xt, yt, k=None), expected, rtol=1e-5)
        loaded = TracInCPFastRandProj.load(tmp_path / f"index-{dim}", _BatchCentred(), paths, loss)
        assert_close(loaded.influence(xt, yt, k=None), expected, rtol=1e-5)


def test_an_index_saved_when_a_signature_mean_was_taken_as_a_sum_still_loads(tmp_path, monkeypatch):
    """Indexes saved before reductions were read from signatures recorded
    ``F.cross_entropy`` as a sum; their embeddings are the same (each example's own loss),
    so they load, with the same answers (before: IndexMismatchError)."""
    import torch.nn.functional as F

    import proponents.gradients.loss as loss_module

    case = make_case("mlp", tmp_path)
    data = case.dataset
    with monkeypatch.context() as m:
        m.setattr(loss_module, "signature_reduction", lambda fn: None)  # the old reading
        old = TracInCPFastRandProj(
            case.model, "fc2", data, case.checkpoints, loss_fn=F.cross_entropy, batch_size=4
        )
        assert old._loss.reduction == "sum"
        want = old.influence(case.test_inputs, case.test_labels, k=None)
        old.save(tmp_path / "index")
    back = TracInCPFastRandProj.load(
        tmp_path / "index",
        case.model,
        case.checkpoints,
        loss_fn=F.cross_entropy,
        train_dataset=data,
    )
    assert back._loss.reduction == "mean"
    assert_close(back.influence(case.test_inputs, case.test_labels, k=None), want)
    exact = TracInCPFast(case.model, "fc2", data, case.checkpoints, loss_fn=F.cross_entropy)
    assert_close(exact.influence(case.test_inputs, case.test_labels), want)


def _nonfinite_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in caught if "non-finite" in str(w.message)]


def test_randproj_warns_about_a_non_finite_test_example_as_fast_does(tmp_path):
    """A NaN test input: one warning naming test example 1, as TracInCPFast gives, and
    the other rows equal TracInCPFast's (before: NaN scores and no warning)."""
    case = make_case("mlp", tmp_path)
    x = case.test_inputs[0].clone()
    x[1, 0] = float("nan")
    exact, want = _nonfinite_warnings(lambda: fast(case).influence((x,), case.test_labels))
    assert len(want) == 1 and "test examples [1]" in want[0]
    rp = fast(case, TracInCPFastRandProj)
    for k in (None, 3):
        out, got = _nonfinite_warnings(lambda k=k: rp.influence((x,), case.test_labels, k=k))
        assert got == [want[0].replace("TracInCPFast:", "TracInCPFastRandProj:")]
        scores = out if k is None else out.influence_scores
        assert not torch.isfinite(scores[1]).any()
        rows = [0, 2, 3]
        if k is None:
            assert_close(scores[rows], exact[rows], rtol=1e-5)
        else:
            top = torch.sort(exact[rows], dim=1, descending=True)
            assert torch.equal(out.indices[rows], top.indices[:, :3])


def test_randproj_load_of_a_file_says_no_index_is_there(tmp_path):
    case = make_case("mlp", tmp_path)
    path = tmp_path / "index.pt"
    path.write_bytes(b"not an index")
    with pytest.raises(IndexNotFoundError, match=r"index\.pt' is a file, not a directory"):
        TracInCPFastRandProj.load(path, case.model, case.checkpoints, case.loss_fn("sum"))
    with pytest.raises(FileNotFoundError):  # IndexNotFoundError is one
        TracInCPFastRandProj.load(path, case.model, case.checkpoints, case.loss_fn("sum"))


@pytest.mark.parametrize("method", ["save", "self_influence", "load", "influence"])
def test_randproj_public_methods_document_their_arguments_and_errors(method):
    doc = getattr(TracInCPFastRandProj, method).__doc__ or ""
    assert "\n        Args:\n" in doc and "\n        Raises:\n" in doc, doc


def test_memory_budget_takes_numpy_integers(tmp_path):
    """``memory_budget=np.int64(...)`` was refused ("must be an int"); it is an integer."""
    import numpy as np

    case = make_case("mlp", tmp_path)
    loss = case.loss_fn("sum")
    rp = TracInCPFastRandProj(
        case.model,
        "fc2",
        case.dataset,
        case.checkpoints,
        loss_fn=loss,
        batch_size=4,
        memory_budget=np.int64(1),
    )
    assert type(rp.memory_budget) is int
    exact = TracInCPFast(case.model, "fc2", case.dataset, case.checkpoints, loss_fn=loss)
    want = exact.influence(case.test_inputs, case.test_labels)
    assert_close(rp.influence(case.test_inputs, case.test_labels, k=None), want)


def test_a_model_that_is_one_linear_layer_is_its_own_final_layer(tmp_path):
    """A logistic regression, nn.Linear itself, passed as final_fc_layer (Captum accepts
    it; before: "not a submodule ... Linear layers: none"): TracInCPFast and the
    unprojected index equal the float64 per-example loop, and the index saves and loads
    (its layer name is "", the model itself)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    path = tmp_path / "m.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.7}, path)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    data = TensorDataset(x, y)
    loss = nn.CrossEntropyLoss(reduction="sum")
    ref = nn.Linear(4, 3).double()
    ref.load_state_dict(model.state_dict())

    def grad(i):
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x[i : i + 1].double()), y[i : i + 1]).backward()
        return torch.cat([ref.weight.grad.flatten(), ref.bias.grad])

    g = torch.stack([grad(i) for i in range(12)])
    want = 0.7 * g[:3] @ g.T
    fast = TracInCPFast(model, model, data, [str(path)], loss_fn=loss, batch_size=5)
    torch.testing.assert_close(
        fast.influence((x[:3],), y[:3], k=None).double(), want, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(
        fast.self_influence().double(), 0.7 * (g * g).sum(1), rtol=1e-4, atol=1e-6
    )
    index = TracInCPFastRandProj(model, model, data, [str(path)], loss_fn=loss, batch_size=5)
    torch.testing.assert_close(
        index.influence((x[:3],), y[:3], k=None).double(), want, rtol=1e-4, atol=1e-6
    )
    index.save(tmp_path / "index")
    loaded = TracInCPFastRandProj.load(
        tmp_path / "index", model, [str(path)], loss, train_dataset=data
    )
    top = loaded.influence((x[:3],), y[:3], k=4)
    assert torch.equal(top.indices, want.topk(4, dim=1).indices)
    with pytest.raises(InvalidArgumentError, match=r"'' is a Sequential.*Linear layers are: 0"):
        TracInCPFast(nn.Sequential(nn.Linear(4, 3)), "", data, [str(path)], loss_fn=loss)


def test_labels_passed_inside_inputs_as_in_captum_0_9_get_a_hint(tmp_path):
    """Captum 0.9 takes influence((x, y)); the late-2022 API takes influence((x,), y). The
    error for the missing targets says so when the last input looks like labels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    loss = nn.CrossEntropyLoss(reduction="sum")
    for obj in (
        TracInCP(model, data, [str(path)], loss_fn=loss, sample_wise_grads_per_batch=True),
        TracInCPFast(model, "0", data, [str(path)], loss_fn=loss),
        TracInCPFastRandProj(model, "0", data, [str(path)], loss_fn=loss),
    ):
        with pytest.raises(
            InvalidArgumentError,
            match=r"targets are required.*looks like the labels.*inputs\[:-1\], inputs\[-1\]",
        ):
            obj.influence((x, y))
        with pytest.raises(InvalidArgumentError, match=r"targets are required") as err:
            obj.influence((x,))
        assert "looks like" not in str(err.value)


def _forward_sizes(module: nn.Module, call):
    """``call()``'s result and the batch size of every forward call of ``module`` in it."""
    sizes: list[int] = []
    hook = module.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        return call(), sizes
    finally:
        hook.remove()


def test_randproj_differentiates_a_large_test_batch_in_pieces(tmp_path):
    """TracInCP and TracInCPFast take a large test batch in pieces of at most
    max(batch_size, 256) examples; TracInCPFastRandProj ran it whole (a memory audit: two
    full-batch activations, 17x TracInCPFast's peak at 16,000 test examples). Its scores
    are unchanged: TracInCPFast's, unprojected."""
    model, train, _, _, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    rp = TracInCPFastRandProj(model, "2", train, paths, loss_fn=loss, batch_size=50)
    g = torch.Generator().manual_seed(9)
    xt, yt = torch.randn(700, 10, generator=g), torch.randint(0, 8, (700,), generator=g)
    got, sizes = _forward_sizes(model[0], lambda: rp.influence((xt,), yt, k=None))
    assert sizes and max(sizes) <= 256 and sum(sizes) >= 700 * 2  # both checkpoints
    want = TracInCPFast(model, "2", train, paths, loss_fn=loss, batch_size=50).influence((xt,), yt)
    assert_close(got, want)


def test_self_influence_of_one_large_batch_is_taken_in_pieces(tmp_path):
    """self_influence((x, y)) of one batch went through the model whole (527 MiB at 32,000
    examples in a memory audit); it is now cut as a large test batch is. The values are
    those of the same rows read as a dataset in batches."""
    model, train, _, _, paths = _wide_case(tmp_path, n_train=60)
    loss = nn.CrossEntropyLoss(reduction="sum")
    fast = TracInCPFast(model, "2", train, paths, loss_fn=loss, batch_size=50)
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(700, 10, generator=g), torch.randint(0, 8, (700,), generator=g)
    got, sizes = _forward_sizes(model[0], lambda: fast.self_influence((x, y)))
    assert sizes and max(sizes) <= 256
    assert_close(got, fast.self_influence(TensorDataset(x, y)))
