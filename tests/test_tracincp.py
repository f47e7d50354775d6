"""TracInCP against a float64 per-example autograd loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import (
    Case,
    assert_close,
    assert_unchanged,
    make_case,
    model_snapshot,
    reference_scores,
    reference_self,
    save_checkpoints,
)
from proponents import KMostInfluentialResults, TracInCP


def tracin(case: Case, reduction: str = "sum", **kw) -> TracInCP:
    kw.setdefault("batch_size", 5)
    return TracInCP(
        case.model,
        case.dataset,
        [str(p) for p in case.checkpoints],
        loss_fn=case.loss_fn(reduction),
        sample_wise_grads_per_batch=reduction != "none",
        **kw,
    )


def test_scores_kmost_and_self_influence_match_loop_reference(case: Case):
    t = tracin(case)
    expected = reference_scores(case)
    scores = t.influence(case.test_inputs, case.test_labels)
    assert_close(scores, expected)

    top = t.influence(case.test_inputs, case.test_labels, k=4)
    assert isinstance(top, KMostInfluentialResults)
    want = torch.sort(expected, dim=1, descending=True)
    assert torch.equal(top.indices, want.indices[:, :4])
    assert_close(top.influence_scores, want.values[:, :4])

    low = t.influence(case.test_inputs, case.test_labels, k=3, proponents=False)
    want = torch.sort(expected, dim=1)
    assert torch.equal(low.indices, want.indices[:, :3])
    assert_close(low.influence_scores, want.values[:, :3])

    self_scores = t.influence()
    assert_close(self_scores, reference_self(case))


def test_self_influence_is_the_diagonal_of_the_score_matrix(tmp_path):
    case = make_case("cnn", tmp_path)
    t = tracin(case)
    full = t.influence(case.train_inputs, case.train_labels)
    assert_close(t.self_influence(), full.diagonal())
    # one batch, and a DataLoader, given to self_influence
    batch = (*case.train_inputs, case.train_labels)
    assert_close(t.self_influence(batch), full.diagonal())
    loader = DataLoader(case.dataset, batch_size=4)
    assert_close(t.self_influence(loader), full.diagonal())


def test_fast_layer_strategies_equal_generic_path(case: Case):
    t = tracin(case)
    fast = t.influence(case.test_inputs, case.test_labels)
    fast_self = t.influence()
    t._engine.__init__(case.model, t._selected, t._loss, "TracInCP", fast_layers=False)
    assert set(t._engine.strategies.values()) == {"generic"}
    assert_close(fast, t.influence(case.test_inputs, case.test_labels), rtol=1e-5)
    assert_close(fast_self, t.influence(), rtol=1e-5)


def test_strategies_chosen_per_layer(tmp_path):
    case = make_case("attention", tmp_path)
    t = tracin(case)
    t.influence(case.test_inputs, case.test_labels)
    kinds = t._engine.strategies
    assert kinds["head.weight"] == "linear"
    assert kinds["embed.weight"] == "generic"
    # the attention block calls its output projection functionally: it must not be hooked
    assert kinds["attn.out_proj.weight"] == "generic"
    cnn = make_case("cnn", tmp_path / "cnn")
    t = tracin(cnn)
    scores = t.influence(cnn.test_inputs, cnn.test_labels)
    kinds = t._engine.strategies
    assert kinds["conv2.weight"] == "conv" and kinds["fc.bias"] == "linear"
    # ReLU(inplace=True) after conv1 modifies the recorded output: detected, then protected
    assert t._engine._protect
    assert_close(scores, reference_scores(cnn))


def test_three_loss_settings_agree(tmp_path):
    case = make_case("mlp", tmp_path)
    expected = reference_scores(case)
    for reduction in ("none", "sum", "mean"):
        assert_close(
            tracin(case, reduction).influence(case.test_inputs, case.test_labels), expected
        )


def test_mean_reduction_on_multi_output_loss_is_the_per_example_mean(tmp_path):
    case = make_case("regression", tmp_path)
    # MSE "mean" on one example averages its 2 outputs: gradients are half those of "sum"
    mean = tracin(case, "mean").influence(case.test_inputs, case.test_labels)
    assert_close(mean, reference_scores(case) / 4)


def test_loss_fn_none_differentiates_the_output(tmp_path):
    case = make_case("mlp", tmp_path)
    t = TracInCP(case.model, case.dataset, [str(p) for p in case.checkpoints], batch_size=4)
    assert_close(t.influence(case.test_inputs), reference_scores(case, loss=None))


def test_layer_subsets(tmp_path):
    case = make_case("cnn", tmp_path)
    for layers in (["fc"], ["conv1", "fc"], ["conv2"]):
        t = tracin(case, layers=layers)
        assert_close(
            t.influence(case.test_inputs, case.test_labels), reference_scores(case, layers)
        )
        assert_close(t.influence(), reference_self(case, layers))


def test_dotted_layer_names(tmp_path):
    case = make_case("attention", tmp_path)
    t = tracin(case, layers=["attn.out_proj", "norm"])
    want = reference_scores(case, ["attn.out_proj", "norm"])
    assert_close(t.influence(case.test_inputs, case.test_labels), want)


def test_learning_rates_are_read_from_checkpoints(tmp_path):
    case = make_case("mlp", tmp_path)
    scores = tracin(case).influence(case.test_inputs, case.test_labels)
    # the same checkpoints saved without a learning rate count with lr = 1
    plain = []
    for i, p in enumerate(case.checkpoints):
        q = tmp_path / f"plain-{i}.pt"
        torch.save(torch.load(p, weights_only=True)["model_state_dict"], q)
        plain.append(str(q))
    t = TracInCP(case.model, case.dataset, plain, loss_fn=case.loss_fn("none"), batch_size=5)
    unweighted = t.influence(case.test_inputs, case.test_labels)
    case.lrs = [1.0] * len(case.lrs)
    assert_close(unweighted, reference_scores(case))
    assert not torch.allclose(unweighted, scores)


def test_checkpoint_forms_directory_list_iterator(tmp_path):
    case = make_case("mlp", tmp_path / "ckpts")
    expected = reference_scores(case)
    loaded = [torch.load(p, weights_only=True) for p in case.checkpoints]
    for source in (tmp_path / "ckpts", [str(p) for p in case.checkpoints], iter(loaded)):
        t = TracInCP(
            case.model,
            case.dataset,
            source,
            loss_fn=case.loss_fn("sum"),
            batch_size=4,
            sample_wise_grads_per_batch=True,
        )
        assert_close(t.influence(case.test_inputs, case.test_labels), expected)
        # an iterator is consumed once but usable for every call
        assert_close(t.influence(case.test_inputs, case.test_labels), expected)


def test_dataset_and_dataloader_give_identical_results(tmp_path):
    case = make_case("two_input", tmp_path)
    a = tracin(case, batch_size=4)
    b = TracInCP(
        case.model,
        DataLoader(case.dataset, batch_size=6),
        [str(p) for p in case.checkpoints],
        loss_fn=case.loss_fn("sum"),
        sample_wise_grads_per_batch=True,
        batch_size=999,
    )
    sa = a.influence(case.test_inputs, case.test_labels)
    assert_close(sa, b.influence(case.test_inputs, case.test_labels), rtol=1e-6)
    assert_close(a.influence(), b.influence(), rtol=1e-6)
    assert_close(sa, reference_scores(case))


def test_test_inputs_as_dataloader(tmp_path):
    case = make_case("mlp", tmp_path)
    t = tracin(case)
    loader = DataLoader(TensorDataset(*case.test_inputs, case.test_labels), batch_size=3)
    assert_close(t.influence(loader), reference_scores(case))
    top = t.influence(loader, k=2, proponents=False)
    assert top.indices.shape == (4, 2)


def test_unpack_inputs_false_passes_the_object_as_is(tmp_path):
    case = make_case("mlp", tmp_path)
    t = tracin(case)
    (x,) = case.test_inputs
    assert_close(t.influence(x, case.test_labels, unpack_inputs=False), reference_scores(case))


def test_aggregate_sums_over_the_test_batch(tmp_path):
    case = make_case("embed", tmp_path)
    t = tracin(case)
    expected = reference_scores(case).sum(0, keepdim=True)
    agg = t.influence(case.test_inputs, case.test_labels, aggregate=True)
    assert agg.shape == (1, case.train_labels.shape[0])
    assert_close(agg, expected)
    top = t.influence(case.test_inputs, case.test_labels, k=3, aggregate=True)
    assert torch.equal(top.indices[0], torch.sort(expected[0], descending=True).indices[:3])


def test_user_model_is_unchanged(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model[0].bias.requires_grad_(False)
    model.train()
    x, y = torch.randn(9, 4), torch.randint(0, 2, (9,))
    paths = []
    for c in range(2):
        m2 = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
        m2[1].running_mean.normal_()
        paths.append(tmp_path / f"c{c}.pt")
        torch.save(m2.state_dict(), paths[-1])
    snap = model_snapshot(model)
    t = TracInCP(
        model,
        TensorDataset(x, y),
        paths,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=4,
    )
    t.influence((x[:2],), y[:2])
    t.influence((x[:2],), y[:2], k=2)
    t.influence()
    t.self_influence((x, y))
    assert_unchanged(model, snap)


def test_progress_counts_a_large_test_batch_once(tmp_path, capsys):
    """A test batch of more than 256 examples is differentiated in pieces; the bar counts
    it as one step of its total (before, each piece ticked: 16 steps of a total of 12,
    and tqdm dropped the percentage)."""
    case = make_case("mlp", tmp_path)
    t = tracin(case)
    x = torch.randn(600, 6)
    y = torch.randint(0, 3, (600,))
    t.influence((x,), y, show_progress=True)
    err = capsys.readouterr().err
    last = [line for line in err.replace("\r", "\n").split("\n") if line.strip()][-1]
    assert "100%" in last and "12/12" in last, last


def test_progress_bars_name_the_class_and_the_work(tmp_path, capsys):
    case = make_case("mlp", tmp_path)
    t = tracin(case)
    t.influence(case.test_inputs, case.test_labels, show_progress=True)
    err = capsys.readouterr().err
    assert "TracInCP: influence" in err and "checkpoint 3/3" in err
    # 3 checkpoints x (3 training batches + 1 test batch)
    assert "12/12" in err
    t.influence(show_progress=True)
    err = capsys.readouterr().err
    assert "TracInCP: self-influence" in err and "9/9" in err


class DataDependent(nn.Module):
    """A model with data-dependent control flow, which vmap cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.norm(x)
        if float(h.abs().sum()) > 0:
            h = h * 2
        return self.fc(h)


def test_vmap_failure_falls_back_to_a_correct_loop_with_one_warning(tmp_path):
    torch.manual_seed(0)
    model = DataDependent()
    x, y = torch.randn(7, 4), torch.randint(0, 2, (7,))
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    t = TracInCP(
        model,
        TensorDataset(x, y),
        [path],
        layers=["norm"],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        sample_wise_grads_per_batch=True,
        batch_size=3,
    )
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = t.influence((x[:2],), y[:2])
    messages = [str(w.message) for w in caught if "vmap" in str(w.message)]
    assert len(messages) == 1 and "loop" in messages[0]
    ref = []
    for i in range(7):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        ref.append(torch.cat([model.norm.weight.grad.flatten(), model.norm.bias.grad.flatten()]))
    g = torch.stack(ref).double()
    assert_close(scores, g[:2] @ g.T)


def test_an_error_of_the_loss_under_vmap_propagates_and_leaves_vmap_in_use(tmp_path):
    """A loss that fails once with an OSError (a log file it writes, say) while vmap runs:
    before, that counted as "vmap cannot run this model", the call returned, and the object
    used the slower loop for good (later calls no longer bit-equal to earlier ones)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    fail = {"once": False}

    def loss_fn(out, target):
        # fails on its first call under torch.func only: the loop would succeed
        if fail["once"] and torch._C._functorch.is_functorch_wrapped_tensor(out):
            fail["once"] = False
            raise OSError("the disk the loss logs to is full")
        return nn.functional.cross_entropy(out, target, reduction="sum")

    loss_fn.reduction = "sum"
    t = TracInCP(
        model,
        TensorDataset(x, y),
        [path],
        loss_fn=loss_fn,
        batch_size=3,
        sample_wise_grads_per_batch=True,
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = t.self_influence()
        fail["once"] = True
        with pytest.raises(OSError, match="disk"):
            t.self_influence()
        assert not fail["once"]
        again = t.self_influence()
    assert torch.equal(again, clean)


def test_non_finite_examples_are_contained_and_named(tmp_path):
    case = make_case("mlp", tmp_path)
    x = case.train_inputs[0].clone()
    x[4, 0] = float("nan")
    ds = TensorDataset(x, case.train_labels)
    t = TracInCP(
        case.model,
        ds,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        sample_wise_grads_per_batch=True,
        batch_size=5,
    )
    import pytest

    with pytest.warns(RuntimeWarning, match=r"training examples \[4\]") as caught:
        scores = t.influence(case.test_inputs, case.test_labels)
    # a "sum" loss: the message does not lead with the ignored-labels cause of "mean"
    message = str(next(w.message for w in caught if "non-finite" in str(w.message)))
    assert message.index("NaN or infinite value") < message.index("labels are all ignored")
    assert not torch.isfinite(scores[:, 4]).any()
    keep = [i for i in range(13) if i != 4]
    assert_close(scores[:, keep], reference_scores(case)[:, keep])


def _per_example_conv_grads(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop reference: per-example weight gradients of sum(out * r) for a fixed random r."""
    g_out = torch.randn(conv(x).shape, generator=torch.Generator().manual_seed(3))
    rows = []
    for i in range(x.shape[0]):
        conv.zero_grad()
        (conv(x[i : i + 1]) * g_out[i : i + 1]).sum().backward()
        rows.append(conv.weight.grad.reshape(-1).clone())
    return torch.stack(rows), g_out


@pytest.mark.parametrize("method", ["unfold", "shifts", "grouped"])
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv2d(3, 4, 3, padding=1), (5, 3, 8, 8)),
        (
            nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
            (3, 4, 9, 7),
        ),
        (nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2), (4, 2, 11)),
        (nn.Conv1d(4, 4, 1, groups=4), (3, 4, 5)),
    ],
)
def test_every_conv_method_gives_per_example_gradients(method, conv, shape):
    from proponents.gradients.hooked import conv_weight_grads

    torch.manual_seed(0)
    x = torch.randn(shape)
    want, g_out = _per_example_conv_grads(conv, x)
    got = conv_weight_grads(conv, x, g_out, method)
    assert_close(got, want, rtol=1e-5)


def test_large_test_batches_are_chunked_with_identical_results(tmp_path):
    from proponents.data import Batch, chunk_batch

    case = make_case("two_input", tmp_path)
    t = tracin(case)
    whole = t.influence(case.train_inputs, case.train_labels)
    runner = t._runner()
    with t._guarded():
        chunked = runner.scores(
            [Batch(case.train_inputs, case.train_labels, 13)],
            False,
            t.train_dataloader,
            None,
            1,
            False,
            False,
            n_train=None,
            test_chunk=4,
        )
    assert_close(chunked, whole, rtol=1e-6)
    parts = chunk_batch(Batch(case.train_inputs, case.train_labels, 13), 5)
    assert [p.size for p in parts] == [5, 5, 3]
    assert torch.equal(torch.cat([p.inputs[1] for p in parts]), case.train_inputs[1])


class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def test_parametrized_layers_go_through_the_generic_path(tmp_path):
    """A Linear whose weight is computed by a parametrization (``weight_norm``, a
    symmetric constraint) is not served by the per-layer strategy, which needs the weight
    to be a parameter of its own (construction used to fail with a KeyError); scores and
    self-influence equal the float64 loop over the parametrization's parameters."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 3))
    parametrize.register_parametrization(model[2], "weight", _Symmetric())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(17, 6, generator=g), torch.randint(0, 3, (17,), generator=g)
    lrs = [0.5, 1.5]
    paths = save_checkpoints(model, tmp_path, lrs, g, prefix="c")
    case = Case("parametrized", model, (x[:13],), y[:13], (x[13:],), y[13:], "ce", paths, lrs)
    t = tracin(case)
    assert_close(t.influence(case.test_inputs, case.test_labels), reference_scores(case))
    assert_close(t.self_influence(), reference_self(case))


class _MiddleRowsMix(nn.Module):
    """An MLP whose hidden rows 1 .. B-2 of a batch are shifted by their mean: examples
    interact only away from the first and last rows (alone, an example is unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if h.shape[0] > 2:
            middle = h[1:-1] + 0.5 * h[1:-1].mean(0, keepdim=True)
            h = torch.cat([h[:1], middle, h[-1:]])
        return self.fc2(h)


def test_examples_interacting_in_the_middle_rows_are_caught_by_the_check(tmp_path):
    """The first-batch check of the per-layer strategies also looks at a middle row: a
    model whose examples interact only in rows 1 .. B-2 goes to the per-example path and
    gets the scores of each example alone (the float64 loop), not silently wrong ones."""
    torch.manual_seed(0)
    model = _MiddleRowsMix()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    lrs = [0.5, 1.5]
    paths = save_checkpoints(model, tmp_path, lrs, g, prefix="c")
    case = Case("middle-mix", model, (x[:16],), y[:16], (x[16:],), y[16:], "ce", paths, lrs)
    t = tracin(case, batch_size=8)
    assert_close(t.influence(case.test_inputs, case.test_labels), reference_scores(case))
    assert_close(t.self_influence(), reference_self(case))


def _float16_setup(tmp_path):
    """A float16 regressor whose raw gradient products (~1e7) overflow float16 while the
    scores, scaled by a learning rate of 1e-5, are far inside its range."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    path = tmp_path / "c.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 1e-5}, path)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 4, generator=g) * 30).half()
    y = torch.zeros(6, 1).half()
    loss_fn = nn.MSELoss(reduction="sum")
    ref = copy.deepcopy(model).double()

    def grads(i, params):
        value = loss_fn(ref(x[i : i + 1].double()), y[i : i + 1].double())
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(value, params)])

    return model.half(), [path], x, y, loss_fn, ref, grads


@pytest.mark.parametrize("method", ["tracincp", "fast"])
def test_float16_scores_are_summed_in_float32(tmp_path, method):
    """Before, the products were formed in float16 and only then scaled by the learning
    rate: scores of 174 and 4.2 came back infinite (with a warning blaming the dtype)."""
    from proponents import TracInCPFast

    model, ckpts, x, y, loss_fn, ref, grads = _float16_setup(tmp_path)
    params = list(ref.parameters()) if method == "tracincp" else list(ref[1].parameters())
    g = torch.stack([grads(i, params) for i in range(6)])
    want_self = 1e-5 * g.pow(2).sum(1)
    want = 1e-5 * g[:2] @ g.T
    assert float(want.abs().max() * 1e5) > 65504  # the raw products overflow float16
    data = TensorDataset(x, y)
    if method == "tracincp":
        obj = TracInCP(
            model, data, ckpts, loss_fn=loss_fn, batch_size=3, sample_wise_grads_per_batch=True
        )
    else:
        obj = TracInCPFast(model, "1", data, ckpts, loss_fn=loss_fn, batch_size=3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_self = obj.self_influence()
        got = obj.influence((x[:2],), y[:2])
    assert got_self.dtype == got.dtype == torch.float16
    # float16 rounding of the gradients themselves: within 1% of the largest score
    for value, ref in ((got_self, want_self), (got, want)):
        assert torch.isfinite(value).all()
        assert float((value.double() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())


def test_a_non_finite_test_example_is_blamed_alone(tmp_path):
    """A NaN in one test input makes that test row non-finite; the warning names that test
    example and no training example (before, every training example was named)."""
    case = make_case("mlp", tmp_path)
    xt = case.test_inputs[0][:3].clone()
    xt[1, 0] = float("nan")
    obj = TracInCP(
        case.model, case.dataset, case.checkpoints, loss_fn=case.loss_fn("none"), batch_size=4
    )
    with pytest.warns(RuntimeWarning) as caught:
        scores = obj.influence((xt,), case.test_labels[:3])
    assert torch.isfinite(scores[[0, 2]]).all() and torch.isnan(scores[1]).all()
    message = " ".join(str(w.message) for w in caught)
    assert "test examples [1]" in message and "training examples" not in message


def test_a_subclass_written_for_the_spec_base_class_can_be_created(tmp_path):
    """The spec's TracInCPBase leaves ``influence`` abstract and says subclasses implement
    it over private ``_influence``/``_get_k_most_influential``/``_self_influence`` methods;
    such a subclass was refused for lacking our private ``_runner``."""
    from proponents import TracInCPBase

    case = make_case("mlp", tmp_path)

    class SquaredInputNorm(TracInCPBase):
        """A toy method: score = <x_test, x_train>, self-influence ||x||^2."""

        def _train_x(self):
            return torch.cat([b[0] for b in self.train_dataloader])

        def _influence(self, inputs, targets=None):
            return inputs[0] @ self._train_x().T

        def _get_k_most_influential(self, inputs, targets=None, k=5, proponents=True):
            values, indices = self._influence(inputs).topk(k, dim=1, largest=proponents)
            return KMostInfluentialResults(indices, values)

        def self_influence(self, inputs_dataset=None, show_progress=False):
            return self._train_x().pow(2).sum(1)

        def influence(
            self,
            inputs=None,
            targets=None,
            k=None,
            proponents=True,
            unpack_inputs=True,
            show_progress=False,
        ):
            if inputs is None:
                return self.self_influence()
            if k is None:
                return self._influence(inputs, targets)
            return self._get_k_most_influential(inputs, targets, k, proponents)

    obj = SquaredInputNorm(case.model, case.dataset, case.checkpoints, batch_size=5)
    x = case.train_inputs[0]
    assert torch.equal(obj.influence(), x.pow(2).sum(1))
    scores = obj.influence(case.test_inputs)
    torch.testing.assert_close(scores, case.test_inputs[0] @ x.T)
    top = obj.influence(case.test_inputs, k=2)
    assert torch.equal(top.indices, scores.topk(2, dim=1).indices)

    class NoEngine(TracInCPBase):
        pass

    with pytest.raises(NotImplementedError, match="override influence"):
        NoEngine(case.model, case.dataset, case.checkpoints).influence(case.test_inputs)


def test_warnings_name_the_callers_line(tmp_path):
    """Every warning is attributed to the line that called the public method (before, the
    non-finite warning of influence() and the vmap notice named library files, and
    Python's default filter then showed each once per library line)."""
    import warnings

    case = make_case("mlp", tmp_path)
    x = case.train_inputs[0].clone()
    x[1, 0] = float("nan")
    data = TensorDataset(x, case.train_labels)
    cp = TracInCP(case.model, data, case.checkpoints, loss_fn=case.loss_fn("none"), batch_size=4)
    loop = TracInCP(
        DataDependent(),
        TensorDataset(torch.randn(5, 4), torch.randint(0, 2, (5,))),
        [save_checkpoints(DataDependent(), tmp_path / "dd", [1.0], torch.Generator())[0]],
        layers=["norm"],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        sample_wise_grads_per_batch=True,
    )
    calls = [
        lambda: cp.influence(case.test_inputs, case.test_labels),
        lambda: cp.influence(case.test_inputs, case.test_labels, k=2),
        lambda: cp.influence(),
        lambda: cp.self_influence(),
        lambda: loop.influence((torch.randn(2, 4),), torch.tensor([0, 1])),
    ]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert caught
        assert {w.filename for w in caught} == {__file__}, [(w.filename, w.lineno) for w in caught]


def test_self_influence_of_a_dataset_uses_the_training_loaders_batch_size(tmp_path):
    case = make_case("mlp", tmp_path, n_train=10)
    sizes: list[int] = []
    hook = case.model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    loader = DataLoader(case.dataset, batch_size=4)
    try:
        for batch_size in (None, 1):  # the spec's default, ignored for a DataLoader
            t = TracInCP(
                case.model,
                loader,
                case.checkpoints,
                loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                batch_size=batch_size,
                sample_wise_grads_per_batch=True,
            )
            sizes.clear()
            assert_close(t.self_influence(case.dataset), reference_self(case))
            assert max(sizes) == 4  # batches of the training loader, not of batch_size
    finally:
        hook.remove()
