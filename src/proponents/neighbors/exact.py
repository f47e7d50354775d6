"""Exact maximum-inner-product search by blocked matrix products."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from proponents.checks import check_int
from proponents.errors import InvalidArgumentError
from proponents.neighbors.base import IndexedNearestNeighbors, sort_rows
from proponents.store import release_rows

__all__ = ["ExactNearestNeighbors", "exact_top_k"]

#: Upper bound on the number of entries of one (query rows x data rows) score block.
_MAX_BLOCK_ENTRIES = 1 << 24


def _block_top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` of each row of ``scores``, ordered by (score descending, column ascending).

    :func:`torch.topk` is fast but leaves open which of several equal scores it keeps at
    the cut-off; rows where that matters (a tie at the ``k``-th value, or a NaN there)
    are redone with a stable sort so that the smallest columns win.

    Args:
        scores: ``(m, b)`` scores, ``b >= k``.
        k: entries to keep per row.

    Returns:
        ``(values, columns)``, both ``(m, k)``.
    """
    values, columns = scores.topk(k, dim=1)
    kth = values[:, -1:]
    ambiguous = (scores == kth).sum(dim=1) != (values == kth).sum(dim=1)
    ambiguous |= torch.isnan(kth[:, 0])
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        ordered = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        values[rows] = ordered.values[:, :k]
        columns[rows] = ordered.indices[:, :k]
    return sort_rows(values, columns)


def exact_top_k(
    data: Tensor, query: Tensor, k: int, block_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of each query row with the rows of ``data``.

    The data is scanned in blocks of ``block_size`` rows (and the queries in chunks), so
    no more than about ``2**24`` scores are held at once beside the running top-``k``.
    Ties are broken deterministically: among equal scores the smaller row index comes
    first. NaN scores count as the largest (as in :func:`torch.sort`).

    Args:
        data: ``(N, D)`` stored vectors; the work happens on its device.
        query: ``(n, D)`` queries (any device; moved to ``data``'s device).
        k: neighbours per query, ``1 <= k <= N`` (not checked here).
        block_size: data rows per block.

    Returns:
        ``(indices, scores)``, both ``(n, k)`` on ``data``'s device, scores in the
        promoted dtype of ``data`` and ``query``, each row in descending order.
    """
    n_items = data.shape[0]
    dtype = torch.promote_types(query.dtype, data.dtype)
    q_all = query.to(device=data.device, dtype=dtype)
    query_chunk = max(1, _MAX_BLOCK_ENTRIES // block_size)
    out_idx: list[Tensor] = []
    out_scores: list[Tensor] = []
    with torch.no_grad():
        for q in q_all.split(query_chunk):
            best_scores: Tensor | None = None
            best_idx: Tensor | None = None
            for start in range(0, n_items, block_size):
                block = data[start : start + block_size].to(dtype)
                scores = q @ block.T
                values, columns = _block_top_k(scores, min(k, block.shape[0]))
                columns = columns + start
                # A memory-mapped matrix: let its pages go once the block has been read.
                release_rows(data, start, start + block_size)
                if best_scores is None or best_idx is None:
                    best_scores, best_idx = values, columns
                    continue
                # Every running index is smaller than every index of this block, and both
                # parts are already ordered, so a stable sort of [running, block] keeps
                # the smaller index first among equal scores.
                merged_scores = torch.cat([best_scores, values], dim=1)
                merged_idx = torch.cat([best_idx, columns], dim=1)
                order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices
                order = order[:, :k]
                best_scores = merged_scores.gather(1, order)
                best_idx = merged_idx.gather(1, order)
            assert best_scores is not None and best_idx is not None  # n_items >= 1
            out_idx.append(best_idx)
            out_scores.append(best_scores)
    return torch.cat(out_idx), torch.cat(out_scores)


class ExactNearestNeighbors(IndexedNearestNeighbors):
    """Exact search: a blocked matrix product with a running top-``k``.

    Every answer is exact (up to floating-point summation order). The data stays on its
    own device (put it on a GPU to search there); results come back on the query's
    device. Memory beyond the data is bounded by ``block_size``: at most about ``2**24``
    scores are held at once. Equal scores are ordered by row index, smaller first, so
    results are deterministic.

    Scores are inner products with the query as given; to find the smallest inner
    products (opponents), query with ``-q`` and negate the scores.

    Nothing is built beyond keeping a reference to the data, so :meth:`save` writes
    nothing and :meth:`load` simply calls :meth:`setup`.

    Args:
        block_size: number of data rows multiplied at a time; any positive int (it need
            not divide ``N``).

    Example:
        >>> nn = ExactNearestNeighbors()
        >>> nn.setup(torch.eye(3))
        >>> nn.get_nearest_neighbors(torch.tensor([[0.0, 2.0, 1.0]]), k=2)[0]
        tensor([[1, 2]])
    """

    backend_name: ClassVar[str] = "exact"

    def __init__(self, block_size: int = 4096) -> None:
        super().__init__()
        block_size = check_int(block_size, "block_size")
        if block_size < 1:
            raise InvalidArgumentError(f"block_size must be >= 1; got {block_size}")
        self.block_size = block_size

    def config(self) -> dict[str, Any]:
        """``{"backend": "exact", "block_size": ...}``."""
        return {"backend": self.backend_name, "block_size": self.block_size}

    def _build(self, data: Tensor) -> None:
        pass  # the data itself is the index

    def _query(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        data = self._require_data()
        indices, scores = exact_top_k(data, query, k, self.block_size)
        return indices.to(query.device), scores.to(query.device)
