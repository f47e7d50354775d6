"""Maximum-inner-product search with Faiss (the ``[faiss]`` extra)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from proponents.checks import check_int
from proponents.errors import ArgumentTypeError, InvalidArgumentError
from proponents.neighbors.base import IndexedNearestNeighbors, import_extra

__all__ = ["FaissNearestNeighbors"]


def _faiss() -> Any:
    return import_extra("faiss", "faiss", "FaissNearestNeighbors")


#: Held while the process-wide reading limits of Faiss are lowered for one file.
_LIMITS_LOCK = threading.Lock()


@contextlib.contextmanager
def _read_limits(faiss: Any, size: int) -> Iterator[None]:
    """Bound what ``faiss.read_index`` allocates by the size of the file it reads.

    Faiss sizes each vector it reads from a count in the file and fills it before
    reading it (up to 1 TB by default), so a few bytes claiming a billion floats take
    gigabytes. No vector of a sound file is larger than the file, nor does one hold more
    lists, splits or transforms than it has bytes; the limits are put back afterwards.
    """
    names = ("vector_byte", "loop")
    if not all(hasattr(faiss, f"set_deserialization_{n}_limit") for n in names):
        yield  # an older faiss: no limits to set
        return
    get_bytes = faiss.get_deserialization_vector_byte_limit
    set_bytes = faiss.set_deserialization_vector_byte_limit
    get_loops = faiss.get_deserialization_loop_limit
    set_loops = faiss.set_deserialization_loop_limit
    with _LIMITS_LOCK:
        was_bytes, was_loops = get_bytes(), get_loops()
        set_bytes(min(was_bytes, size + 1))
        set_loops(size + 1 if was_loops == 0 else min(was_loops, size + 1))
        try:
            yield
        finally:
            set_bytes(was_bytes)
            set_loops(was_loops)


def _as_float32(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def _training_rows_needed(index: Any) -> tuple[int, str]:
    """The fewest training vectors ``index`` can be trained on, and what needs them."""
    faiss = _faiss()
    needed, why = 0, "nothing"
    if index.is_trained:
        return needed, why
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needed, why = int(ivf.nlist), f"an IVF index with {int(ivf.nlist)} lists"
    # Product quantizers (PQ, IVF-PQ, HNSW over PQ, fast-scan PQ) train 2**nbits centroids.
    seen = index
    for _ in range(4):  # pre-transform -> IVF/HNSW -> storage: a few levels at most
        seen = faiss.downcast_index(seen)
        pq = getattr(seen, "pq", None)
        if pq is not None and int(pq.ksub) > needed:
            needed, why = int(pq.ksub), f"a product quantizer with {int(pq.ksub)} centroids"
        inner = getattr(seen, "index", None) or getattr(seen, "storage", None)
        if inner is None:
            break
        seen = inner
    return needed, why


def _id_map(index: Any) -> Any:
    """The index inside an ``IndexIDMap``/``IndexIDMap2`` (``"IDMap,Flat"``), else ``None``."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return index.index
    return None


def _check_inner_product(index: Any, factory: str) -> None:
    """Refuse an index that does not rank by inner product.

    ``faiss.index_factory`` ignores the metric it is given for some strings (in Faiss
    1.15, HNSW and NSG graphs over a product quantizer, e.g. ``"HNSW8,PQ2"``, come back
    as L2 indices); the nearest vectors by distance are not the largest inner products.
    The index and the indices it wraps (its storage, sub-index, refinement) are checked.

    Raises:
        InvalidArgumentError: naming the factory string and the metric it built.
    """
    faiss = _faiss()
    seen: list[Any] = [index]
    levels: list[Any] = []
    while seen and len(levels) < 8:
        level = faiss.downcast_index(seen.pop())
        levels.append(level)
        for name in ("index", "storage", "base_index", "refine_index"):
            inner = getattr(level, name, None)
            if isinstance(inner, faiss.Index):
                seen.append(inner)
    for level in levels:
        metric = int(level.metric_type)
        if metric != faiss.METRIC_INNER_PRODUCT:
            name = "L2 distance" if metric == faiss.METRIC_L2 else f"Faiss metric {metric}"
            raise InvalidArgumentError(
                f"index_factory {factory!r} builds a Faiss index that ranks by {name} "
                f"({type(level).__name__}), not by inner product: Faiss ignores "
                "METRIC_INNER_PRODUCT for it (e.g. HNSW or NSG over PQ), and the nearest "
                "vectors by distance are not the proponents. Use a factory that supports "
                "inner product, e.g. 'Flat' (exact), 'IVF256,Flat', 'IVF256,PQ8', "
                "'HNSW32' or 'HNSW32,SQ8'"
            )


class FaissNearestNeighbors(IndexedNearestNeighbors):
    """Search with a Faiss index built by ``faiss.index_factory`` under inner product.

    ``"Flat"`` (the default) is exact brute force; IVF factories such as
    ``"IVF64,Flat"`` or ``"IVF64,PQ8"`` are approximate and much faster for large ``N``.
    A factory string for which Faiss builds an index that does not rank by inner
    product (in Faiss 1.15 it silently builds ``"HNSW8,PQ2"`` or ``"NSG8,PQ2"`` for L2)
    is refused, by :meth:`check_fits` and :meth:`setup`.
    An index that needs training (``index.is_trained`` is False after creation) is
    trained on the data given to :meth:`setup`; IVF needs at least as many vectors as
    lists, and Faiss recommends about 40 per list. :meth:`check_fits` tells beforehand
    whether the settings can index data of a given size.

    Rows with a NaN or infinite entry (which would spoil Faiss's training), or with a
    float64 entry beyond float32's range (infinite once cast to the float32 Faiss
    stores), are left out of the index and searched exactly at every query instead, so
    they are ranked as exact search ranks them.

    Faiss computes in float32 and may, for compressed indices, rank approximately; the
    returned scores are recomputed exactly from the stored data (promoted dtype of data
    and query, at least float32), so each is the true inner product
    ``<data[i], query>`` with its true sign, and each row is sorted by it (ties by
    smaller index). A row for which Faiss finds fewer than ``k`` vectors (an IVF search
    whose probed lists are too small) is answered by exact search instead, and so is a
    row whose float32 products may overflow (its float32 ranking means nothing).

    An exhaustive index (``"Flat"``, or ``"IVF<n>,Flat"`` with ``nprobe >= n``) stays
    exact for float64 data or queries too, although Faiss picks the candidates in
    float32: a query row whose ``k``-th float64 score does not clear the best float32
    score Faiss left out by a worst-case bound of float32's rounding error (rows that
    differ only below float32 precision) is answered by exact search. Float32 data and
    queries skip that check.

    Scores are inner products with the query as given; to find the smallest inner
    products (opponents), query with ``-q`` and negate the scores.

    Args:
        index_factory: a Faiss index-factory string, e.g. ``"Flat"``, ``"IVF256,Flat"``,
            ``"HNSW32,Flat"``; it is built with ``faiss.METRIC_INNER_PRODUCT``.
        nprobe: for IVF indices, how many inverted lists each query visits (more: better
            recall, slower); ``None`` keeps Faiss's default (1). Also settable later
            through the :attr:`nprobe` attribute; on a built index without inverted
            lists, an assignment other than ``None`` raises and changes nothing.

    Raises:
        MissingExtraError: when the ``faiss`` package is not installed
            (``pip install 'proponents[faiss]'``).
    """

    backend_name: ClassVar[str] = "faiss"
    _index_filename: ClassVar[str] = "neighbors.faiss"
    _finite_only: ClassVar[bool] = True

    def __init__(self, index_factory: str = "Flat", *, nprobe: int | None = None) -> None:
        super().__init__()
        _faiss()  # fail now, not after the training set has been embedded
        if not isinstance(index_factory, str):
            raise ArgumentTypeError(
                f"index_factory must be a Faiss index-factory string such as 'Flat' or "
                f"'IVF64,Flat'; got {type(index_factory).__name__}"
            )
        if not index_factory.strip():
            raise InvalidArgumentError(
                "index_factory must be a non-empty Faiss index-factory string such as "
                "'Flat' or 'IVF64,Flat'; got ''"
            )
        self.index_factory = index_factory
        self._nprobe: int | None = None
        self._index: Any = None
        self.nprobe = nprobe

    @property
    def nprobe(self) -> int | None:
        """Inverted lists visited per query (IVF indices); ``None`` for Faiss's default.

        Assigning it after :meth:`setup` applies it to the built index at once; a value
        that index refuses (any ``nprobe`` for an index without inverted lists) raises
        :class:`InvalidArgumentError` and leaves the setting as it was.
        """
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        if value is not None:
            value = check_int(value, "nprobe", or_none=True)
            if value < 1:
                raise InvalidArgumentError(f"nprobe must be >= 1; got {value}")
        if self._index is not None:  # a value the built index refuses is not kept
            self._apply_nprobe(self._index, value)
        self._nprobe = value

    def config(self) -> dict[str, Any]:
        """``{"backend": "faiss", "index_factory": ..., "nprobe": ...}``."""
        return {
            "backend": self.backend_name,
            "index_factory": self.index_factory,
            "nprobe": self.nprobe,
        }

    def _build_config(self) -> dict[str, Any]:
        settings = self.config()
        del settings["nprobe"]  # a query-time setting: a saved index serves any value
        return settings

    def _apply_nprobe(self, index: Any, nprobe: int | None) -> None:
        """Set ``nprobe`` on ``index`` (``None``: Faiss's default, 1), or raise unchanged.

        Raises:
            InvalidArgumentError: for an ``nprobe`` and an index without inverted lists.
        """
        ivf = _faiss().try_extract_index_ivf(index)
        if ivf is None:
            if nprobe is None:
                return
            raise InvalidArgumentError(
                f"nprobe={nprobe} applies to IVF indices only, but index_factory "
                f"{self.index_factory!r} builds none; use nprobe=None"
            )
        # None resets it: an index read from a file may have been saved with another one.
        ivf.nprobe = 1 if nprobe is None else nprobe

    def _new_index(self, dim: int) -> Any:
        """An empty index of the factory string for ``dim``-dimensional vectors."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(int(dim), self.index_factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise InvalidArgumentError(
                f"index_factory {self.index_factory!r} is not a valid Faiss index for "
                f"D={dim} vectors: {exc}"
            ) from None
        _check_inner_product(index, self.index_factory)
        self._apply_nprobe(index, self._nprobe)
        return index

    def check_fits(self, num_items: int, dim: int) -> None:
        """Raise now if this index cannot be built from ``(num_items, dim)`` data.

        Builds the empty index for ``dim`` (so an invalid factory string, an index that
        Faiss builds for another metric than inner product, or ``nprobe`` for an index
        without inverted lists, is reported), and checks that training has
        enough vectors: an IVF index needs at least as many as it has lists, a product
        quantizer at least ``2**nbits`` (256 for ``PQ8``). Other requirements of exotic
        indices are only found by :meth:`setup`.

        Args:
            num_items: ``N``, the number of vectors that will be indexed.
            dim: ``D``, their dimension.

        Raises:
            InvalidArgumentError: when one of these conditions fails.
        """
        num_items = check_int(num_items, "num_items")
        dim = check_int(dim, "dim")
        index = self._new_index(dim)
        needed, why = _training_rows_needed(index)
        if num_items < needed:
            raise InvalidArgumentError(
                f"index_factory {self.index_factory!r} cannot be trained on N={num_items} "
                f"vectors: {why} needs at least {needed}; use fewer lists or centroids "
                f"(e.g. 'IVF{max(1, num_items // 40)},Flat', about 40 vectors per list) or "
                "'Flat'"
            )

    def _build(self, data: Tensor) -> None:
        n, d = data.shape
        index = self._new_index(int(d))
        vectors = _as_float32(data)
        if not index.is_trained:
            try:
                index.train(vectors)
            except RuntimeError as exc:
                left_out = ""
                if self._nonfinite is not None:
                    bad = int(self._nonfinite.numel())
                    left_out = (
                        f" ({bad} of the {n + bad} rows were left out: they hold NaN or "
                        "infinite values, or values beyond float32's range)"
                    )
                raise InvalidArgumentError(
                    f"index_factory {self.index_factory!r} cannot be trained on N={n} "
                    f"finite vectors{left_out} (IVF needs at least as many vectors as "
                    f"lists, a product quantizer 2**nbits): {exc}"
                ) from None
        if _id_map(index) is not None:  # "IDMap,..." takes ids: the row positions
            index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
        else:
            index.add(vectors)
        self._rows_indexed(int(n))
        self._index = index

    def _split_finite(self, data: Tensor) -> Tensor | None:
        # Faiss holds float32: a row is left out when it is not finite in float32.
        return self._split_float32_rows(data)

    def _exhaustive(self) -> bool:
        """Whether a search compares every indexed vector in float32 and keeps the best:
        a flat index, or an IVF-flat index (with a flat quantizer) probing all its lists."""
        faiss = _faiss()
        index = faiss.downcast_index(self._index)
        wrapped = _id_map(index)
        if wrapped is not None:  # the ids are the positions: search is the inner index's
            index = faiss.downcast_index(wrapped)
        if isinstance(index, faiss.IndexFlat):
            return True
        return (
            type(index) is faiss.IndexIVFFlat
            and isinstance(faiss.downcast_index(index.quantizer), faiss.IndexFlat)
            and int(index.nprobe) >= int(index.nlist)
        )

    def _query(self, query: Tensor, k: int, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        exhaustive = self._exhaustive()
        m = self._candidates(k, wide=exhaustive and self._scores_above_float32(query))
        scores, found = self._index.search(_as_float32(query), m)
        return self._rescore(
            query,
            torch.from_numpy(found).long(),
            k,
            index_scores=torch.from_numpy(scores),
            exhaustive=exhaustive,
            skip=skip,
        )

    def _write_index(self, path: Path) -> None:
        _faiss().write_index(self._index, str(path))

    def _read_index(self, path: Path, data: Tensor) -> None:
        faiss = _faiss()
        with _read_limits(faiss, os.path.getsize(path)):
            index = faiss.read_index(str(path))
        if index.ntotal != data.shape[0] or index.d != data.shape[1]:
            raise ValueError(
                f"the file holds {index.ntotal} vectors of dimension {index.d}, the data "
                f"is {tuple(data.shape)}"
            )
        _check_inner_product(index, self.index_factory)
        self._apply_nprobe(index, self._nprobe)
        self._index = index
