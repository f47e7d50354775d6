"""Approximate maximum-inner-product search with Annoy (the ``[annoy]`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from proponents.checks import check_int
from proponents.errors import InvalidArgumentError
from proponents.neighbors.base import IndexedNearestNeighbors, import_extra

__all__ = ["AnnoyNearestNeighbors"]


#: Rows added to the index between two reports to a progress bar.
_REPORT_EVERY = 4096


def _annoy() -> Any:
    return import_extra("annoy", "annoy", "AnnoyNearestNeighbors")


def _forest_problem(path: Path, dim: int, items: int) -> str | None:
    """Why Annoy could not search the file ``path`` safely, or ``None`` when it can.

    Annoy maps the file and follows the node numbers in it unchecked, so a crafted or
    damaged file that passes its checksum would crash the process at the first query,
    or make it search without end. Checked here as Annoy reads a ``"dot"`` index of
    ``dim`` dimensions: whole nodes (a count of descendants, two children, a factor and
    the vector, 4 bytes each); the last node's count is the number of items; from the
    trailing run of roots, every node reached has at least one descendant, a leaf lists
    items that exist, and a split node's two children come before it in the file, each
    node (other than an item) reached once, as in the trees Annoy builds.
    """
    width = 4 + dim
    size = path.stat().st_size
    if size == 0 or size % (4 * width):
        return f"its {size} bytes are not whole Annoy nodes of {4 * width} bytes"
    nodes = np.memmap(path, dtype="<i4", mode="r").reshape(-1, width)
    count = np.asarray(nodes[:, 0])
    n, m = len(nodes), int(count[-1])
    if m != items:
        return f"it holds {m} items, the data has {items}"
    run = int(np.argmax(count[::-1] != m)) if (count != m).any() else n
    roots = np.arange(n - 1, n - 1 - run, -1)
    if roots.size > 1 and nodes[roots[0], 1] == nodes[roots[-1], 1]:
        roots = roots[:-1]  # the last root before Annoy's copies of them all
    most = width - 1  # the most items a leaf lists (Annoy's K)
    seen = np.zeros(n, dtype=bool)
    seen[roots] = True
    frontier = roots
    while frontier.size:
        c = count[frontier]
        if (c < 1).any():
            return "a node has no descendants"
        leaves = frontier[c <= most]
        listed = np.asarray(nodes[leaves, 1:])[np.arange(most) < c[c <= most, None]]
        if ((listed < 0) | (listed >= m)).any():
            return "a leaf lists an item that does not exist"
        splits = frontier[c > most]
        children = np.asarray(nodes[splits, 1:3])
        if ((children < 0) | (children >= splits[:, None])).any():
            return "a split node has a child that is not before it"
        frontier = children.ravel()
        frontier = frontier[(count[frontier] != 1) | (frontier >= m)]  # items are leaves
        if seen[frontier].any() or np.unique(frontier).size != frontier.size:
            return "a node is reached twice"
        seen[frontier] = True
    return None


class _DefaultTrees(int):
    """The default of ``num_trees`` (it is 10), told apart from a 10 the caller passed."""


_DEFAULT_TREES = _DefaultTrees(10)


class AnnoyNearestNeighbors(IndexedNearestNeighbors):
    """Approximate search with a forest of Annoy trees under the ``"dot"`` metric.

    Annoy picks the candidate neighbours (approximately: more trees and a larger
    ``search_k`` find more of the true top-``k``). The returned scores are then
    recomputed exactly from the stored data, in the promoted dtype of data and query
    (at least float32), so every score is the true inner product ``<data[i], query>``
    with its true sign, and each row is sorted by it (ties by smaller index). A row for
    which Annoy finds fewer than ``k`` distinct items is answered by exact search
    instead.

    Scores are inner products with the query as given; to find the smallest inner
    products (opponents), query with ``-q`` and negate the scores.

    Annoy stores float32 vectors in memory (``N * (D + a few) * 4`` bytes plus the trees);
    the data tensor given to :meth:`setup` is also kept, by reference, for rescoring.
    Building adds the rows one by one (Annoy's API), so it is slower than exact search
    to set up; it pays off for large ``N`` and many queries.

    Rows with a NaN or infinite entry (which would spoil the trees), or with a float64
    entry beyond float32's range (infinite once cast to the float32 Annoy stores), are
    left out of the index and searched exactly at every query instead, so they are
    ranked as exact search ranks them. A query row whose float32 products may overflow
    (its float32 ranking means nothing) is answered by exact search.

    Args:
        num_trees: number of trees to build, ``>= 1``; more trees, better recall, larger
            index.
        search_k: number of tree nodes to inspect per query, or ``-1`` for Annoy's
            default (``k * num_trees``). A value of at least ``N * num_trees`` inspects
            every item, which makes the search exact, for float64 data or queries too:
            Annoy ranks in float32, so a query row whose ``k``-th float64 score does
            not clear the best float32 score left out by a worst-case bound of
            float32's rounding error is answered by exact search.
        seed: seed of Annoy's tree-building randomness, so that the index is
            reproducible.
        n_trees: (keyword-only) another name for ``num_trees``: the spec's text calls
            the default backend ``AnnoyNearestNeighbors(n_trees=10)``. Give one name or
            the other; both is an error.

    Raises:
        MissingExtraError: when the ``annoy`` package is not installed
            (``pip install 'proponents[annoy]'``).
    """

    backend_name: ClassVar[str] = "annoy"
    _index_filename: ClassVar[str] = "neighbors.annoy"
    _finite_only: ClassVar[bool] = True

    def __init__(
        self,
        num_trees: int = _DEFAULT_TREES,
        search_k: int = -1,
        *,
        seed: int = 0,
        n_trees: int | None = None,
    ) -> None:
        super().__init__()
        _annoy()  # fail now, not after the training set has been embedded
        if n_trees is not None:
            if num_trees is not _DEFAULT_TREES:
                raise InvalidArgumentError(
                    f"num_trees={num_trees!r} and n_trees={n_trees!r} were both given; they "
                    "are two names for the number of trees: give one of them"
                )
            num_trees = check_int(n_trees, "n_trees")
            if num_trees < 1:
                raise InvalidArgumentError(f"n_trees must be >= 1; got {num_trees}")
        num_trees = check_int(num_trees, "num_trees")
        if num_trees < 1:
            raise InvalidArgumentError(f"num_trees must be >= 1; got {num_trees}")
        search_k = check_int(search_k, "search_k")
        if search_k == 0 or search_k < -1:
            raise InvalidArgumentError(
                f"search_k must be -1 (Annoy's default, k * num_trees) or >= 1; got {search_k}"
            )
        seed = check_int(seed, "seed")
        if not 0 <= seed < 2**32:
            raise InvalidArgumentError(f"seed must be in 0..2**32-1; got {seed}")
        self.num_trees = num_trees
        self.search_k = search_k
        self.seed = seed
        self._index: Any = None

    def config(self) -> dict[str, Any]:
        """``{"backend": "annoy", "num_trees": ..., "search_k": ..., "seed": ...}``."""
        return {
            "backend": self.backend_name,
            "num_trees": self.num_trees,
            "search_k": self.search_k,
            "seed": self.seed,
        }

    def _build_config(self) -> dict[str, Any]:
        settings = self.config()
        del settings["search_k"]  # a query-time setting: a saved index serves any value
        return settings

    def _build(self, data: Tensor) -> None:
        annoy = _annoy()
        index = annoy.AnnoyIndex(int(data.shape[1]), "dot")
        index.set_seed(self.seed)
        rows = data.detach().to("cpu", torch.float32).numpy()
        for i, row in enumerate(rows):
            index.add_item(i, row)
            if (i + 1) % _REPORT_EVERY == 0:
                self._rows_indexed(_REPORT_EVERY)
        self._rows_indexed(len(rows) % _REPORT_EVERY)
        index.build(self.num_trees)
        self._index = index

    def _split_finite(self, data: Tensor) -> Tensor | None:
        # Annoy holds float32: a row is left out when it is not finite in float32.
        return self._split_float32_rows(data)

    def _exhaustive(self) -> bool:
        """Whether ``search_k`` makes every query visit every item of every tree.

        Each tree holds every item once, and Annoy keeps collecting leaves until it has
        ``search_k`` entries or none are left, so ``search_k >= N * trees`` collects all
        and returns the best by float32 inner product. (With ``search_k=-1`` Annoy uses
        ``m * trees`` for ``m`` candidates, which covers every item only when all are
        asked for anyway.)
        """
        if self.search_k == -1:
            return False
        return self.search_k >= int(self._index.get_n_items()) * int(self._index.get_n_trees())

    def _query(self, query: Tensor, k: int, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        exhaustive = self._exhaustive()
        # The float32 scores are only needed to check an exhaustive float64 search.
        wide = exhaustive and self._scores_above_float32(query)
        n, m = query.shape[0], self._candidates(k, wide=wide)
        candidates = torch.full((n, m), -1, dtype=torch.long)
        found_scores = torch.full((n, m), float("nan"), dtype=torch.float64) if wide else None
        rows = query.detach().to("cpu", torch.float32).numpy()
        for i, row in enumerate(rows):
            if found_scores is None:
                found = self._index.get_nns_by_vector(row, m, search_k=self.search_k)
            else:
                found, dots = self._index.get_nns_by_vector(
                    row, m, search_k=self.search_k, include_distances=True
                )
                found_scores[i, : len(dots)] = torch.as_tensor(dots[:m], dtype=torch.float64)
            candidates[i, : len(found)] = torch.as_tensor(found[:m], dtype=torch.long)
        return self._rescore(
            query, candidates, k, index_scores=found_scores, exhaustive=exhaustive, skip=skip
        )

    def _write_index(self, path: Path) -> None:
        if not self._index.save(str(path)):
            raise OSError(f"Annoy could not write {path}")

    def _read_index(self, path: Path, data: Tensor) -> None:
        problem = _forest_problem(path, int(data.shape[1]), int(data.shape[0]))
        if problem is not None:
            raise ValueError(f"it is not a forest Annoy can search: {problem}")
        annoy = _annoy()
        index = annoy.AnnoyIndex(int(data.shape[1]), "dot")
        index.load(str(path))
        if index.get_n_items() != data.shape[0]:
            raise ValueError(
                f"the file holds {index.get_n_items()} items, the data has {data.shape[0]}"
            )
        self._index = index
