"""Allocations and work bounded by block sizes, not by the size of the data.

Each test makes a block small (or watches what a step allocates) and checks both the
bound and that the answer is the one an unblocked computation gives.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import assert_close, make_case, reference_scores, reference_self
from proponents import TracInCP
from proponents import scoring as scoring_module
from proponents.gradients.engine import GradientEngine
from proponents.gradients.representations import FactoredGrads
from proponents.neighbors.exact import block_scores, exact_top_k
from proponents.scoring import k_most


def _stable_reference(scores: torch.Tensor, k: int, proponents: bool) -> torch.Tensor:
    """Columns of each row's first ``k``: by score (negated for opponents) in float64,
    non-finite scores last, equal ones in column order; one Python sort per row."""
    rows = []
    for row in scores.double().tolist():
        finite = [j for j, v in enumerate(row) if abs(v) != float("inf") and v == v]
        rest = [j for j in range(len(row)) if j not in set(finite)]
        ordered = sorted(finite, key=lambda j: -row[j] if proponents else row[j]) + rest
        rows.append(ordered[:k])
    return torch.tensor(rows, dtype=torch.long)


def _watch_sorts(monkeypatch) -> list[int]:
    """Record the number of entries of every ``torch.sort`` and ``torch.topk`` input."""
    seen: list[int] = []
    sort, topk = torch.sort, torch.Tensor.topk

    def watched_sort(x, *args, **kwargs):
        seen.append(x.numel())
        return sort(x, *args, **kwargs)

    def watched_topk(x, *args, **kwargs):
        seen.append(x.numel())
        return topk(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", watched_sort)
    monkeypatch.setattr(torch.Tensor, "topk", watched_topk)
    return seen


@pytest.mark.parametrize("proponents", [True, False])
@pytest.mark.parametrize("k", [1, 3, 20, 50])
def test_k_most_ranks_a_block_of_rows_at_a_time(monkeypatch, k, proponents):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-4, 5, (40, 50), generator=g).float()  # many ties
    scores += torch.where(torch.rand(40, 50, generator=g) < 0.5, 0.0, 0.25)
    mark = torch.rand(40, 50, generator=g)
    scores[mark < 0.05] = float("nan")
    scores[(mark >= 0.05) & (mark < 0.08)] = float("inf")
    scores[(mark >= 0.08) & (mark < 0.1)] = -float("inf")
    scores[:3] = float("nan")  # rows with fewer than k finite scores
    monkeypatch.setattr(scoring_module, "_RANK_BLOCK_ENTRIES", 120, raising=False)  # 2 rows
    seen = _watch_sorts(monkeypatch)
    indices, values = k_most(scores, k, proponents)
    assert max(seen) <= 120  # never the (40, 50) matrix at once
    assert torch.equal(indices, _stable_reference(scores, k, proponents))
    assert torch.equal(values.nan_to_num(7.0), scores.gather(1, indices).nan_to_num(7.0))


def test_tracincp_k_most_in_small_blocks_is_the_sorted_score_matrix(tmp_path, monkeypatch):
    case = make_case("mlp", tmp_path, n_train=30, n_test=7)
    tracin = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=8,
        sample_wise_grads_per_batch=True,
    )
    scores = tracin.influence(case.test_inputs, case.test_labels)
    assert_close(scores, reference_scores(case))
    monkeypatch.setattr(scoring_module, "_RANK_BLOCK_ENTRIES", 31, raising=False)
    for proponents in (True, False):
        seen = _watch_sorts(monkeypatch)
        top = tracin.influence(case.test_inputs, case.test_labels, k=4, proponents=proponents)
        assert max(seen) <= 30  # one row of scores at a time, not the (7, 30) matrix
        assert torch.equal(top.indices, _stable_reference(scores, 4, proponents))
        assert torch.equal(top.influence_scores, scores.gather(1, top.indices))


def test_exact_search_with_a_k_of_many_blocks_sorts_each_row_a_bounded_number_of_times(
    monkeypatch,
):
    g = torch.Generator().manual_seed(1)
    n_rows, block = 64 * 20, 64
    data = torch.randint(-3, 4, (n_rows, 4), generator=g).float()
    data[torch.rand(n_rows, generator=g) < 0.02, 1] = float("nan")
    query = torch.randn(3, 4, generator=g, dtype=torch.float64)
    full = block_scores(query, data, block)
    for k in (n_rows, n_rows // 3, 5):
        seen = _watch_sorts(monkeypatch)
        indices, scores = exact_top_k(data, query, k, block)
        # each block's rows once, and merges of at most about 2k per row, each with about
        # k new candidates: a few times the rows in all, not about k for every block
        # (merging at every block sorted 4.5 and 2.8 times this bound for the two large k)
        assert sum(seen) <= 2 * len(query) * (n_rows + 2 * k)
        want = torch.sort(full, dim=1, descending=True, stable=True)
        assert torch.equal(indices, want.indices[:, :k])
        assert torch.equal(scores.nan_to_num(9.0), want.values[:, :k].nan_to_num(9.0))
        monkeypatch.undo()


def test_strategy_check_forms_no_per_example_weight_gradients_of_the_batch(tmp_path, monkeypatch):
    # A batch's per-example weight gradients of a linear layer take B * O * I entries
    # (gigabytes for a wide layer); the check against autograd needs a few rows of them.
    case = make_case("mlp", tmp_path, n_train=48, n_test=5)
    formed: list[int] = []
    dense = FactoredGrads.dense

    def watched(self):
        if self._dense is None:
            formed.append(self.size)
        return dense(self)

    monkeypatch.setattr(FactoredGrads, "dense", watched)
    tracin = TracInCP(
        case.model,
        TensorDataset(*case.train_inputs, case.train_labels),
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=48,
        sample_wise_grads_per_batch=True,
    )
    scores = tracin.influence(case.test_inputs, case.test_labels)
    assert formed and max(formed) == 1
    assert_close(scores, reference_scores(case))


def test_aggregate_keeps_no_test_batch_once_it_is_summed(tmp_path, monkeypatch):
    # (1, n_train) scores of a test loader: the test side is one summed gradient, not
    # every test example's representation until the last batch is in
    case = make_case("mlp", tmp_path, n_train=13, n_test=12)
    alive: list[int] = []
    kept: list[weakref.ref] = []
    compute = GradientEngine.compute

    def watched(self, batch):
        if batch.size == 2:  # a test batch (training batches hold 13 examples)
            alive.append(sum(ref() is not None for ref in kept))
        out = compute(self, batch)
        if batch.size == 2:
            kept.append(weakref.ref(out[0].a))
        return out

    monkeypatch.setattr(GradientEngine, "compute", watched)
    tracin = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=13,
        sample_wise_grads_per_batch=True,
    )
    test = DataLoader(TensorDataset(*case.test_inputs, case.test_labels), batch_size=2)
    scores = tracin.influence(test, aggregate=True)
    assert len(alive) == 6 * len(case.checkpoints) and max(alive) <= 1
    assert_close(scores, reference_scores(case).sum(0, keepdim=True))


def test_self_influence_keeps_no_batch_of_values_once_it_is_written(tmp_path, monkeypatch):
    # (n,) values of a training set of known length go into one vector as they come:
    # per-batch parts kept until the end fragment the heap (~50 bytes an example)
    case = make_case("mlp", tmp_path, n_train=13)
    alive: list[int] = []
    kept: list[weakref.ref] = []
    sq_norm = GradientEngine.sq_norm

    def watched(grads):
        alive.append(sum(ref() is not None for ref in kept))
        out = sq_norm(grads)
        kept.append(weakref.ref(out))
        return out

    monkeypatch.setattr(GradientEngine, "sq_norm", staticmethod(watched))
    tracin = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("sum"),
        batch_size=3,
        sample_wise_grads_per_batch=True,
    )
    values = tracin.self_influence()
    assert len(alive) == 5 * len(case.checkpoints) and max(alive) <= 1
    assert_close(values, reference_self(case))
