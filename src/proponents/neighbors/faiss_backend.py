"""Maximum-inner-product search with Faiss (the ``[faiss]`` extra)."""

from __future__ import annotations

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


class FaissNearestNeighbors(IndexedNearestNeighbors):
    """Search with a Faiss index built by ``faiss.index_factory`` under inner product.

    ``"Flat"`` (the default) is exact brute force; IVF factories such as
    ``"IVF64,Flat"`` or ``"IVF64,PQ8"`` are approximate and much faster for large ``N``.
    An index that needs training (``index.is_trained`` is False after creation) is
    trained on the data given to :meth:`setup`; IVF needs at least as many vectors as
    lists, and Faiss recommends about 40 per list. :meth:`check_fits` tells beforehand
    whether the settings can index data of a given size.

    Rows with a NaN or infinite entry (which would spoil Faiss's training) are left out
    of the index and searched exactly at every query instead, so they are ranked as
    exact search ranks them.

    Faiss computes in float32 and may, for compressed indices, rank approximately; the
    returned scores are recomputed exactly from the stored data (promoted dtype of data
    and query, at least float32), so each is the true inner product
    ``<data[i], query>`` with its true sign, and each row is sorted by it (ties by
    smaller index). A row for which Faiss finds fewer than ``k`` vectors (an IVF search
    whose probed lists are too small) is answered by exact search instead.

    Scores are inner products with the query as given; to find the smallest inner
    products (opponents), query with ``-q`` and negate the scores.

    Args:
        index_factory: a Faiss index-factory string, e.g. ``"Flat"``, ``"IVF256,Flat"``,
            ``"HNSW32,Flat"``; it is built with ``faiss.METRIC_INNER_PRODUCT``.
        nprobe: for IVF indices, how many inverted lists each query visits (more: better
            recall, slower); ``None`` keeps Faiss's default (1). Also settable later
            through the :attr:`nprobe` attribute.

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
        """Inverted lists visited per query (IVF indices); ``None`` for Faiss's default."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        if value is not None:
            value = check_int(value, "nprobe", or_none=True)
            if value < 1:
                raise InvalidArgumentError(f"nprobe must be >= 1; got {value}")
        self._nprobe = value
        if self._index is not None:
            self._apply_nprobe(self._index)

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

    def _apply_nprobe(self, index: Any) -> None:
        if self._nprobe is None:
            return
        faiss = _faiss()
        try:
            faiss.extract_index_ivf(index).nprobe = self._nprobe
        except RuntimeError:
            raise InvalidArgumentError(
                f"nprobe={self._nprobe} applies to IVF indices only, but index_factory "
                f"{self.index_factory!r} builds none; use nprobe=None"
            ) from None

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
        self._apply_nprobe(index)
        return index

    def check_fits(self, num_items: int, dim: int) -> None:
        """Raise now if this index cannot be built from ``(num_items, dim)`` data.

        Builds the empty index for ``dim`` (so an invalid factory string, or ``nprobe``
        for an index without inverted lists, is reported), and checks that training has
        enough vectors: an IVF index needs at least as many as it has lists, a product
        quantizer at least ``2**nbits`` (256 for ``PQ8``). Other requirements of exotic
        indices are only found by :meth:`setup`.

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
                        "infinite values)"
                    )
                raise InvalidArgumentError(
                    f"index_factory {self.index_factory!r} cannot be trained on N={n} "
                    f"finite vectors{left_out} (IVF needs at least as many vectors as "
                    f"lists, a product quantizer 2**nbits): {exc}"
                ) from None
        index.add(vectors)
        self._index = index

    def _query(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        _, found = self._index.search(_as_float32(query), self._candidates(k))
        return self._rescore(query, torch.from_numpy(found).long(), k)

    def _write_index(self, path: Path) -> None:
        _faiss().write_index(self._index, str(path))

    def _read_index(self, path: Path, data: Tensor) -> None:
        index = _faiss().read_index(str(path))
        if index.ntotal != data.shape[0] or index.d != data.shape[1]:
            raise ValueError(
                f"the file holds {index.ntotal} vectors of dimension {index.d}, the data "
                f"is {tuple(data.shape)}"
            )
        self._apply_nprobe(index)
        self._index = index
