"""Bad input to TracInCP gets a typed error that names the problem and the fix."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from conftest import (
    assert_close,
    assert_unchanged,
    make_case,
    model_snapshot,
    reference_scores,
    reference_self,
)
from proponents import TracInCP, TracInCPFast, TracInCPFastRandProj
from proponents.errors import (
    ArgumentTypeError,
    BatchFormatError,
    CheckpointLoadError,
    CheckpointNotFoundError,
    InvalidArgumentError,
)


@pytest.fixture
def case(tmp_path):
    return make_case("mlp", tmp_path / "ck")


def make(case, **kw):
    args = dict(loss_fn=case.loss_fn("sum"), sample_wise_grads_per_batch=True, batch_size=4)
    args.update(kw)
    return TracInCP(
        case.model,
        kw.pop("data", case.dataset),
        args.pop("ckpts", case.checkpoints),
        **{k: v for k, v in args.items() if k not in ("data", "ckpts")},
    )


def test_empty_checkpoint_directory(case, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointNotFoundError, match="empty"):
        make(case, ckpts=str(empty))


def test_missing_checkpoint_path(case, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope.pt"):
        make(case, ckpts=[str(tmp_path / "nope.pt")])
    with pytest.raises(CheckpointNotFoundError):
        make(case, ckpts=iter([]))


def test_unreadable_checkpoint_names_the_file(case, tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(open(case.checkpoints[0], "rb").read()[:50])
    t = make(case, ckpts=[bad])
    with pytest.raises(CheckpointLoadError, match="broken.pt"):
        t.influence(case.test_inputs, case.test_labels)


def test_state_dict_mismatch_lists_keys(case, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Linear(6, 3)).state_dict(), other)
    t = make(case, ckpts=[other])
    with pytest.raises(CheckpointLoadError) as info:
        t.influence()
    msg = str(info.value)
    assert "other.pt" in msg and "fc1.weight" in msg and "0.weight" in msg


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("PROPONENTS_MARKER", "/tmp/x"),))


def test_checkpoint_with_pickled_code_is_refused_not_run(case, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PROPONENTS_MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": case.model.state_dict(), "payload": Evil()}, evil)
    assert not marker.exists()
    t = make(case, ckpts=[evil])
    with pytest.raises(CheckpointLoadError, match="evil.pt"):
        t.influence()
    assert not marker.exists()


@pytest.mark.parametrize(
    "reduction, flag, words",
    [
        ("none", True, "sample_wise_grads_per_batch=True"),
        ("sum", False, "reduction='none'"),
        ("mean", False, "sample_wise_grads_per_batch=False"),
    ],
)
def test_contradictory_loss_and_flag(case, reduction, flag, words):
    with pytest.raises(InvalidArgumentError, match=words):
        make(case, loss_fn=case.loss_fn(reduction), sample_wise_grads_per_batch=flag)


def test_per_example_loss_that_returns_a_scalar(case):
    t = make(
        case,
        loss_fn=lambda out, y: nn.functional.cross_entropy(out, y),
        sample_wise_grads_per_batch=False,
    )
    with pytest.raises(InvalidArgumentError, match="per-example"):
        t.influence()


def test_unknown_layer_lists_valid_names(case):
    with pytest.raises(InvalidArgumentError, match="fc3") as info:
        make(case, layers=["fc3"])
    assert "fc1" in str(info.value) and "fc2" in str(info.value)
    with pytest.raises(ArgumentTypeError, match="layers"):
        make(case, layers=[1])
    with pytest.raises(InvalidArgumentError, match="no parameters"):
        make(case, layers=["act"])


@pytest.mark.parametrize("k", [0, -1, 14])
def test_k_out_of_range(case, k):
    with pytest.raises(InvalidArgumentError, match=f"k={k}"):
        make(case).influence(case.test_inputs, case.test_labels, k=k)


def test_k_of_wrong_type(case):
    with pytest.raises(ArgumentTypeError, match="k must be"):
        make(case).influence(case.test_inputs, case.test_labels, k=2.0)


def test_targets_length_differs(case):
    # the batch could be packed (one example per target row) until the model's output
    # shows it is not: the error names all three counts
    with pytest.raises(
        BatchFormatError,
        match=r"3 labels \(targets\) but model inputs of 4 examples.*output has 4 rows",
    ):
        make(case).influence(case.test_inputs, case.test_labels[:3])
    # one example without its batch dimension: the message says how to give one
    with pytest.raises(BatchFormatError, match=r"inputs of 6 examples.*x\[None\]"):
        make(case).influence((case.test_inputs[0][0],), case.test_labels[:1])


def test_missing_targets_with_a_loss(case):
    with pytest.raises(InvalidArgumentError, match="targets are required"):
        make(case).influence(case.test_inputs)


def test_empty_training_set(case):
    empty = TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="empty"):
        make(case, data=empty)


class NoLabels(Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.randn(6)


def test_batches_without_a_label_element(case):
    t = make(case, data=NoLabels())
    with pytest.raises(BatchFormatError, match=r"model\(\*batch\[:-1\]\)"):
        t.influence()


def test_wrong_argument_types(case):
    with pytest.raises(ArgumentTypeError, match="train_dataset"):
        make(case, data={1, 2, 3})  # a list of examples is valid; a set is not
    with pytest.raises(ArgumentTypeError, match="checkpoints_load_func"):
        make(case, checkpoints_load_func="load")
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        make(case, batch_size=0)
    with pytest.raises(ArgumentTypeError, match="loss_fn"):
        make(case, loss_fn=3)
    with pytest.raises(ArgumentTypeError, match="sample_wise_grads_per_batch"):
        make(case, sample_wise_grads_per_batch="yes")
    with pytest.raises(ArgumentTypeError, match="checkpoints"):
        make(case, ckpts=42)


class _DictOutput(nn.Module):
    """Returns its logits in a dict, as many model libraries do."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.b(torch.tanh(self.a(x)))}


class _Logits(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)["logits"]


def test_a_model_that_returns_a_dict_gets_an_error_saying_how_to_fix_it(tmp_path):
    """A loss that cannot take the model's dict output is reported as such (with the fix),
    for TracInCP and TracInCPFast; a loss_fn that reads the dict works, and equals the
    scores of the model wrapped to return its logits."""
    from proponents import TracInCPFast

    torch.manual_seed(0)
    model = _DictOutput()
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    train = TensorDataset(x, y)
    with pytest.raises(ArgumentTypeError, match="model returned a dict, which loss_fn cannot"):
        TracInCP(
            model, train, [path], loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=4
        ).self_influence()
    with pytest.raises(ArgumentTypeError, match=r"model\(x\)\['logits'\]"):
        TracInCPFast(
            model, "b", train, [path], loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=4
        ).self_influence()

    def reads_the_dict(out, labels):
        return nn.functional.cross_entropy(out["logits"], labels, reduction="none")

    got = TracInCP(model, train, [path], loss_fn=reads_the_dict, batch_size=4).self_influence()
    wrapped = _Logits(model)
    wrapped_path = tmp_path / "wrapped.pt"
    torch.save(wrapped.state_dict(), wrapped_path)
    want = TracInCP(
        wrapped,
        train,
        [wrapped_path],
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=4,
    ).self_influence()
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------- empty test batches
def _three_methods(case):
    """TracInCP on both loss settings and TracInCPFast over ``case`` (an "mlp" case)."""
    return [
        make(case),
        make(
            case,
            layers=["fc1"],
            loss_fn=case.loss_fn("none"),
            sample_wise_grads_per_batch=False,
        ),
        TracInCPFast(
            case.model,
            "fc2",
            case.dataset,
            case.checkpoints,
            loss_fn=case.loss_fn("sum"),
            batch_size=4,
        ),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_empty_test_batch_gives_empty_results_like_a_full_one(case, dtype):
    """A test batch of no examples (say, the misclassified ones when there are none) gives
    what the full batch gives with its rows dropped: same dtypes and device, no crash."""
    case.model.to(dtype)
    case.train_inputs = (case.train_inputs[0].to(dtype),)
    x = case.test_inputs[0].to(dtype)
    y = case.test_labels
    n_train = len(case.train_labels)
    for t in _three_methods(case):
        full = t.influence((x,), y)
        empty = t.influence((x[:0],), y[:0])
        assert empty.shape == (0, n_train)
        assert empty.dtype == full.dtype == dtype and empty.device == full.device
        for proponents in (True, False):
            top = t.influence((x,), y, k=3, proponents=proponents)
            none = t.influence((x[:0],), y[:0], k=3, proponents=proponents)
            assert none.indices.shape == none.influence_scores.shape == (0, 3)
            assert none.indices.dtype == top.indices.dtype == torch.int64
            assert none.influence_scores.dtype == top.influence_scores.dtype
        # a DataLoader over no examples: the same as the empty batch
        loader = DataLoader(TensorDataset(x[:0], y[:0]), batch_size=4)
        assert t.influence(loader).shape == (0, n_train)
        assert t.influence(loader, k=3).indices.shape == (0, 3)
        # the summed influence of no examples is zero; its top k are then the first k
        total = t.influence((x[:0],), y[:0], aggregate=True)
        assert torch.equal(total, torch.zeros(1, n_train, dtype=dtype))
        agg = t.influence((x[:0],), y[:0], k=2, aggregate=True)
        assert agg.indices.tolist() == [[0, 1]]
        selfs = t.self_influence((x[:0], y[:0]))
        assert selfs.shape == (0,) and selfs.dtype == t.self_influence((x, y)).dtype
        with pytest.raises(InvalidArgumentError, match=f"k={n_train + 1}"):
            t.influence((x[:0],), y[:0], k=n_train + 1)
        with pytest.raises(InvalidArgumentError, match="targets are required"):
            t.influence((x[:0],))


class _Stream(IterableDataset):
    """The training examples as a stream without a length."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


def test_an_empty_test_batch_over_a_stream_counts_the_training_examples(case):
    stream = _Stream(*case.train_inputs, case.train_labels)
    t = make(case, data=stream)
    n_train = len(case.train_labels)
    assert t.influence((case.test_inputs[0][:0],), case.test_labels[:0]).shape == (0, n_train)
    none = t.influence((case.test_inputs[0][:0],), case.test_labels[:0], k=n_train)
    assert none.indices.shape == (0, n_train)
    with pytest.raises(InvalidArgumentError, match=f"k={n_train + 1} exceeds the {n_train}"):
        t.influence((case.test_inputs[0][:0],), case.test_labels[:0], k=n_train + 1)


# ------------------------------------------------------------ torch.inference_mode()
def test_calls_inside_inference_mode_give_the_reference_scores(case):
    """Inside torch.inference_mode() the calls leave that mode (they need autograd): the
    scores equal the float64 loop's, and the model and the mode are as they were."""
    want, want_self = reference_scores(case), reference_self(case)
    want_fast = reference_scores(case, layers=["fc2"])
    snap = model_snapshot(case.model)
    cp = make(case)
    with torch.inference_mode():
        fast = TracInCPFast(
            case.model,
            "fc2",
            case.dataset,
            case.checkpoints,
            loss_fn=case.loss_fn("sum"),
            batch_size=4,
        )
        proj = TracInCPFastRandProj(
            case.model,
            "fc2",
            case.dataset,
            case.checkpoints,
            loss_fn=case.loss_fn("sum"),
            batch_size=4,
        )
        x = case.test_inputs[0] * 1.0  # an inference tensor
        scores, selfs = cp.influence((x,), case.test_labels), cp.influence()
        top = cp.influence((x,), case.test_labels, k=2)
        fast_scores = fast.influence((x,), case.test_labels)
        proj_scores = proj.influence((x,), case.test_labels, k=None)
        assert torch.is_inference_mode_enabled()
    assert_close(scores, want)
    assert_close(selfs, want_self)
    assert_close(top.influence_scores, want.sort(dim=1, descending=True).values[:, :2])
    assert_close(fast_scores, want_fast)
    assert_close(proj_scores, want_fast)
    assert_unchanged(case.model, snap)
    assert not torch.is_inference_mode_enabled()


# ------------------------------------------------------------------ integer types of k
@pytest.mark.parametrize(
    "k", [np.int64(2), np.int32(2), torch.tensor(2)], ids=["np.int64", "np.int32", "tensor"]
)
def test_k_of_any_integer_type_is_an_int(case, k):
    for t in _three_methods(case)[::2]:
        want = t.influence(case.test_inputs, case.test_labels, k=2)
        got = t.influence(case.test_inputs, case.test_labels, k=k)
        assert torch.equal(got.indices, want.indices)
        assert torch.equal(got.influence_scores, want.influence_scores)


@pytest.mark.parametrize("k", [True, np.float64(2.0), torch.tensor(2.0), "2"])
def test_k_that_is_not_an_integer_is_refused(case, k):
    with pytest.raises(ArgumentTypeError, match="k must be an int or None"):
        make(case).influence(case.test_inputs, case.test_labels, k=k)


@pytest.mark.parametrize("cls", [TracInCP, TracInCPFast, TracInCPFastRandProj])
def test_a_loss_class_instead_of_an_instance_names_the_fix(case, cls):
    """``loss_fn=nn.CrossEntropyLoss`` (no parentheses) passed the constructors and failed
    later inside torch ("Boolean value of Tensor ... is ambiguous")."""
    args = [case.model, case.dataset, case.checkpoints]
    if cls is not TracInCP:
        args.insert(1, "fc2")
    with pytest.raises(ArgumentTypeError, match=r"class CrossEntropyLoss.*CrossEntropyLoss\("):
        cls(*args, loss_fn=nn.CrossEntropyLoss)


def test_arguments_without_effect_in_self_influence_mode_are_named(case):
    """``influence(k=3)`` without inputs is the self-influence (as in the spec); the
    arguments that do nothing there are named in a warning instead of passing unseen."""
    t = make(case)
    want = t.self_influence()
    with pytest.warns(UserWarning, match=r"k=3 and proponents=False have no effect"):
        got = t.influence(k=3, proponents=False)
    assert torch.equal(got, want)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(t.influence(), want)


def test_numpy_booleans_are_taken_as_the_flags_they_are(case, tmp_path):
    """A flag read from a NumPy array or config is np.bool_: it means True or False, with
    the results of the Python bool (torch's own functions refuse np.bool_)."""
    x, y = case.test_inputs, case.test_labels
    t = make(case, sample_wise_grads_per_batch=np.True_)
    for k in (None, 3):
        for pro in (True, False):
            want = t.influence(x, y, k=k, proponents=pro)
            got = t.influence(x, y, k=k, proponents=np.bool_(pro), unpack_inputs=np.True_)
            if k is None:
                assert torch.equal(got, want)
            else:
                assert torch.equal(got.indices, want.indices)
                assert torch.equal(got.influence_scores, want.influence_scores)
    assert_close(t.influence(x, y), reference_scores(case))
    assert torch.equal(t.self_influence(show_progress=np.False_), t.self_influence())
    fast = TracInCPFast(
        case.model,
        "fc2",
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=4,
        vectorize=np.False_,
    )
    rp = TracInCPFastRandProj(
        case.model,
        "fc2",
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=4,
        show_progress=np.False_,
    )
    want = fast.influence(x, y, k=3, proponents=False)
    got = rp.influence(x, y, k=3, proponents=np.False_)
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.influence_scores, want.influence_scores)


@pytest.mark.parametrize("label", [3, -1])
def test_a_class_label_outside_the_output_is_named_by_every_class(case, label):
    """Before: torch's "Target 3 is out of bounds" from inside the loss, or from the
    closed-form gradient of TracInCPFast an index error that did not mention labels (on a
    GPU, a device-side assert). The MLP case has 3 classes."""
    x, y = case.test_inputs[0][:3], case.test_labels[:3].clone()
    y[1] = label
    bad_train = TensorDataset(case.train_inputs[0], case.train_labels.clone())
    bad_train.tensors[1][2] = label
    loss = case.loss_fn("sum")
    fast = TracInCPFast(case.model, "fc2", case.dataset, case.checkpoints, loss_fn=loss)
    calls = {
        "TracInCP sample-wise": lambda: make(case).influence((x,), y),
        "TracInCP per-example loss": lambda: make(
            case, loss_fn=case.loss_fn("none"), sample_wise_grads_per_batch=False
        ).influence((x,), y),
        "TracInCPFast test side": lambda: fast.influence((x,), y),
        "TracInCPFast self-influence": lambda: fast.self_influence((x, y)),
        "TracInCPFast training side": lambda: TracInCPFast(
            case.model, "fc2", bad_train, case.checkpoints, loss_fn=loss
        ).self_influence(),
        "TracInCPFastRandProj": lambda: TracInCPFastRandProj(
            case.model, "fc2", bad_train, case.checkpoints, loss_fn=loss
        ),
    }
    for call in calls.values():
        with pytest.raises(
            BatchFormatError, match=rf"class label {label} is out of range.* 3 classes"
        ):
            call()
    # a label equal to ignore_index is no error, and scores as the loop does
    ignoring = nn.CrossEntropyLoss(reduction="sum", ignore_index=-1)
    y[1] = -1
    got = make(case, loss_fn=ignoring).influence((x,), y)
    assert torch.isfinite(got).all() and torch.equal(got[1], torch.zeros_like(got[1]))


class _OneBased(nn.CrossEntropyLoss):
    """A subclass that maps its labels (1..C) before the loss sees them."""

    def forward(self, output, labels):
        return super().forward(output, labels - 1)


def test_a_cross_entropy_subclass_that_maps_its_labels_is_not_range_checked(case):
    """The range check covers torch's own losses only: a subclass may take labels that
    are not class positions (here 1..3 for 3 classes). Its scores are those of the plain
    loss on the mapped labels."""
    x, y = case.test_inputs[0][:3], case.test_labels[:3]
    plain = TracInCPFast(
        case.model,
        "fc2",
        case.dataset,
        case.checkpoints,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
    ).influence((x,), y)
    shifted = TensorDataset(case.train_inputs[0], case.train_labels + 1)
    mapped = TracInCPFast(
        case.model, "fc2", shifted, case.checkpoints, loss_fn=_OneBased(reduction="sum")
    ).influence((x,), y + 1)
    torch.testing.assert_close(mapped, plain)
