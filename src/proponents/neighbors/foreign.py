"""Search backends that are not proponents classes (e.g. written for Captum).

Code written for Captum passes TracInCPFastRandProj a subclass of Captum's own
``NearestNeighbors``: an object with ``setup(data)`` and ``get_nearest_neighbors(query,
k)`` that returns ``(indices, distances)``, both ``(n, k)``, the stored rows with the
largest inner products first. :func:`as_nearest_neighbors` accepts any such object and
wraps it in :class:`ForeignNearestNeighbors`, which gives it the rest of the
:class:`~proponents.neighbors.NearestNeighbors` interface.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from proponents.errors import ArgumentTypeError
from proponents.neighbors.base import (
    NearestNeighbors,
    NearestNeighborsNotReadyError,
    check_k,
    check_matrix,
    check_neighbors,
    rescored,
    score_dtype,
)

__all__ = ["ForeignNearestNeighbors", "NearestNeighborsLike", "as_nearest_neighbors"]

#: The two methods an object needs to serve as a search backend.
_METHODS = ("setup", "get_nearest_neighbors")


class NearestNeighborsLike(Protocol):
    """What TracInCPFastRandProj needs of a search backend: the two methods.

    Every :class:`~proponents.neighbors.NearestNeighbors` has them, and so has a backend
    written for Captum's interface.
    """

    def setup(self, data: Tensor) -> None: ...

    def get_nearest_neighbors(self, query: Tensor, k: int) -> Any: ...


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class ForeignNearestNeighbors(NearestNeighbors):
    """A duck-typed backend, run behind the :class:`NearestNeighbors` interface.

    The wrapped object (:attr:`backend`) indexes the data and picks the ``k`` neighbours
    of each query row. Its answer is checked as any backend's is (a pair of ``(n, k)``
    tensors or numpy arrays, integer row numbers, no row twice; an error names the
    wrapped class), and the scores are then recomputed from the stored data: each is
    the exact inner product ``<data[i], query>`` in the promoted dtype of data and query
    (at least float32), on the query's device, and each row is sorted by it, largest
    first, ties by smaller index. So the backend's own "distances" may be approximate,
    of any floating or integer type, in any order, or on any device; only its choice of
    rows is used.

    What the wrapped object cannot provide is filled in: :meth:`config` names its class
    (``{"backend": "module.Class"}``); :meth:`save` writes nothing and :meth:`load`
    calls ``setup(data)`` again; :meth:`check_fits` checks nothing. So a
    TracInCPFastRandProj saved with such a backend is restored by passing a new instance
    again, ``TracInCPFastRandProj.load(..., nearest_neighbors=MyBackend())``; it cannot
    be re-created from its name.

    Attributes that the wrapper does not have are looked up on the wrapped object, so
    ``tracin.nearest_neighbors.some_attribute`` still reaches it.

    Args:
        backend: an instance with callable ``setup(data)`` and
            ``get_nearest_neighbors(query, k)``.

    Raises:
        ArgumentTypeError: when ``backend`` is a class, or lacks one of the methods.
    """

    def __init__(self, backend: NearestNeighborsLike) -> None:
        _check_duck(backend, "backend")
        #: The wrapped object.
        self.backend = backend
        self._data: Tensor | None = None
        # whether the backend takes queries only in the dtype of its data (see _ask)
        self._query_in_data_dtype = False

    def __getattr__(self, name: str) -> Any:
        # only called for attributes the wrapper lacks; never for dunders or before
        # __init__ has set the backend (copy and pickle probe a bare instance)
        backend = self.__dict__.get("backend")
        if backend is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(backend, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.backend!r})"

    @property
    def num_items(self) -> int:
        """``N``, the number of vectors given to :meth:`setup` (0 before it)."""
        return 0 if self._data is None else int(self._data.shape[0])

    def config(self) -> dict[str, Any]:
        """``{"backend": "<module>.<class of the wrapped object>"}``."""
        return {"backend": _class_name(self.backend)}

    def setup(self, data: Tensor) -> None:
        """Check ``data``, hand it to the wrapped backend's ``setup`` and keep a reference.

        Args:
            data: ``(N, D)`` floating-point tensor (or ``(N, *features)``, flattened);
                the wrapped backend gets it as ``(N, D)``. It is kept by reference to
                compute exact scores, so do not modify it in place afterwards.

        Raises:
            ArgumentTypeError, InvalidArgumentError: for data that is not a non-empty
                floating-point tensor of at least two dimensions.
        """
        data = check_matrix(data, "data")
        self._data = None
        self._query_in_data_dtype = False
        self.backend.setup(data)
        self._data = data

    def _ask(self, query: Tensor, dtype: torch.dtype, k: int) -> Any:
        """The wrapped backend's answer for ``query``.

        Where the data it was set up with has another dtype (a float16 index searched
        with float32 test embeddings), the query's rows are scaled first
        (:func:`_scaled_rows`), so that a backend that casts the query to its data's
        dtype gets one that fits; it goes in its own dtype, and if the backend fails on
        that, in the data's, from then on. A backend that keeps its own float32 copy
        takes the first form, one that multiplies the data it was given by the query the
        second.
        """
        if query.dtype == dtype or not dtype.is_floating_point:
            return self.backend.get_nearest_neighbors(query, k)
        scaled = _scaled_rows(query)
        if not self._query_in_data_dtype:
            try:
                return self.backend.get_nearest_neighbors(scaled, k)
            except (RuntimeError, TypeError) as first:
                try:
                    answer = self.backend.get_nearest_neighbors(scaled.to(dtype), k)
                except Exception:
                    raise first from None
                self._query_in_data_dtype = True
                return answer
        return self.backend.get_nearest_neighbors(scaled.to(dtype), k)

    def get_nearest_neighbors(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The wrapped backend's ``k`` neighbours of each query row, scored exactly.

        Args:
            query: ``(n, D)`` floating-point tensor (or ``(n, *features)`` with ``D``
                features); the wrapped backend gets it as ``(n, D)``.
            k: neighbours per query row, ``1 <= k <= N``.

        Returns:
            ``(indices, scores)``, both ``(n, k)`` on ``query``'s device: ``torch.long``
            row numbers and their exact inner products with the query, largest first.

        Raises:
            NearestNeighborsNotReadyError: before :meth:`setup`.
            ArgumentTypeError, InvalidArgumentError: for a bad ``query`` or ``k``, or an
                answer of the wrapped backend that breaks the contract (the message
                names its class).
        """
        if self._data is None:
            raise NearestNeighborsNotReadyError(
                f"{type(self).__name__} ({_class_name(self.backend)}) has no data yet: call "
                "setup(data) with an (N, D) tensor before get_nearest_neighbors()"
            )
        data = self._data
        query = check_matrix(query, "query", dim=int(data.shape[1]))
        n_items = int(data.shape[0])
        k = check_k(k, n_items)
        dtype = score_dtype(query.dtype, data.dtype)
        if query.shape[0] == 0:  # nothing to ask the backend
            return (
                torch.empty(0, k, dtype=torch.long, device=query.device),
                torch.empty(0, k, dtype=dtype, device=query.device),
            )
        answer = self._ask(query, data.dtype, k)
        answer = _float_scores(answer)
        indices, _ = check_neighbors(self.backend, query, k, n_items, answer)
        return rescored(data, query, indices)


def _scaled_rows(query: Tensor) -> Tensor:
    """``query`` with each finite, non-zero row scaled by the power of two that brings its
    largest entry into ``[0.5, 1)``, for a backend whose data has a narrower dtype
    (float16): cast to it, by us or by the backend, a row neither overflows nor flushes
    to zero. A positive factor leaves the order of a row's inner products as it was, and
    only the rows the backend picks are used (their scores are recomputed with the query
    as given)."""
    peak = query.detach().abs().amax(dim=1)
    fits = torch.isfinite(peak) & (peak > 0)
    if bool(fits.any()):
        query = query.clone()
        scale = torch.exp2(-torch.floor(torch.log2(peak[fits])) - 1)
        query[fits] = query[fits] * scale.to(query.dtype).unsqueeze(1)
    return query


def _float_scores(answer: Any) -> Any:
    """``answer`` with integer scores made floating point (they are recomputed anyway)."""
    if not isinstance(answer, (tuple, list)) or len(answer) != 2:
        return answer
    scores = answer[1]
    if isinstance(scores, Tensor) and not (scores.is_floating_point() or scores.is_complex()):
        return answer[0], scores.to(torch.float64)
    dtype = getattr(scores, "dtype", None)
    kind = getattr(dtype, "kind", None)  # a numpy array's dtype
    if kind in ("i", "u", "b"):
        return answer[0], scores.astype("float64")
    return answer


def _check_duck(value: Any, name: str) -> None:
    """Raise unless ``value`` is an instance with the two backend methods."""
    if isinstance(value, type):
        raise ArgumentTypeError(
            f"{name} must be an instance, but got a class ({value.__name__}); create one, "
            f"e.g. {name}={value.__name__}()"
        )
    missing = [m for m in _METHODS if not callable(getattr(value, m, None))]
    if missing:
        raise ArgumentTypeError(
            f"{name} must be a NearestNeighbors instance (e.g. ExactNearestNeighbors()) or "
            "an object with setup(data) and get_nearest_neighbors(query, k) methods (such "
            f"as a backend written for Captum); got {type(value).__name__}, which has no "
            f"callable {' or '.join(missing)}"
        )


def as_nearest_neighbors(value: Any, owner: str) -> NearestNeighbors:
    """``value`` as a :class:`NearestNeighbors`: itself, or a duck-typed backend wrapped.

    Args:
        value: a :class:`NearestNeighbors`, or any instance with callable
            ``setup(data)`` and ``get_nearest_neighbors(query, k)`` (wrapped in
            :class:`ForeignNearestNeighbors`).
        owner: who asks, for the error message (e.g. ``"TracInCPFastRandProj"``).

    Raises:
        ArgumentTypeError: for a class instead of an instance, or an object without
            those methods.
    """
    if isinstance(value, NearestNeighbors):
        return value
    try:
        _check_duck(value, "nearest_neighbors")
    except ArgumentTypeError as exc:
        raise ArgumentTypeError(f"{owner}: {exc}") from None
    return ForeignNearestNeighbors(value)
