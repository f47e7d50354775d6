"""The same results on a GPU: data moved to the model's device, results left there.

Every test builds a model on CUDA and feeds it data that lives on the CPU (as a user's
Dataset usually does), sometimes test inputs already on the GPU, and checks that

* results are on the model's device, and agree with the CPU run and the float64 loop
  reference (TF32 is switched off so that float32 means float32 on both sides);
* the invariants of test_properties.py hold there too: self-influence is the diagonal,
  k-most is the sorted full scores;
* the model stays on its device, unchanged, and neither the CPU nor the CUDA RNG moves.

All are marked ``cuda`` and skipped on machines without a CUDA device.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import (
    assert_close,
    assert_unchanged,
    make_case,
    model_snapshot,
    reference_scores,
    reference_self,
)
from proponents import SimilarityInfluence, TracInCP, TracInCPFast, TracInCPFastRandProj

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FINAL = {"mlp": "fc2", "cnn": "fc", "two_input": "out", "embed": "head"}


@pytest.fixture(autouse=True)
def _exact_float32():
    """No TF32: float32 matrix products and convolutions at full precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _on_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == "cuda", t.device


def _rng() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.get_rng_state(), torch.cuda.get_rng_state()


def _same_rng(before) -> None:
    now = _rng()
    assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1])


def _assert_ranks(indices, values, full, k, descending, rtol=2e-4) -> None:
    """k-most results are the k best entries of ``full``, up to ties within rounding."""
    full, values = full.double().cpu(), values.double().cpu()
    best = torch.sort(full, dim=1, descending=descending).values[:, :k]
    assert_close(values, best, rtol)
    assert_close(full.gather(1, indices.cpu()), values, rtol)


@pytest.mark.parametrize("name", ["mlp", "cnn", "two_input", "embed"])
def test_tracincp_on_cuda(tmp_path, name):
    case = make_case(name, tmp_path)
    want, want_self = reference_scores(case), reference_self(case)  # float64, on the CPU
    cpu_model = copy.deepcopy(case.model)
    case.model.cuda().train()
    snap = model_snapshot(case.model)
    rng = _rng()
    tracin = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=5,
        sample_wise_grads_per_batch=True,
    )
    scores = tracin.influence(case.test_inputs, case.test_labels)
    _on_cuda(scores)
    assert_close(scores, want)
    cpu = TracInCP(
        cpu_model,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=5,
        sample_wise_grads_per_batch=True,
    )
    assert_close(scores, cpu.influence(case.test_inputs, case.test_labels), rtol=1e-4)

    on_gpu = tuple(t.cuda() for t in case.test_inputs)  # inputs already on the device
    assert_close(tracin.influence(on_gpu, case.test_labels.cuda()), scores, rtol=1e-5)
    loader = DataLoader(TensorDataset(*case.test_inputs, case.test_labels), batch_size=3)
    assert_close(tracin.influence(loader), scores, rtol=1e-4)

    top = tracin.influence(case.test_inputs, case.test_labels, k=4, proponents=False)
    _on_cuda(top.indices, top.influence_scores)
    _assert_ranks(top.indices, top.influence_scores, scores, 4, descending=False)

    self_scores = tracin.self_influence()
    _on_cuda(self_scores)
    assert_close(self_scores, want_self)
    diagonal = tracin.influence(case.train_inputs, case.train_labels).diagonal()
    assert_close(self_scores, diagonal)
    assert_unchanged(case.model, snap)
    assert next(case.model.parameters()).device.type == "cuda"
    _same_rng(rng)


def test_tracincp_float64_on_cuda(tmp_path):
    case = make_case("mlp", tmp_path)
    model = copy.deepcopy(case.model).double().cuda()
    data = TensorDataset(case.train_inputs[0].double(), case.train_labels)
    tracin = TracInCP(model, data, case.checkpoints, loss_fn=case.loss_fn("none"), batch_size=4)
    scores = tracin.influence((case.test_inputs[0].double(),), case.test_labels)
    assert scores.dtype == torch.float64
    _on_cuda(scores)
    assert_close(scores, reference_scores(case), rtol=1e-9)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_tracincp_fast_on_cuda(tmp_path, name):
    case = make_case(name, tmp_path)
    layer = FINAL[name]
    want, want_self = reference_scores(case, [layer]), reference_self(case, [layer])
    cpu = TracInCPFast(
        copy.deepcopy(case.model),
        layer,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("mean"),
        batch_size=4,
    )
    case.model.cuda()
    snap = model_snapshot(case.model)
    rng = _rng()
    fast = TracInCPFast(
        case.model,
        layer,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("mean"),
        batch_size=4,
    )
    scores = fast.influence(case.test_inputs, case.test_labels)
    _on_cuda(scores)
    assert_close(scores, want)
    assert_close(scores, cpu.influence(case.test_inputs, case.test_labels), rtol=1e-4)
    self_scores = fast.self_influence()
    _on_cuda(self_scores)
    assert_close(self_scores, want_self)
    top = fast.influence(case.test_inputs, case.test_labels, k=3)
    _on_cuda(top.indices)
    _assert_ranks(top.indices, top.influence_scores, scores, 3, descending=True)
    assert_unchanged(case.model, snap)
    _same_rng(rng)


@pytest.mark.parametrize("projection_dim", [None, 7])
def test_randproj_on_cuda(tmp_path, projection_dim):
    case = make_case("embed", tmp_path)
    want = reference_scores(case, ["head"])
    loss = case.loss_fn("sum")
    cpu_model = copy.deepcopy(case.model)
    cpu = TracInCPFastRandProj(
        cpu_model,
        "head",
        case.dataset,
        case.checkpoints,
        loss_fn=loss,
        batch_size=4,
        projection_dim=projection_dim,
        seed=11,
    )
    case.model.cuda()
    snap = model_snapshot(case.model)
    rng = _rng()
    rp = TracInCPFastRandProj(
        case.model,
        "head",
        case.dataset,
        case.checkpoints,
        loss_fn=loss,
        batch_size=4,
        projection_dim=projection_dim,
        seed=11,
    )
    _on_cuda(rp.embeddings)
    # the projection is drawn on the CPU, so the device does not change it
    assert_close(rp.embeddings, cpu.embeddings, rtol=1e-4)
    full = rp.influence(case.test_inputs, case.test_labels, k=None)
    _on_cuda(full)
    assert_close(full, cpu.influence(case.test_inputs, case.test_labels, k=None), rtol=1e-4)
    if projection_dim is None:
        assert_close(full, want)
    for proponents in (True, False):
        top = rp.influence(case.test_inputs, case.test_labels, k=5, proponents=proponents)
        _on_cuda(top.indices, top.influence_scores)
        _assert_ranks(top.indices, top.influence_scores, full, 5, descending=proponents)
    assert_unchanged(case.model, snap)
    _same_rng(rng)

    # an index saved from the GPU loads into a CPU model, and back
    rp.save(tmp_path / "index")
    on_cpu = TracInCPFastRandProj.load(
        tmp_path / "index", cpu_model, case.checkpoints, loss, train_dataset=case.dataset
    )
    assert on_cpu.embeddings.device.type == "cpu"
    assert_close(on_cpu.influence(case.test_inputs, case.test_labels, k=None), full, rtol=1e-4)


def test_similarity_on_cuda(tmp_path):
    case = make_case("cnn", tmp_path / "ck")
    cpu_model = copy.deepcopy(case.model)
    layers = ["conv1", "conv2", "fc"]
    case.model.cuda().train()
    snap = model_snapshot(case.model)
    rng = _rng()
    sim = SimilarityInfluence(case.model, layers, case.dataset, tmp_path / "gpu", batch_size=4)
    (x,) = case.test_inputs
    got = sim.influence(x, top_k=5)
    cpu = SimilarityInfluence(cpu_model, layers, case.dataset, tmp_path / "cpu", batch_size=4)
    want = cpu.influence(x, top_k=13)
    for layer in layers:
        indices, values = got[layer]
        _on_cuda(indices, values)
        full = torch.zeros(x.shape[0], 13, dtype=torch.float64)
        full.scatter_(1, want[layer][0], want[layer][1].double())  # CPU scores, by index
        _assert_ranks(indices, values, full, 5, descending=True, rtol=1e-4)
    # the store written from the GPU serves the GPU again, and a CPU model with the same weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sim.influence(x.cuda(), top_k=5)
        shared = SimilarityInfluence(
            cpu_model, layers, case.dataset, tmp_path / "gpu", batch_size=4
        ).influence(x, top_k=5)
    for layer in layers:
        assert torch.equal(again[layer][0], got[layer][0])
        assert shared[layer][0].device.type == "cpu"
        assert_close(shared[layer][1], got[layer][1], rtol=1e-4)
    assert_unchanged(case.model, snap)
    _same_rng(rng)


@pytest.mark.parametrize("tf32", [False, True])
def test_euclidean_neighbours_of_near_duplicates_on_cuda(tmp_path, monkeypatch, tf32):
    """With TF32 products allowed the rounding bound widens to match (u = 2^-11), and the
    neighbours stay exact."""
    from proponents import euclidean_distance
    from test_similarity import _brute, _check, _near_duplicates

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    train, test = _near_duplicates()
    sim = SimilarityInfluence(
        torch.nn.Sequential(torch.nn.Identity()).cuda(),
        "0",
        train,
        tmp_path,
        similarity_metric=euclidean_distance,
        similarity_direction="min",
        batch_size=64,
    )
    expected = _brute(test.double(), train.tensors[0].double(), "euclidean", "min", 5)
    for _ in range(2):
        indices, values = sim.influence(test, top_k=5)["0"]
        _on_cuda(indices, values)
        _check((indices.cpu(), values.cpu()), expected)


def test_the_quick_digest_on_cuda_sees_a_one_bit_edit():
    """The digest is summed on the GPU: a flipped bit changes it, flipping it back
    restores it, and the fingerprint cache answers the full SHA-256 throughout."""
    from torch import nn

    from proponents.fingerprints import ModelFingerprints, model_fingerprint, quick_model_digest

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.BatchNorm1d(40)).cuda()
    model[0].register_buffer("halves", torch.randn(11, device="cuda").half()[1:9])
    cache = ModelFingerprints()
    base, full = quick_model_digest(model), cache(model)
    assert full == model_fingerprint(model)
    for tensor in (model[0].weight, model[1].running_var, model[0].halves):
        words = tensor.data.reshape(-1).view(torch.uint8)
        words[5] ^= 4
        assert quick_model_digest(model) != base
        assert cache(model) == model_fingerprint(model) != full
        words[5] ^= 4
        assert quick_model_digest(model) == base and cache(model) == full
