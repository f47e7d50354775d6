"""Edge cases of checkpoint handling and of the model guard, each checked against an
independent reference: a deep copy of the model taken before the call, a plain
``load_state_dict``, or a float64 per-example loop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from proponents import TracInCP, load_flexible_state_dict
from proponents.checkpoints import resolve_checkpoints
from proponents.errors import CheckpointLoadError, InvalidArgumentError


def _same_state(model: nn.Module, reference: nn.Module) -> None:
    """``model`` registers the same names as ``reference`` with equal tensors, flags and
    train/eval modes (``reference`` is a deep copy taken before the call)."""
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(reference.named_parameters(remove_duplicate=False))
    assert list(ours) == list(theirs)
    for name, param in ours.items():
        assert type(param) is type(theirs[name]), name
        assert param.requires_grad == theirs[name].requires_grad, name
        if not nn.parameter.is_lazy(param):
            assert torch.equal(param.detach(), theirs[name].detach()), name
    ours_b = dict(model.named_buffers(remove_duplicate=False))
    theirs_b = dict(reference.named_buffers(remove_duplicate=False))
    assert list(ours_b) == list(theirs_b)
    for name, buf in ours_b.items():
        assert torch.equal(buf, theirs_b[name]), name
    modes = [(n, type(m), m.training) for n, m in model.named_modules()]
    assert modes == [(n, type(m), m.training) for n, m in reference.named_modules()]


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _lazy_net() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2))


def _copying_load(model, ckpt):
    model.load_state_dict(ckpt)
    return 1.0


@pytest.mark.parametrize("load", [load_flexible_state_dict, _copying_load])
def test_an_unbuilt_lazy_model_is_refused_and_left_as_it_was(load):
    """Before, the default loader failed inside the guard, whose restore then crashed
    half-way (the model stayed in eval mode, ``.grad`` gone); a loader of the user's
    turned LazyLinear into a Linear holding an empty weight, so the model no longer ran."""
    torch.manual_seed(0)
    built = _lazy_net()
    built(torch.zeros(1, 3))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    model = _lazy_net().train()
    grad = torch.ones(2, 4)
    model[2].weight.grad = grad
    lazy_weight = model[0].weight
    before = copy.deepcopy(model)
    tracin = TracInCP(
        model,
        TensorDataset(x, y),
        [built.state_dict()],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=3,
    )
    with pytest.raises(InvalidArgumentError, match=r"0\.weight, 0\.bias: lazy modules"):
        tracin.influence((x[:2],), y[:2])
    assert model[0].weight is lazy_weight
    assert model[2].weight.grad is grad and torch.equal(grad, torch.ones(2, 4))
    _same_state(model, before)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    assert torch.equal(out, before(x))


def test_the_default_loader_fills_a_lazy_model_like_load_state_dict():
    """Loading straight into a lazy model, as ``load_state_dict`` does (before: a
    ValueError from an uninitialised parameter)."""

    def make():
        return nn.Sequential(
            nn.LazyConv1d(2, 1), nn.LazyBatchNorm1d(), nn.Flatten(), nn.LazyLinear(3)
        )

    torch.manual_seed(0)
    built = make()
    built(torch.randn(4, 3, 5))
    state = built.state_dict()
    model, reference = make(), make()
    reference.load_state_dict(state)
    assert load_flexible_state_dict(model, state) == 1.0
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def test_natural_order_takes_only_decimal_digits_as_numbers(tmp_path):
    """'²' passes ``str.isdigit`` but is no number (before: ``int('²')`` raised)."""
    for name in ["ckpt-10.pt", "ckpt-2²1.pt", "ckpt-2.pt"]:
        (tmp_path / name).write_bytes(b"x")
    names = [p.rsplit("/", 1)[-1] for p in resolve_checkpoints(tmp_path)]
    assert names == ["ckpt-2.pt", "ckpt-2²1.pt", "ckpt-10.pt"]


def _tiny_case():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    return model, x, y


@pytest.mark.parametrize(
    "returned", [np.complex128(0.1 + 2j), np.array("0.1")], ids=["complex", "text"]
)
def test_a_complex_or_text_numpy_learning_rate_is_refused(returned):
    """Before, the complex one was read as its real part (a warning only), and a 0-d text
    array was parsed as 0.1, where the same text as a ``str`` is refused."""
    model, x, y = _tiny_case()
    state = copy.deepcopy(model.state_dict())

    def load(m, ckpt):
        m.load_state_dict(ckpt)
        return returned

    tracin = TracInCP(
        model,
        TensorDataset(x, y),
        [state],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
    )
    with pytest.raises(CheckpointLoadError, match="checkpoints_load_func returned"):
        tracin.influence((x[:2],), y[:2])


def test_a_one_element_numpy_array_is_taken_as_the_learning_rate():
    """The documented one-element NumPy array (before: refused under NumPy 2)."""
    model, x, y = _tiny_case()
    state = copy.deepcopy(model.state_dict())

    def load(m, ckpt):
        m.load_state_dict(ckpt)
        return np.array([0.25])

    scores = TracInCP(
        model,
        TensorDataset(x, y),
        [state],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=2,
    ).influence((x[:2],), y[:2])
    reference = copy.deepcopy(model)

    def grad(i):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        return torch.cat([p.grad.flatten() for p in reference.parameters()])

    train = torch.stack([grad(j) for j in range(5)])
    expected = 0.25 * train[:2] @ train.T
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-12)


def _swap_head(m, ckpt):
    m.load_state_dict(ckpt)
    head = nn.Linear(4, 2)
    head.load_state_dict({"weight": ckpt["2.weight"], "bias": ckpt["2.bias"]})
    m[2] = head.train()
    return 1.0


def _add_parameter(m, ckpt):
    m.load_state_dict(ckpt)
    m[0].register_parameter("extra", nn.Parameter(torch.zeros(1)))
    return 1.0


def _add_buffer(m, ckpt):
    m.load_state_dict(ckpt)
    m[2].register_buffer("seen", torch.ones(1))
    return 1.0


@pytest.mark.parametrize("load", [_swap_head, _add_parameter, _add_buffer])
def test_a_load_function_that_changes_what_modules_register_leaves_no_trace(load):
    """Before, a head the load function swapped in stayed in the model with the last
    checkpoint's weights (in eval mode), and a parameter or buffer it registered stayed
    registered."""
    torch.manual_seed(0)
    checkpoint = _net().state_dict()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    model = _net().train()
    head = model[2]
    before = copy.deepcopy(model)
    TracInCP(
        model,
        TensorDataset(x, y),
        [checkpoint],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=3,
    ).influence((x[:2],), y[:2])
    assert model[2] is head
    _same_state(model, before)
    assert torch.equal(model(x), before(x))


def test_a_model_on_the_meta_device_is_refused_with_the_fix(tmp_path):
    """Before, checkpoints loaded into meta tensors kept nothing, and every class failed
    deep inside with torch's "Tensor.item() cannot be called on meta tensors". Once given
    memory (to_empty), the same model is scored as a model built normally."""
    from proponents import SimilarityInfluence, TracInCPFast

    torch.manual_seed(0)
    built = _net()
    path = tmp_path / "c.pt"
    torch.save(built.state_dict(), path)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    loss = nn.CrossEntropyLoss(reduction="sum")
    with torch.device("meta"):
        model = _net()
    makers = [
        lambda: TracInCP(model, TensorDataset(x, y), [path], loss_fn=loss, batch_size=3,
                         sample_wise_grads_per_batch=True).self_influence(),
        lambda: TracInCPFast(model, "2", TensorDataset(x, y), [path], loss_fn=loss,
                             batch_size=3).self_influence(),
        lambda: SimilarityInfluence(model, "2", TensorDataset(x, y), tmp_path / "acts",
                                    batch_size=3).influence(x[:2], top_k=2),
    ]  # fmt: skip
    for make in makers:
        with pytest.raises(InvalidArgumentError, match=r"meta device \(0\.weight.*to_empty"):
            make()
    assert all(p.is_meta for p in model.parameters())  # left as it was
    model.to_empty(device="cpu")
    got = TracInCPFast(model, "2", TensorDataset(x, y), [path], loss_fn=loss, batch_size=3)
    want = TracInCPFast(built, "2", TensorDataset(x, y), [path], loss_fn=loss, batch_size=3)
    torch.testing.assert_close(got.self_influence(), want.self_influence())
