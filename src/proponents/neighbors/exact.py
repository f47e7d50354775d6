"""Exact maximum-inner-product search by blocked matrix products."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

from proponents.checks import check_int
from proponents.errors import InvalidArgumentError
from proponents.neighbors.base import (
    IndexedNearestNeighbors,
    check_matrix,
    score_dtype,
    sort_rows,
)
from proponents.store import release_rows

__all__ = ["ExactNearestNeighbors", "block_scores", "exact_top_k"]

#: Upper bound on the number of entries of one (query rows x data rows) score block.
_MAX_BLOCK_ENTRIES = 1 << 24
#: Data rows per block are a multiple of this (see :func:`_block_rows`).
_ROW_MULTIPLE = 64
#: Default number of data rows per block.
DEFAULT_BLOCK_SIZE = 4096


def _block_rows(block_size: int, n_items: int) -> int:
    """The number of data rows every block is multiplied with.

    ``block_size`` rounded up to a multiple of 64, and no more than ``n_items`` rounded up
    the same way. Every block, the last one included (it is padded with zero rows), then
    has this one shape. That is what makes the scores of identical rows identical bit for
    bit: a matrix product rounds differently for a different number of columns, and, in
    some BLAS kernels, for columns past the last multiple of the kernel's vector width
    (measured with MKL on AVX-512: odd widths and widths that are not a multiple of 8
    differ, multiples of 8 never did, for float32 and float64).
    """
    rows = max(1, min(block_size, n_items))
    return -(-rows // _ROW_MULTIPLE) * _ROW_MULTIPLE


def _query_rows(block_rows: int) -> int:
    """Query rows per chunk: about ``2**24`` scores per block, and at least two rows."""
    return max(2, _MAX_BLOCK_ENTRIES // block_rows)


def _score_blocks(
    query: Tensor, data: Tensor, block_size: int
) -> Iterator[tuple[int, int, int, Tensor]]:
    """``query @ data.T`` one (query chunk x data block) piece at a time.

    The one place where exact scores are computed, shared by :func:`exact_top_k` and
    :func:`block_scores` so that both produce the same bits. The work happens on
    ``data``'s device, in :func:`score_dtype` of the two inputs. Every product has the
    same shape: data blocks of :func:`_block_rows` rows (the last one padded with zero
    rows) and query chunks of at least two rows (a single row is padded with a zero row:
    a one-row product takes a matrix-vector path whose rounding depends on how the
    columns are split between threads).

    Yields:
        ``(q_start, q_stop, start, scores)``: the scores of query rows
        ``q_start:q_stop`` with data rows ``start:start + scores.shape[1]``.
    """
    n_items, dim = int(data.shape[0]), int(data.shape[1])
    dtype = score_dtype(query.dtype, data.dtype)
    rows = _block_rows(block_size, n_items)
    q_all = query.to(device=data.device, dtype=dtype)
    chunk = _query_rows(rows)
    padded: Tensor | None = None
    for q_start in range(0, int(q_all.shape[0]), chunk):
        q = q_all[q_start : q_start + chunk]
        q_stop = q_start + int(q.shape[0])
        if q.shape[0] == 1:
            q = torch.cat([q, q.new_zeros(1, dim)])
        for start in range(0, n_items, rows):
            stop = min(n_items, start + rows)
            block = data[start:stop].to(dtype)
            if stop - start < rows:
                if padded is None:
                    padded = torch.zeros(rows, dim, dtype=dtype, device=data.device)
                padded[: stop - start] = block
                block = padded
            scores = (q @ block.T)[: q_stop - q_start, : stop - start]
            # A memory-mapped matrix: let its pages go once the block has been read.
            release_rows(data, start, stop)
            yield q_start, q_stop, start, scores


def block_scores(
    query: Tensor, data: Tensor, block_size: int = DEFAULT_BLOCK_SIZE, *, device: Any = None
) -> Tensor:
    """The full score matrix ``query @ data.T``, computed as :func:`exact_top_k` does.

    Every score is bit-identical to the one :func:`exact_top_k` (hence
    :class:`ExactNearestNeighbors` with the same ``block_size``) computes for the same
    query and row, and identical rows of ``data`` get identical scores wherever they sit,
    so sorting this matrix (stably) gives the exact search's answer. Only one block of
    ``data`` is converted at a time.

    Args:
        query: ``(n, D)`` queries (any device; moved to ``data``'s device).
        data: ``(N, D)`` stored vectors (e.g. a memory-mapped matrix); the products are
            computed on its device.
        block_size: data rows per block (rounded up to a multiple of 64).
        device: where the result is put; default ``query``'s device.

    Returns:
        ``(n, N)`` scores in :func:`score_dtype` of ``query`` and ``data``.
    """
    dtype = score_dtype(query.dtype, data.dtype)
    target = query.device if device is None else torch.device(device)
    out = torch.empty(int(query.shape[0]), int(data.shape[0]), dtype=dtype, device=target)
    with torch.no_grad():
        for q_start, q_stop, start, scores in _score_blocks(query, data, block_size):
            out[q_start:q_stop, start : start + scores.shape[1]] = scores
    return out


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
    if k >= scores.shape[1]:  # the whole block: one stable sort gives the order
        ordered = torch.sort(scores, dim=1, descending=True, stable=True)
        return ordered.values, ordered.indices
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
    data: Tensor,
    query: Tensor,
    k: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    skip: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of each query row with the rows of ``data``.

    The data is scanned in blocks of ``block_size`` rows (rounded up to a multiple of 64;
    the last block is padded with zero rows) and the queries in chunks, so no more than
    about ``2**24`` scores are held at once beside the candidates for the top-``k`` (at
    most about ``2 * k`` per query row, merged whenever they exceed that). The scores are
    bit-identical to those of :func:`block_scores`, and identical rows get identical
    scores in any block. Ties are broken deterministically: among equal scores the
    smaller row index comes first. NaN scores count as the largest (as in
    :func:`torch.sort`).

    Args:
        data: ``(N, D)`` stored vectors; the work happens on its device.
        query: ``(n, D)`` queries (any device; moved to ``data``'s device).
        k: neighbours per query, ``1 <= k <= N`` (not checked here).
        block_size: data rows per block.
        skip: ``(N,)`` bool on ``data``'s device, rows to pass over: their scores count
            as ``-inf`` (and are reported so), so they come after every other row.

    Returns:
        ``(indices, scores)``, both ``(n, k)`` on ``data``'s device, scores in
        :func:`score_dtype` of ``data`` and ``query``, each row in descending order.
    """
    n_query = int(query.shape[0])
    dtype = score_dtype(query.dtype, data.dtype)
    out_idx = torch.empty(n_query, k, dtype=torch.long, device=data.device)
    out_scores = torch.empty(n_query, k, dtype=dtype, device=data.device)
    # Candidates of the current query chunk: the running top-k, then each block's top-k,
    # in row order. They are merged (and cut to k) once they hold more than 2k per row,
    # not at every block: with a k of many blocks, merging at each block would sort
    # about k entries per block, a time quadratic in the number of rows.
    pool_scores: list[Tensor] = []
    pool_idx: list[Tensor] = []
    width = 0
    with torch.no_grad():
        for q_start, q_stop, start, scores in _score_blocks(query, data, block_size):
            if skip is not None:
                passed = skip[start : start + scores.shape[1]]
                if bool(passed.any()):
                    scores.masked_fill_(passed, -math.inf)  # a temporary of this block
            values, columns = _block_top_k(scores, min(k, int(scores.shape[1])))
            pool_scores.append(values)
            pool_idx.append(columns + start)
            width += int(values.shape[1])
            last = start + scores.shape[1] == data.shape[0]  # the last block of this chunk
            if (last or width > 2 * k) and len(pool_scores) > 1:
                # Every index of a part is smaller than every index of the parts after it,
                # and each part is already ordered, so a stable sort of them joined keeps
                # the smaller index first among equal scores.
                merged_scores = torch.cat(pool_scores, dim=1)
                merged_idx = torch.cat(pool_idx, dim=1)
                pool_scores.clear()
                pool_idx.clear()
                order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices
                order = order[:, :k]
                pool_scores = [merged_scores.gather(1, order)]
                pool_idx = [merged_idx.gather(1, order)]
                width = int(order.shape[1])
            if last:
                out_idx[q_start:q_stop] = pool_idx[0]
                out_scores[q_start:q_stop] = pool_scores[0]
                pool_scores, pool_idx, width = [], [], 0
    return out_idx, out_scores


class ExactNearestNeighbors(IndexedNearestNeighbors):
    """Exact search: a blocked matrix product with a running top-``k``.

    Every answer is exact: the scores are those of the full product ``query @ data.T``
    computed block by block (:func:`block_scores` gives that matrix, bit for bit), and
    the ``k`` results of a row are the first ``k`` of that row sorted stably, largest
    first (equal scores by row index, smaller first; NaN first). Every block has the same
    shape (the last one is padded with zero rows), so identical data rows get identical
    scores wherever they sit. Scores are computed in the promoted dtype of data and
    query, at least float32. The data stays on its own device (put it on a GPU to search
    there); results come back on the query's device. Memory beyond the data is bounded
    by ``block_size``: at most about ``2**24`` scores are held at once.

    Scores are inner products with the query as given; to find the smallest inner
    products (opponents), query with ``-q`` and negate the scores.

    Nothing is built beyond keeping a reference to the data, so :meth:`save` writes
    nothing and :meth:`load` simply calls :meth:`setup`.

    Args:
        block_size: number of data rows multiplied at a time; any positive int (it need
            not divide ``N``); rounded up to a multiple of 64, and lowered to ``N``
            (rounded up the same way) for smaller data.

    Example:
        >>> nn = ExactNearestNeighbors()
        >>> nn.setup(torch.eye(3))
        >>> nn.get_nearest_neighbors(torch.tensor([[0.0, 2.0, 1.0]]), k=2)[0]
        tensor([[1, 2]])
    """

    backend_name: ClassVar[str] = "exact"

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__()
        block_size = check_int(block_size, "block_size")
        if block_size < 1:
            raise InvalidArgumentError(f"block_size must be >= 1; got {block_size}")
        self.block_size = block_size

    def config(self) -> dict[str, Any]:
        """``{"backend": "exact", "block_size": ...}``."""
        return {"backend": self.backend_name, "block_size": self.block_size}

    def all_scores(self, query: Tensor) -> Tensor:
        """The full ``(n, N)`` score matrix, bit-identical to what searches compute.

        Sorting a row of it stably (descending) gives :meth:`get_nearest_neighbors`'s
        answer for that row, indices and scores.

        Args:
            query: ``(n, D)`` floating-point tensor, on any device (or
                ``(n, *features)``, flattened to ``(n, D)``).

        Returns:
            ``(n, N)`` inner products on ``query``'s device.

        Raises:
            NearestNeighborsNotReadyError: when :meth:`setup` has not been called.
            ArgumentTypeError, InvalidArgumentError: for a query that is not an
                ``(n, D)`` (or ``(n, *features)``) floating-point tensor.
        """
        data = self._require_data()
        query = check_matrix(query, "query", dim=int(data.shape[1]))
        return block_scores(query, data, self.block_size)

    def _build(self, data: Tensor) -> None:
        pass  # the data itself is the index

    def _query(self, query: Tensor, k: int, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        data = self._require_data()
        indices, scores = exact_top_k(data, query, k, self.block_size, skip)
        return indices.to(query.device), scores.to(query.device)
