"""What a call leaves of the user's model: the same objects holding the same values,
against copies taken before the call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from conftest import assert_unchanged, model_snapshot
from proponents import TracInCP, TracInCPFast, load_flexible_state_dict
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
    with pytest.raises(KeyboardInterrupt), preserved(model):
        model.mid.weight = nn.Parameter(torch.zeros(6, 6))
        model.out.weight.data.fill_(3.0)
        model.eval()
        raise KeyboardInterrupt
    assert model.mid.weight is weight
    assert_unchanged(model, snap)
    assert model.back.weight is model.out.weight


# ---------------------------------------------- checkpoints loaded by reference


def _copying_loader(m, ckpt):
    """The default loader under another name: the guard cannot rely on it, so the model
    gets copies and the checkpoints are copied into them (the reference behaviour)."""
    return load_flexible_state_dict(m, ckpt)


class Aliased(nn.Module):
    """A forward pass that reaches one weight through an unregistered alias, a module
    whose own loading code copies into its weight, and a load pre-hook that rescales."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.mid = CopiesOnLoad(6, 6)
        self.out = nn.Linear(6, 3)
        self.alias = [self.embed.weight]  # a list: not registered
        self.out._register_load_state_dict_pre_hook(_halve_out_bias)

    def forward(self, x):
        h = torch.tanh(x @ self.alias[0].T + self.embed.bias)
        return self.out(torch.tanh(self.mid(h)))


class CopiesOnLoad(nn.Linear):
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        with torch.no_grad():  # writes into its own weight whatever the caller asked
            self.weight.copy_(state_dict[prefix + "weight"])
        rest = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
        missing = args[2]
        super()._load_from_state_dict(rest, prefix, *args, **kwargs)
        missing[:] = [k for k in missing if k != prefix + "weight"]


def _halve_out_bias(state_dict, prefix, *args):
    state_dict[prefix + "bias"] = state_dict[prefix + "bias"] / 2


def _held(model):
    return {n: (p, p.data, p.data.clone()) for n, p in model.named_parameters()}


def test_default_loads_by_reference_equal_copied_loads_and_touch_nothing_held(tmp_path):
    """With the default loader the model's parameters are not copied on entry and hold
    the loaded tensors; scores equal those of copied loads exactly (an alias, a module
    that copies on load, a rescaling load hook), the user's tensors are never written,
    not even during the call, and the same objects come back."""
    torch.manual_seed(0)
    paths = []
    for c in range(3):
        paths.append(tmp_path / f"c{c}.pt")
        torch.save({"model_state_dict": Aliased().state_dict(), "learning_rate": 0.1}, paths[-1])
    model = Aliased()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    held = _held(model)
    snap = model_snapshot(model)
    seen: list[bool] = []
    model.register_forward_hook(
        lambda *_: seen.append(all(torch.equal(d, v) for _, d, v in held.values()))
    )
    loss = nn.CrossEntropyLoss(reduction="none")
    results = {}
    for name, loader in (("reference", _copying_loader), ("default", load_flexible_state_dict)):
        t = TracInCP(model, TensorDataset(x, y), paths, loader, loss_fn=loss, batch_size=5)
        results[name] = (t.influence((x[:4],), y[:4]), t.self_influence())
        assert_unchanged(model, snap)
    assert all(seen) and len(seen) > 0
    for a, b in zip(results["reference"], results["default"]):
        assert torch.equal(a, b)
    for n, p in model.named_parameters():
        assert p is held[n][0] and torch.equal(p, held[n][2]), n
    assert model.alias[0] is model.embed.weight


def test_loaded_checkpoint_objects_are_not_aliased_by_the_model(tmp_path, monkeypatch):
    """An already-loaded checkpoint mapping is copied for the model under the default
    loader: after each load the model holds none of the caller's tensors, and they are
    left as they were."""
    import proponents.checkpoints as ckpts

    torch.manual_seed(0)
    states = [Tied().state_dict() for _ in range(2)]
    kept = [{k: v.clone() for k, v in s.items()} for s in states]
    model = Tied()
    pointers: list[set[int]] = []
    real = ckpts._load_by_reference

    def recorded(m, state):
        real(m, state)
        pointers.append({p.data_ptr() for p in m.parameters()})

    monkeypatch.setattr(ckpts, "_load_by_reference", recorded)
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    t = TracInCPFast(
        model,
        "out",
        TensorDataset(x, y),
        states,
        batch_size=3,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
    )
    t.self_influence()
    theirs = {v.data_ptr() for s in states for v in s.values()}
    assert len(pointers) == 2 and all(not (ptrs & theirs) for ptrs in pointers)
    for s, k in zip(states, kept):
        assert all(torch.equal(s[n], k[n]) for n in k)


def test_a_model_with_its_own_load_state_dict_gets_copies(tmp_path):
    class OwnLoad(Tied):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            with torch.no_grad():  # ignores assign: copies into its tensors
                for name, value in state_dict.items():
                    self.get_parameter(name).copy_(value)
            return nn.modules.module._IncompatibleKeys([], [])

    torch.manual_seed(0)
    paths = []
    for c in range(2):
        paths.append(tmp_path / f"c{c}.pt")
        torch.save(OwnLoad().state_dict(), paths[-1])
    model = OwnLoad()
    snap = model_snapshot(model)
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    loss = nn.CrossEntropyLoss(reduction="none")
    t = TracInCP(model, TensorDataset(x, y), paths, loss_fn=loss, batch_size=3)
    t.self_influence()
    assert_unchanged(model, snap)


def test_a_checkpoint_stored_in_another_layout_keeps_the_models_layout(tmp_path, monkeypatch):
    """Tensors loaded by reference keep the model's strides: a weight stored transposed
    in memory (or a channels-last convolution) is given to the model in its own layout,
    and the scores equal those of copied loads."""
    import proponents.checkpoints as ckpts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3))
    state = model.state_dict()
    state["2.weight"] = state["2.weight"].t().contiguous().t()  # column-major
    state["0.weight"] = state["0.weight"].contiguous(memory_format=torch.channels_last)
    path = tmp_path / "c.pt"
    torch.save(state, path)
    seen: list[bool] = []
    real = ckpts._load_by_reference

    def recorded(m, st):
        real(m, st)
        seen.append(all(p.is_contiguous() for p in m.parameters()))

    monkeypatch.setattr(ckpts, "_load_by_reference", recorded)
    x, y = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss(reduction="none")
    by_reference = TracInCP(model, TensorDataset(x, y), [path], loss_fn=loss, batch_size=3)
    copied = TracInCP(
        model, TensorDataset(x, y), [path], _copying_loader, loss_fn=loss, batch_size=3
    )
    assert torch.equal(by_reference.self_influence(), copied.self_influence())
    assert seen == [True]


def _every_method(model, data, path, store, last_layer, layer) -> dict:
    """One call of each method on ``model``, by name (for the tests below)."""
    from proponents import SimilarityInfluence

    x, y = data.tensors[0][:2], data.tensors[1][:2]
    return {
        "TracInCP": lambda: TracInCP(
            model, data, [path], loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=4
        ).influence(x, y),
        "TracInCPFast": lambda: TracInCPFast(
            model, last_layer, data, [path], loss_fn=nn.CrossEntropyLoss(reduction="sum")
        ).self_influence(),
        "SimilarityInfluence": lambda: SimilarityInfluence(
            model, layer, data, store, batch_size=4
        ).influence(x, top_k=2),
    }


def test_tensors_held_as_plain_attributes_are_put_back(tmp_path):
    """``nn.utils.spectral_norm`` keeps the normalised weight as a plain attribute that
    each forward recomputes from the checkpoint's ``weight_orig``; after every method's
    call, the module holds the same tensor, with the same values, as before."""

    def build() -> nn.Module:
        return nn.Sequential(nn.utils.spectral_norm(nn.Linear(5, 4)), nn.ReLU(), nn.Linear(4, 3))

    torch.manual_seed(0)
    path = tmp_path / "sn.pt"
    torch.save(build().state_dict(), path)
    model = build()
    held = model[0].weight
    value = held.clone()
    data = TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))
    calls = _every_method(model, data, path, tmp_path / "acts", "2", "0")
    for name, call in calls.items():
        call()
        assert model[0].weight is held, name
        assert torch.equal(model[0].weight, value), name


class _Recorder(nn.Module):
    """A model whose forward changes its own containers in place and reassigns an object."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.log: list = []
        self.stats = {"n": 0, "per_class": [0, 0, 0]}
        self.seen: set = set()
        self.counts = np.zeros(3)
        self.tag = bytearray(b"abc")
        self.last: object = None

    def forward(self, x):
        out = self.lin(x)
        self.log.append(float(out.sum()))
        self.stats["n"] += 1
        self.stats["per_class"][0] += 1
        self.seen.add(len(self.log))
        self.counts += 1.0
        self.tag[0] = ord("z")
        self.last = object()
        return out


def test_containers_a_forward_changes_in_place_are_put_back(tmp_path):
    """A forward that appends to a list, counts in a dict (and in a list inside it), adds to
    a set, adds to a NumPy array or edits a bytearray it keeps, or reassigns an object
    attribute, leaves the model as it was after every method's call: the same objects,
    holding what they held (before: put back by reference, so what the forward did to them
    in place stayed)."""

    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(_Recorder().state_dict(), path)
    model = _Recorder()
    model.log.append(-1.0)
    held = {name: getattr(model, name) for name in ("log", "stats", "seen", "counts", "tag")}
    inner = model.stats["per_class"]
    data = TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))
    calls = _every_method(model, data, path, tmp_path / "acts", "lin", "lin")
    for name, call in calls.items():
        call()
        for attribute, obj in held.items():
            assert getattr(model, attribute) is obj, (name, attribute)
        assert model.log == [-1.0], name
        assert model.stats == {"n": 0, "per_class": [0, 0, 0]}, name
        assert model.seen == set() and model.tag == bytearray(b"abc"), name
        assert np.array_equal(model.counts, np.zeros(3)), name
        assert model.last is None, name
    assert inner == [0, 0, 0]  # the list the user holds was never written to either


def test_a_large_container_is_held_by_reference_not_copied_at_every_call():
    """A vocabulary of a million words held on the model is not copied and compared at
    every call (before the bound: 2.5 s per call for a million one-item lists): containers
    of more than _COPY_ITEMS items in all, nested ones counted, are held by reference; a
    smaller one is still set aside and refilled."""
    import proponents.model_guard as guard

    module = nn.Linear(2, 2)
    module.vocabulary = [[i] for i in range(guard._COPY_ITEMS)]  # 2 x _COPY_ITEMS in all
    module.counts = {"a": [0] * 10}
    held = guard._attribute_snapshot(module)
    assert held["vocabulary"][1] is guard._MISSING
    assert held["counts"][1] is not guard._MISSING
    with preserved(module):
        module.counts["a"].append(1)
    assert module.counts == {"a": [0] * 10}


def _tracing_put_back(on_line):
    """A trace function calling ``on_line()`` at every line the model guard runs while
    putting a model back (for the tests below)."""
    import proponents.model_guard as guard

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == guard.__file__ and frame.f_code.co_name == "_put_back":

            def local(frame, event, arg):
                if event == "line":
                    on_line()
                return local

            return local
        return None

    return tracer


def _lines_of_put_back() -> int:
    """How many line events putting a model back takes."""
    import sys

    count = {"n": 0}

    def on_line():
        count["n"] += 1

    sys.settrace(_tracing_put_back(on_line))
    try:
        with preserved(Tied()):
            pass
    finally:
        sys.settrace(None)
    return count["n"]


@pytest.mark.parametrize("where", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_ctrl_c_while_the_model_is_put_back_still_restores_it(tmp_path, where):
    """Ctrl-C landing on any line of the restore (here raised by a trace function at that
    line, which is what Python does with a SIGINT there): before, the model kept the last
    checkpoint's weights in some tensors, lost its ``.grad`` and stayed in eval mode."""
    import sys

    torch.manual_seed(0)
    model = Tied().train()
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    snap = model_snapshot(model)
    t = TracInCP(
        model,
        TensorDataset(x, y),
        _checkpoints(tmp_path),
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=4,
        sample_wise_grads_per_batch=True,
    )
    target = max(1, round(where * _lines_of_put_back()))
    seen = {"n": 0}

    def on_line():
        seen["n"] += 1
        if seen["n"] == target:
            raise KeyboardInterrupt

    sys.settrace(_tracing_put_back(on_line))
    try:
        with pytest.raises(KeyboardInterrupt):
            t.influence((x[:2],), y[:2])
    finally:
        sys.settrace(None)
    assert seen["n"] >= target
    assert_unchanged(model, snap)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[n]), n
