"""TracInCPFastRandProj with its embeddings on disk (memory_budget) and in float16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_case
from proponents import ExactNearestNeighbors, TracInCPFastRandProj
from proponents.store import _MAPPED, is_mapped

FINAL = "fc2"


def build(case, **kw):
    return TracInCPFastRandProj(
        case.model,
        FINAL,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=4,
        **kw,
    )


def load(case, path, **kw):
    return TracInCPFastRandProj.load(
        path, case.model, case.checkpoints, case.loss_fn("sum"), train_dataset=case.dataset, **kw
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case("mlp", tmp_path_factory.mktemp("ckpts"))


@pytest.mark.parametrize("projection_dim", [None, 4])
def test_float32_on_disk_equals_in_memory_exactly(case, projection_dim):
    ram = build(case, projection_dim=projection_dim)
    disk = build(case, projection_dim=projection_dim, memory_budget=0)
    assert not is_mapped(ram.embeddings)
    assert is_mapped(disk.embeddings)
    assert disk.embeddings.dtype == torch.float32
    assert torch.equal(ram.embeddings, disk.embeddings)
    x, y = case.test_inputs, case.test_labels
    assert torch.equal(ram.influence(x, y, k=None), disk.influence(x, y, k=None))
    for proponents in (True, False):
        a = ram.influence(x, y, k=3, proponents=proponents)
        b = disk.influence(x, y, k=3, proponents=proponents)
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.influence_scores, b.influence_scores)


def test_several_checkpoints_fill_their_own_columns(case):
    # Each checkpoint writes its block of columns; a missing block would stay zero.
    assert len(case.checkpoints) > 1
    disk = build(case, projection_dim=4, memory_budget=0)
    width = disk._projections[0].dim
    assert disk.embeddings.shape[1] == width * len(case.checkpoints)
    ram = build(case, projection_dim=4)
    for c in range(len(case.checkpoints)):
        cols = slice(c * width, (c + 1) * width)
        assert torch.equal(disk.embeddings[:, cols], ram.embeddings[:, cols])


def test_budget_decides_whether_the_matrix_goes_to_disk(case):
    ram = build(case, projection_dim=4)
    size = ram.embeddings.numel() * ram.embeddings.element_size()
    assert not is_mapped(build(case, projection_dim=4, memory_budget=size).embeddings)
    assert is_mapped(build(case, projection_dim=4, memory_budget=size - 1).embeddings)
    # float16 halves the size: the same budget then suffices
    half = build(case, projection_dim=4, memory_budget=size // 2, index_dtype=torch.float16)
    assert not is_mapped(half.embeddings)


def test_mapped_embeddings_are_read_only_views_of_a_file(case):
    disk = build(case, projection_dim=4, memory_budget=0)
    storage = disk.embeddings.untyped_storage()
    assert storage.nbytes() == disk.embeddings.numel() * 4
    mm = _MAPPED[disk.embeddings.data_ptr()][0]  # the file's memory map
    assert memoryview(mm).readonly


@pytest.mark.parametrize("budget", [None, 0])
def test_float16_storage_scores_in_float32_within_tolerance(case, budget):
    ram = build(case, projection_dim=4)
    half = build(case, projection_dim=4, memory_budget=budget, index_dtype=torch.float16)
    assert half.embeddings.dtype == torch.float16
    assert is_mapped(half.embeddings) == (budget == 0)
    x, y = case.test_inputs, case.test_labels
    exact = ram.influence(x, y, k=None)
    approx = half.influence(x, y, k=None)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, rtol=2e-3, atol=2e-3 * float(exact.abs().max()))
    top = half.influence(x, y, k=3)
    assert top.influence_scores.dtype == torch.float32
    expected = approx.gather(1, top.indices)
    torch.testing.assert_close(top.influence_scores, expected)


def test_exact_search_streams_over_a_mapped_matrix(case):
    disk = build(
        case,
        projection_dim=4,
        memory_budget=0,
        nearest_neighbors=ExactNearestNeighbors(block_size=3),
    )
    ram = build(case, projection_dim=4, nearest_neighbors=ExactNearestNeighbors(block_size=3))
    x, y = case.test_inputs, case.test_labels
    a, b = ram.influence(x, y, k=5), disk.influence(x, y, k=5)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.influence_scores, b.influence_scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip(case, tmp_path, dtype):
    disk = build(case, projection_dim=4, memory_budget=0, index_dtype=dtype)
    disk.save(tmp_path / "index")
    x, y = case.test_inputs, case.test_labels
    want = disk.influence(x, y, k=None)
    in_ram = load(case, tmp_path / "index")
    assert not is_mapped(in_ram.embeddings)
    assert in_ram.embeddings.dtype == dtype
    assert torch.equal(in_ram.embeddings, disk.embeddings)
    assert torch.equal(in_ram.influence(x, y, k=None), want)
    mm = load(case, tmp_path / "index", memory_budget=0)
    assert is_mapped(mm.embeddings)
    assert torch.equal(mm.embeddings, disk.embeddings)
    assert torch.equal(mm.influence(x, y, k=None), want)
    a, b = disk.influence(x, y, k=4), mm.influence(x, y, k=4)
    assert torch.equal(a.indices, b.indices)
    # a loaded mapped index saves again (the content is copied, not the mapping)
    mm.save(tmp_path / "again")
    again = load(case, tmp_path / "again")
    assert torch.equal(again.embeddings, disk.embeddings)


def test_load_converts_to_another_dtype_on_disk(case, tmp_path):
    ram = build(case, projection_dim=4)
    ram.save(tmp_path / "index")
    half = load(case, tmp_path / "index", memory_budget=0, index_dtype=torch.float16)
    assert is_mapped(half.embeddings) and half.embeddings.dtype == torch.float16
    assert torch.equal(half.embeddings, ram.embeddings.half())


def test_scratch_file_is_unlinked(case, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    disk = build(case, projection_dim=4, memory_budget=0)
    assert is_mapped(disk.embeddings)
    assert list(tmp_path.iterdir()) == []
    assert np.isfinite(disk.embeddings.numpy()).all()


def test_a_bfloat16_model_indexes_on_disk_and_loads_like_in_memory(tmp_path):
    """A bfloat16 final layer: the embeddings are kept as float32 (the same values; NumPy
    has no bfloat16), so a memory budget puts them on disk instead of failing, and
    on-disk, in-memory and saved-then-loaded indexes give the same scores as TracInCPFast."""
    from proponents import TracInCPFast

    bf16 = make_case("mlp", tmp_path / "ckpts")
    bf16.model.to(torch.bfloat16)
    for path in bf16.checkpoints:  # the checkpoints in bfloat16 too
        saved = torch.load(path, weights_only=True)
        saved["model_state_dict"] = {
            k: v.to(torch.bfloat16) for k, v in saved["model_state_dict"].items()
        }
        torch.save(saved, path)
    bf16.train_inputs = tuple(t.to(torch.bfloat16) for t in bf16.train_inputs)
    x, y = tuple(t.to(torch.bfloat16) for t in bf16.test_inputs), bf16.test_labels
    ram, disk = build(bf16), build(bf16, memory_budget=0)
    assert ram.embeddings.dtype == torch.float32 and is_mapped(disk.embeddings)
    assert torch.equal(ram.embeddings, disk.embeddings)
    expected = TracInCPFast(bf16.model, FINAL, bf16.dataset, bf16.checkpoints,
                            loss_fn=bf16.loss_fn("sum"), batch_size=4).influence(x, y)  # fmt: skip
    for index in (ram, disk):
        torch.testing.assert_close(
            index.influence(x, y, k=None), expected.float(), rtol=2e-2, atol=1e-2
        )
    disk.save(tmp_path / "index")
    for budget in (None, 0):
        loaded = load(bf16, tmp_path / "index", memory_budget=budget)
        assert torch.equal(loaded.influence(x, y, k=None), ram.influence(x, y, k=None))
