"""The nearest-neighbour interface shared by every search backend.

A backend indexes ``N`` vectors of dimension ``D`` once (:meth:`NearestNeighbors.setup`)
and then answers "which ``k`` stored vectors have the largest inner product with this
query?" (:meth:`NearestNeighbors.get_nearest_neighbors`). TracInCPFastRandProj stores
one embedding per training example, so the largest inner products are the proponents.

Opponents are the training examples with the *smallest* scores. The caller finds them
by querying with the negated vector ``-q``: the largest ``<x, -q>`` are the smallest
``<x, q>``. Backends never flip signs themselves: every score they return is the inner
product with the query exactly as it was passed in, so for a negated query the caller
negates the scores back.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import math
import operator
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, final

import numpy as np
import torch
from torch import Tensor

from proponents.checks import check_path
from proponents.errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    ProponentsError,
    StoreError,
    article,
    count,
)
from proponents.store import file_crc32, read_small_file, release_rows
from proponents.user_warnings import warn

__all__ = [
    "MissingExtraError",
    "NearestNeighbors",
    "NearestNeighborsNotReadyError",
]

#: Version of the small JSON file that :meth:`NearestNeighbors.save` writes.
_META_FORMAT = 1
#: Name of that JSON file inside the save directory.
META_FILENAME = "neighbors.json"


class MissingExtraError(ProponentsError, ImportError):
    """An optional dependency (a pip "extra" of proponents) is not installed."""


class NearestNeighborsNotReadyError(ProponentsError, RuntimeError):
    """A nearest-neighbour structure was queried before ``setup(data)`` was called."""


def import_extra(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency, or explain which extra provides it.

    Args:
        module: the module to import, e.g. ``"annoy"``.
        extra: the name of the proponents extra that installs it, e.g. ``"annoy"``.
        what: the class or feature that needs it, for the message.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: when the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{what} needs the optional package '{module}', which is not installed "
            f"({exc}). Install it with: pip install 'proponents[{extra}]'"
        ) from exc


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def check_matrix(value: Any, name: str, dim: int | None = None) -> Tensor:
    """Check that ``value`` is a non-empty floating-point ``(rows, *features)`` tensor.

    A tensor with more than two dimensions is flattened to ``(rows, D)`` with
    ``D = prod(features)`` (row ``i`` is ``value[i].flatten()``), as Captum's
    nearest-neighbour interface does. A query only needs the same number of features as
    the data, not the same trailing shape: a ``(n, 6)`` query searches ``(N, 3, 2)``
    data. A 0-D or 1-D tensor is refused (a single vector is ``value[None]``).

    Args:
        value: the argument to check.
        name: the argument's name, for error messages.
        dim: the number of columns (features, after flattening) it must have, or
            ``None`` for any positive number.

    Returns:
        ``value`` as ``(rows, D)``, detached from autograd: ``value`` itself when it is
        2-D, else ``value.reshape(rows, D)`` (a view when the layout allows it, a copy
        otherwise).

    Raises:
        ArgumentTypeError: when it is not a floating-point ``torch.Tensor``.
        InvalidArgumentError: when it has fewer than two dimensions, no features, or
            another number of features than ``dim``.
    """
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(
            f"{name} must be a torch.Tensor of shape (rows, D); got {type(value).__name__}"
        )
    if value.dim() < 2:
        raise InvalidArgumentError(
            f"{name} must be a 2-D tensor of shape (rows, D), or (rows, *features) to be "
            f"flattened to (rows, D); got shape {_shape(value)} (for a single vector v, "
            "pass v[None])"
        )
    if not value.is_floating_point():
        raise ArgumentTypeError(
            f"{name} must have a floating-point dtype (e.g. torch.float32); got {value.dtype}"
        )
    shape = _shape(value)
    flattened = value.dim() > 2
    if flattened:
        # math.prod, not -1: a tensor without rows cannot infer the -1
        value = value.reshape(int(value.shape[0]), math.prod(value.shape[1:]))
    columns = int(value.shape[1])
    what = f"shape {shape}" + (f", flattened to {_shape(value)}" if flattened else "")
    if dim is None and columns == 0:
        raise InvalidArgumentError(f"{name} must have at least one column (D >= 1); got {what}")
    if dim is not None and columns != dim:
        raise InvalidArgumentError(
            f"{name} has {columns} columns{' (features per row)' if flattened else ''}, "
            f"but setup() was given data with D={dim} columns (features per row, after "
            f"flattening); got {name} of {what}"
        )
    return value.detach()


def check_k(k: Any, num_items: int) -> int:
    """Check that ``k`` is an integer in ``1..num_items``.

    Raises:
        ArgumentTypeError: when ``k`` is not an integer (``bool`` is refused too).
        InvalidArgumentError: when ``k`` is outside ``1..num_items``.
    """
    if isinstance(k, bool):
        raise ArgumentTypeError(f"k must be an int; got bool ({k})")
    try:
        k_int = operator.index(k)
    except TypeError:
        raise ArgumentTypeError(f"k must be an int; got {type(k).__name__} ({k!r})") from None
    if not 1 <= k_int <= num_items:
        raise InvalidArgumentError(
            f"k must be between 1 and N={num_items} (the number of vectors given to "
            f"setup()); got k={k_int}"
        )
    return k_int


def score_dtype(query_dtype: torch.dtype, data_dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are computed in: the promoted dtype of both, at least float32."""
    return torch.promote_types(torch.promote_types(query_dtype, data_dtype), torch.float32)


def finite_rows(data: Tensor, block_rows: int = 8192) -> Tensor:
    """``(N,)`` bool: whether every entry of each row of ``data`` is finite (block by block)."""
    n = int(data.shape[0])
    out = torch.ones(n, dtype=torch.bool, device=data.device)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        out[start:stop] = torch.isfinite(data[start:stop]).all(dim=1)
        release_rows(data, start, stop)
    return out


def _as_tensor(value: Any, what: str, owner: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError:
            raise ArgumentTypeError(
                f"{owner} returned {what} as a numpy array of dtype {value.dtype}, which "
                "torch cannot hold; return a numeric torch.Tensor or numpy array"
            ) from None
    raise ArgumentTypeError(
        f"{owner} must return {what} as a torch.Tensor (or a numpy array); got "
        f"{type(value).__name__}"
    )


def check_neighbors(
    backend: object, query: Tensor, k: int, num_items: int | None, result: Any
) -> tuple[Tensor, Tensor]:
    """Check and normalise what a backend's ``get_nearest_neighbors(query, k)`` returned.

    Numpy arrays are converted to tensors; indices become ``torch.long`` and both
    results move to ``query``'s device; each row is re-sorted by score, largest first,
    ties by smaller index (NaN first), so that any backend's answer follows the same
    order.

    Args:
        backend: the backend that answered (its class is named in error messages).
        query: ``(n, D)`` the query it was given.
        k: the number of neighbours it was asked for.
        num_items: ``N``, the number of vectors it indexed, to check the index range;
            ``None`` to skip that check.
        result: its return value.

    Returns:
        ``(indices, scores)``, both ``(n, k)`` on ``query``'s device.

    Raises:
        ArgumentTypeError: when ``result`` is not a pair of tensors or arrays, the
            indices are not integers or the scores are not floating point.
        InvalidArgumentError: when either is not ``(n, k)``, or an index is outside
            ``0..N-1`` or repeated within a row.
    """
    owner = f"{type(backend).__qualname__}.get_nearest_neighbors(query, k={k})"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        got = article(type(result).__name__)
        if isinstance(result, (tuple, list)):
            got += f" of {count(len(result), 'item')}"
        raise ArgumentTypeError(
            f"{owner} must return a pair (indices, scores) of (n, k) tensors; got {got}"
        )
    indices = _as_tensor(result[0], "indices", owner)
    scores = _as_tensor(result[1], "scores", owner)
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise ArgumentTypeError(
            f"{owner} must return integer indices (row numbers of the data given to "
            f"setup()); got dtype {indices.dtype}"
        )
    if not scores.is_floating_point():
        raise ArgumentTypeError(
            f"{owner} must return floating-point scores (inner products); got dtype {scores.dtype}"
        )
    expected = (int(query.shape[0]), int(k))
    for what, value in (("indices", indices), ("scores", scores)):
        if tuple(value.shape) != expected:
            raise InvalidArgumentError(
                f"{owner} returned {what} of shape {_shape(value)}; for a query of "
                f"{expected[0]} rows it must return indices and scores of shape "
                f"(n, k) = {expected}"
            )
    indices = indices.to(device=query.device, dtype=torch.long)
    scores = scores.to(device=query.device)
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or (num_items is not None and high >= num_items):
            bad = low if low < 0 else high
            valid = "0..N-1" if num_items is None else f"0..{num_items - 1}"
            raise InvalidArgumentError(
                f"{owner} returned index {bad}, outside the valid row numbers {valid} of "
                "the data given to setup()"
            )
        if k > 1:
            ordered = torch.sort(indices, dim=1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
            if bool(repeated.any()):
                row = int(repeated.nonzero()[0, 0])
                raise InvalidArgumentError(
                    f"{owner} returned the same index twice in row {row} "
                    f"({indices[row].tolist()}); each row must list k distinct rows"
                )
    scores, indices = sort_rows(scores, indices)
    return indices, scores


def sort_rows(scores: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score, largest first, ties broken by the smaller index.

    Args:
        scores: ``(n, m)`` scores.
        indices: ``(n, m)`` the item index of each score.

    Returns:
        ``(scores, indices)`` reordered row by row. NaN scores sort first (as largest),
        the same way :func:`torch.sort` and :func:`torch.topk` treat them.
    """
    by_index = torch.sort(indices, dim=1, stable=True).indices
    scores = scores.gather(1, by_index)
    indices = indices.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, by_score), indices.gather(1, by_score)


def rescored(data: Tensor, query: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """The rows ``indices`` chose for each query row, scored exactly and sorted.

    What a backend that only picks rows is turned into: each score is the inner product
    ``<data[indices[i, j]], query[i]>`` in the promoted dtype of data and query (at least
    float32), and each row is sorted by it, largest first, ties by smaller index.

    Args:
        data: ``(N, D)`` the indexed rows.
        query: ``(n, D)`` the query rows.
        indices: ``(n, k)`` row numbers of ``data`` (any integer dtype and device).

    Returns:
        ``(indices, scores)``, both ``(n, k)`` on ``query``'s device.
    """
    dtype = score_dtype(query.dtype, data.dtype)
    idx = indices.to(device=data.device, dtype=torch.long)
    q = query.to(device=data.device, dtype=dtype)
    with torch.no_grad():
        scores, idx = sort_rows(_gathered_scores(data, idx, q), idx)
    return idx.to(query.device), scores.to(query.device)


def data_fingerprint(data: Tensor) -> str:
    """A cheap fingerprint of a data matrix: its shape and up to 256 evenly spaced rows.

    Used to notice that a saved index was built from other data than the data it is
    loaded with. It reads a bounded number of rows, so it stays fast for large ``N``.
    """
    n, d = data.shape
    rows = torch.unique(torch.linspace(0, max(n - 1, 0), steps=min(n, 256)).round().long())
    sample = data[rows.to(data.device)].detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{n}x{d}".encode())
    digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


class NearestNeighbors(ABC):
    """Finds the stored vectors with the largest inner product with a query.

    Subclasses implement :meth:`setup` and :meth:`get_nearest_neighbors`; that is all a
    user-defined backend needs. Backends may also describe their settings
    (:meth:`config`) and persist a built index (:meth:`save` / :meth:`load`); without
    those, a saved TracInCPFastRandProj rebuilds the structure from its embeddings.

    Sign convention: scores are inner products with the query *as given*. To find the
    smallest inner products (opponents), query with ``-q`` and negate the returned
    scores.

    Built-in subclasses set ``backend_name``; such a class can be re-created from its
    :meth:`config` with :meth:`from_config`.
    """

    #: Short name of a built-in backend (``"exact"``, ``"annoy"``, ``"faiss"``).
    backend_name: ClassVar[str | None] = None
    _registry: ClassVar[dict[str, type[NearestNeighbors]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("backend_name")
        if name is not None:
            NearestNeighbors._registry[name] = cls

    @abstractmethod
    def setup(self, data: Tensor) -> None:
        """Index the vectors to search.

        Args:
            data: ``(N, D)`` floating-point tensor, one vector per row. Row ``i`` is
                reported as index ``i`` by :meth:`get_nearest_neighbors`.
        """

    @abstractmethod
    def get_nearest_neighbors(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Find, for each query row, the ``k`` stored rows with the largest inner product.

        Args:
            query: ``(n, D)`` floating-point tensor.
            k: how many neighbours per query row, ``1 <= k <= N``.

        Returns:
            ``(indices, scores)``, both ``(n, k)`` and on ``query``'s device: ``indices``
            (``torch.long``) are row numbers of the data given to :meth:`setup`;
            ``scores[i, j] = <data[indices[i, j]], query[i]>``, in descending order
            along each row.
        """

    @final
    def search(self, query: Tensor, k: int, num_items: int | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`get_nearest_neighbors`, with its answer checked; what proponents calls.

        A backend written by a user may return numpy arrays: they are converted to
        tensors. Indices become ``torch.long``, both results move to ``query``'s device,
        and each row is sorted by score (largest first, ties by smaller index). Anything
        else that breaks the contract of :meth:`get_nearest_neighbors` is an error that
        names the backend class. Not meant to be overridden.

        Args:
            query: ``(n, D)`` floating-point tensor.
            k: neighbours per query row.
            num_items: ``N``, the number of vectors given to :meth:`setup`, to check that
                every index is a row number; ``None`` skips that check.

        Returns:
            ``(indices, scores)``, both ``(n, k)`` on ``query``'s device.

        Raises:
            ArgumentTypeError: when the backend returned something other than a pair of
                tensors/arrays, non-integer indices or non-floating-point scores.
            InvalidArgumentError: when a result is not ``(n, k)``, or an index is out of
                range or repeated within a row.
        """
        result = self.get_nearest_neighbors(query, k)
        return check_neighbors(self, query, k, num_items, result)

    def check_fits(self, num_items: int, dim: int) -> None:
        """Raise now if :meth:`setup` with ``(num_items, dim)`` data is bound to fail.

        Called before an expensive computation produces the data (TracInCPFastRandProj
        calls it before embedding the training set), so that settings that cannot work
        are reported at once. The default checks nothing; backends with settings that
        depend on the data's size (e.g. a Faiss IVF index needs at least as many vectors
        as lists) override it.

        Args:
            num_items: ``N``, the number of vectors that will be indexed.
            dim: ``D``, their dimension.

        Raises:
            InvalidArgumentError: when the settings cannot index such data.
        """
        return None  # nothing to check by default

    def config(self) -> dict[str, Any]:
        """The backend's settings as a JSON-serialisable dict.

        Always contains ``"backend"`` (a short name for built-in backends, the class's
        qualified name otherwise). Built-in backends add their constructor arguments, so
        that :meth:`from_config` can re-create them.
        """
        cls = type(self)
        return {"backend": cls.backend_name or f"{cls.__module__}.{cls.__qualname__}"}

    def save(self, directory: str | os.PathLike[str]) -> bool:
        """Write the built index under ``directory`` (no pickle), if the backend can.

        The data matrix itself is not written: the caller stores it and passes it back
        to :meth:`load`.

        Args:
            directory: a folder; created when missing.

        Returns:
            ``True`` when files were written, ``False`` when this backend keeps nothing
            worth saving (the default: it is rebuilt from the data by :meth:`setup`).
        """
        return False

    def load(self, directory: str | os.PathLike[str], data: Tensor) -> bool:
        """Restore an index written by :meth:`save`, or rebuild it from ``data``.

        Args:
            directory: the folder given to :meth:`save`.
            data: ``(N, D)`` the same data the saved index was built from; backends keep
                it to compute exact scores.

        Returns:
            ``True`` when the saved index was used, ``False`` when the structure was
            rebuilt by ``setup(data)`` (the default, and the fallback, with a warning,
            for a saved index that is missing, damaged or built from other data or
            settings).
        """
        self.setup(data)
        return False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NearestNeighbors:
        """Re-create a built-in backend from the dict returned by :meth:`config`.

        Args:
            config: a mapping with a ``"backend"`` key naming a built-in backend and that
                backend's constructor arguments.

        Raises:
            InvalidArgumentError: for an unknown backend name or settings the backend's
                constructor does not accept.
            MissingExtraError: when the backend's optional dependency is not installed.
        """
        if not isinstance(config, Mapping) or "backend" not in config:
            raise InvalidArgumentError(
                f"config must be a mapping with a 'backend' key; got {config!r}"
            )
        settings = dict(config)
        name = settings.pop("backend")
        backend = NearestNeighbors._registry.get(name)
        if backend is None:
            known = ", ".join(sorted(NearestNeighbors._registry))
            raise InvalidArgumentError(
                f"config names backend {name!r}, which is not a built-in backend "
                f"(known: {known}), so it cannot be re-created from its settings; "
                "construct it yourself and pass the instance (to restore a saved "
                "TracInCPFastRandProj: TracInCPFastRandProj.load(..., "
                "nearest_neighbors=<a new instance>), which sets it up from the saved "
                "embeddings)"
            )
        try:
            inspect.signature(backend).bind(**settings)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"config for backend {name!r} has settings {sorted(settings)} that "
                f"{backend.__name__} does not accept: {exc}"
            ) from None
        return backend(**settings)


class IndexedNearestNeighbors(NearestNeighbors):
    """Shared machinery of the built-in backends: validation, exact rescoring, saving.

    Subclasses implement :meth:`_build` (index the validated data), :meth:`_query`
    (answer a validated query; approximate backends pass their candidates through
    :meth:`_rescore`) and, to be persistable,
    :meth:`_write_index` / :meth:`_read_index` and :attr:`_index_filename`.
    """

    #: Name of the index file inside a save directory, or ``None`` when not persistable.
    _index_filename: ClassVar[str | None] = None
    #: Whether :meth:`_build` gets only the finite rows (approximate indices, whose
    #: training or trees a NaN or infinite entry would spoil). The other rows are then
    #: searched exactly at every query and merged in by :meth:`_rescore`.
    _finite_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self._data: Tensor | None = None
        #: Data rows the index was built from (``None``: all of them) and the rest.
        self._kept: Tensor | None = None
        self._nonfinite: Tensor | None = None
        #: ``(N,)`` bool, the rows with a NaN or infinite entry, found at the first
        #: :meth:`search_finite` (``None``: not looked for yet, or none found).
        self._skip: Tensor | None = None
        self._skip_known = False

    @contextlib.contextmanager
    def reporting(self, progress: Callable[[int], None]) -> Iterator[None]:
        """Within, :meth:`setup` hands ``progress`` the number of rows it indexed since
        the last call, as it goes (a backend that adds them one by one, such as Annoy)
        or at the end (one that adds them at once)."""
        self._report_rows: Callable[[int], None] | None = progress
        try:
            yield
        finally:
            self._report_rows = None

    def _rows_indexed(self, n: int) -> None:
        """Tell the :meth:`reporting` callback, if any, that ``n`` more rows are in."""
        report = getattr(self, "_report_rows", None)
        if report is not None and n:
            report(n)

    # -- settings --------------------------------------------------------------------

    def _build_config(self) -> dict[str, Any]:
        """The settings that shape the built index (a saved index must match them)."""
        return self.config()

    # -- subclass hooks --------------------------------------------------------------

    @abstractmethod
    def _build(self, data: Tensor) -> None:
        """Build the search structure for the validated ``(N, D)`` ``data``."""

    @abstractmethod
    def _query(self, query: Tensor, k: int, skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(indices, scores)`` for a validated, non-empty ``(n, D)`` query, passing over
        the rows ``skip`` marks (see :meth:`search_finite`)."""

    def _write_index(self, path: Path) -> None:
        raise NotImplementedError

    def _read_index(self, path: Path, data: Tensor) -> None:
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------

    @property
    def num_items(self) -> int:
        """``N``, the number of vectors indexed by :meth:`setup` (0 before it)."""
        return 0 if self._data is None else int(self._data.shape[0])

    def setup(self, data: Tensor) -> None:
        """Index ``data``.

        Args:
            data: ``(N, D)`` floating-point tensor with ``N >= 1`` and ``D >= 1``, or
                ``(N, *features)``, which is flattened to ``(N, D)`` with
                ``D = prod(features)`` (row ``i`` is ``data[i].flatten()``). It is kept by
                reference (not copied; a flattened view when its layout allows one) to
                compute exact scores, so do not modify it in place afterwards.

        Raises:
            ArgumentTypeError: when ``data`` is not a floating-point tensor.
            InvalidArgumentError: when ``data`` has fewer than two dimensions or is
                empty.
        """
        data = check_matrix(data, "data")
        if data.shape[0] == 0:
            raise InvalidArgumentError("data must have at least one row (N >= 1); got N=0")
        self._data = None
        self._skip, self._skip_known = None, False
        built = self._split_finite(data)
        if built is not None:
            self._build(built)
        self._data = data

    def get_nearest_neighbors(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Find, for each query row, the ``k`` stored rows with the largest inner product.

        Scores are inner products with ``query`` as given, computed exactly from the
        stored data (in the promoted dtype of data and query, at least float32); rows are
        sorted by score, largest first, ties by smaller index. To find the smallest inner products
        (opponents), pass ``-query`` and negate the scores.

        Args:
            query: ``(n, D)`` floating-point tensor, on any device, or
                ``(n, *features)``, flattened to ``(n, D)``. Only the number of features
                must match the data's ``D`` (after flattening), not the trailing shape:
                a ``(n, 6)`` query searches ``(N, 3, 2)`` data.
            k: neighbours per query row, ``1 <= k <= N``.

        Returns:
            ``(indices, scores)``: ``(n, k)`` ``torch.long`` row numbers of the data and
            ``(n, k)`` inner products, both on ``query``'s device.

        Raises:
            NearestNeighborsNotReadyError: when :meth:`setup` has not been called.
            ArgumentTypeError: when ``query`` is not a floating-point tensor or ``k`` is
                not an int.
            InvalidArgumentError: when ``query`` has fewer than two dimensions or not
                ``D`` features per row, or ``k`` is outside ``1..N``.
        """
        return self._answer(query, k, None)

    @final
    def search_finite(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """:meth:`search`, passing over the rows with a NaN or infinite entry.

        Each query row gets the ``k`` best rows of those whose entries are all finite,
        ranked, scored and checked as :meth:`search` ranks them; whatever the number of
        rows passed over, no more than :meth:`search` would ask for ``k`` neighbours is
        asked of the index or held per query row. TracInCPFastRandProj ranks the examples
        with non-finite embeddings last, so it needs only these. A query row that has
        fewer than ``k`` such rows is filled up with rows passed over, each scored
        ``-inf``. The rows to pass over are found at the first call (one pass over the
        data, or over the rows left out of the index).

        Args:
            query: ``(n, D)`` floating-point tensor, as for :meth:`get_nearest_neighbors`.
            k: neighbours per query row, ``1 <= k <= N``.

        Returns:
            ``(indices, scores)``, both ``(n, k)`` on ``query``'s device.
        """
        result = self._answer(query, k, self._skipped_rows())
        return check_neighbors(self, query, k, self.num_items, result)

    def _answer(self, query: Tensor, k: int, skip: Tensor | None) -> tuple[Tensor, Tensor]:
        """:meth:`get_nearest_neighbors`, passing over the rows ``skip`` marks."""
        data = self._require_data()
        query = check_matrix(query, "query", dim=int(data.shape[1]))
        k = check_k(k, int(data.shape[0]))
        dtype = score_dtype(query.dtype, data.dtype)
        if query.shape[0] == 0:
            return (
                torch.empty(0, k, dtype=torch.long, device=query.device),
                torch.empty(0, k, dtype=dtype, device=query.device),
            )
        if self._kept is not None and self._kept.numel() == 0:  # no finite row: no index
            from proponents.neighbors.exact import exact_top_k

            indices, scores = exact_top_k(data, query, k, skip=skip)
            return indices.to(query.device), scores.to(query.device)
        return self._query(query, k, skip)

    def save(self, directory: str | os.PathLike[str]) -> bool:
        """Write the built index and a small JSON description under ``directory``.

        Writes ``neighbors.json`` (backend settings, ``N``, ``D`` and a fingerprint of
        the data) and the backend's own index file, each atomically; no pickle. The data
        itself is not written.

        Returns:
            ``True`` when files were written, ``False`` for a backend with nothing to save.

        Args:
            directory: the folder to write to (created if missing).

        Raises:
            NearestNeighborsNotReadyError: when :meth:`setup` has not been called.
            InvalidArgumentError: when ``directory`` (or a folder above it) is a file.
        """
        check_path(directory, "directory", f"{type(self).__name__}.save")
        if self._index_filename is None:
            return False
        data = self._require_data()
        if self._kept is not None and self._kept.numel() == 0:
            return False  # no finite row, so no index was built
        folder = Path(directory)
        blocking = next((f for f in (folder, *folder.parents) if f.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise InvalidArgumentError(
                f"{type(self).__name__}.save: {str(blocking)!r} is a file, not a directory; "
                "give a directory to write the index to (it is created if missing)"
            )
        meta_path = folder / META_FILENAME
        index_path = folder / self._index_filename
        # Temporary names of this save alone: two saves into one folder never write into
        # each other's files.
        token = secrets.token_hex(6)
        tmp = index_path.with_name(f"{index_path.name}.{token}.tmp")
        tmp_meta = meta_path.with_name(f"{meta_path.name}.{token}.tmp")
        _refuse_foreign_meta(meta_path, type(self).__name__)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Remove the old description first: an interrupted save reads as "no index".
            meta_path.unlink(missing_ok=True)
            self._write_index(tmp)
            meta = {
                "format": _META_FORMAT,
                "config": self.config(),
                "build": self._build_config(),
                "num_items": int(data.shape[0]),
                "dim": int(data.shape[1]),
                "fingerprint": data_fingerprint(data),
                "index_file": self._index_filename,
                # what load checks the index file against: a damaged or replaced file
                # is rebuilt, never searched
                "index_crc32": file_crc32(tmp),
            }
            os.replace(tmp, index_path)
            tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
            os.replace(tmp_meta, meta_path)
        except OSError as exc:
            raise StoreError(
                f"{type(self).__name__}.save: cannot write the index to {str(folder)!r} "
                f"({exc.strerror or exc}); check that the directory is writable"
            ) from exc
        finally:
            for left in (tmp, tmp_meta):
                with contextlib.suppress(OSError):
                    left.unlink(missing_ok=True)
        return True

    def load(self, directory: str | os.PathLike[str], data: Tensor) -> bool:
        """Restore an index written by :meth:`save`, or rebuild it from ``data``.

        The saved index is used only when it was built by this backend with the same
        build settings, from data of the same shape and fingerprint; otherwise (or when
        its files are missing or unreadable) a warning says why and ``setup(data)``
        rebuilds it. Query-time settings (e.g. ``search_k``, ``nprobe``) are this
        instance's, not the saved ones.

        Args:
            directory: the folder given to :meth:`save`.
            data: ``(N, D)`` (or ``(N, *features)``, flattened) the data the index was
                built from (kept by reference).

        Returns:
            ``True`` when the saved index was used, ``False`` when it was rebuilt (or,
            for data without a single finite row, when there is no index to use).
        """
        check_path(directory, "directory", f"{type(self).__name__}.load")
        data = check_matrix(data, "data")
        if self._index_filename is None:
            self.setup(data)
            return False
        self._data = None
        self._skip, self._skip_known = None, False
        built = self._split_finite(data)
        if built is None:  # no finite row: nothing was built or saved, nothing to read
            self._data = data
            return False
        folder = Path(directory)
        problem = self._saved_index_problem(folder, data)
        if problem is None:
            try:
                self._read_index(folder / self._index_filename, built)
                self._data = data
                return True
            except Exception as exc:  # a damaged file must not stop the caller
                problem = f"its index file could not be read ({type(exc).__name__}: {exc})"
        warn(
            f"not using the saved {self.config()['backend']} nearest-neighbour index in "
            f"{folder}: {problem}; rebuilding it from the data",
            RuntimeWarning,
        )
        self.setup(data)
        return False

    # -- helpers ---------------------------------------------------------------------

    def _split_finite(self, data: Tensor) -> Tensor | None:
        """The rows to build the index from: all, or (``_finite_only``) the finite ones.

        Records which rows were left out; returns ``None`` when no row is left.
        """
        self._kept = self._nonfinite = None
        if not self._finite_only:
            return data
        finite = finite_rows(data)
        if bool(finite.all()):
            return data
        self._kept = finite.nonzero().squeeze(1)
        self._nonfinite = (~finite).nonzero().squeeze(1)
        return data[self._kept] if self._kept.numel() else None

    def _skipped_rows(self) -> Tensor | None:
        """``(N,)`` bool on the data's device: the rows with a NaN or infinite entry
        (``None`` when there are none), found once.

        A backend that indexes the finite rows only looks at the rows it left out, the
        others in blocks of the whole data.
        """
        data = self._require_data()
        if not self._skip_known:
            if self._finite_only:
                skip = torch.zeros(int(data.shape[0]), dtype=torch.bool, device=data.device)
                left_out = self._nonfinite if self._kept is not None else None
                if left_out is not None:
                    for start in range(0, int(left_out.numel()), 8192):
                        rows = left_out[start : start + 8192]
                        skip[rows] = ~torch.isfinite(data[rows]).all(dim=1)
            else:
                skip = ~finite_rows(data)
            self._skip = skip if bool(skip.any()) else None
            self._skip_known = True
        return self._skip

    def _require_data(self) -> Tensor:
        if self._data is None:
            raise NearestNeighborsNotReadyError(
                f"{type(self).__name__} has no data yet: call setup(data) with an (N, D) "
                "tensor before get_nearest_neighbors() or save()"
            )
        return self._data

    def _saved_index_problem(self, folder: Path, data: Tensor) -> str | None:
        """Why the index saved in ``folder`` cannot serve ``data``, or ``None`` if it can."""
        meta_path = folder / META_FILENAME
        try:
            meta = json.loads(read_small_file(meta_path).decode("utf-8"))
        except FileNotFoundError:
            return f"{meta_path.name} is missing"
        except (OSError, ValueError) as exc:
            return f"{meta_path.name} could not be read ({exc})"
        if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
            return f"{meta_path.name} has an unknown format"
        expected = {
            "build settings": (meta.get("build"), self._build_config()),
            "number of vectors (N)": (meta.get("num_items"), int(data.shape[0])),
            "vector dimensions (D)": (meta.get("dim"), int(data.shape[1])),
        }
        for what, (saved, current) in expected.items():
            if saved != current:
                return f"its {what} do not match (saved {saved}, now {current})"
        if meta.get("fingerprint") != data_fingerprint(data):
            return "it was built from different data (fingerprint differs)"
        index_file = folder / self._index_filename  # type: ignore[operator]
        if not index_file.is_file():
            return f"{self._index_filename} is missing"
        saved_crc = meta.get("index_crc32")  # indexes saved before it was recorded lack it
        if saved_crc is not None:
            try:
                crc = file_crc32(index_file)
            except OSError as exc:
                return f"{self._index_filename} could not be read ({exc.strerror or exc})"
            if crc != saved_crc:
                return (
                    f"{self._index_filename} holds other bytes than were saved (its checksum "
                    "differs: damaged, or written by another save)"
                )
        return None

    # -- candidates from a float32 index ---------------------------------------------
    # Annoy and Faiss store float32 vectors and score in float32. The helpers below let
    # _rescore tell, row by row, whether such a search can have missed a true neighbour.

    #: ``(D,)`` float64, the largest magnitude of each column over the indexed rows, as
    #: recorded by :meth:`_split_float32_rows` (``None`` for a backend that does not use
    #: it). For every indexed row ``x``, ``sum_i |x_i q_i| <= |q| @ _col_max``.
    _col_max: Tensor | None = None

    def _split_float32_rows(self, data: Tensor) -> Tensor | None:
        """The rows a float32 index can hold: :meth:`_split_finite` judged in float32.

        A row is left out of the index (and searched exactly at every query, like a row
        holding NaN or inf) when an entry is not finite once cast to float32: besides
        NaN and inf, that is a float64 value beyond float32's range (about 3.4e38),
        which the cast would turn into inf. The same blocked pass records
        :attr:`_col_max` over the kept rows (absolute values and maxima round nothing,
        so it is computed in the data's own dtype).

        Returns:
            The rows to build the index from (``data`` itself when every row is kept), or
            ``None`` when no row is left. :attr:`_kept` and :attr:`_nonfinite` record the
            split, as :meth:`_split_finite` does.
        """
        self._kept = self._nonfinite = None
        self._col_max = None
        n, d = int(data.shape[0]), int(data.shape[1])
        finite = torch.ones(n, dtype=torch.bool, device=data.device)
        col_max = torch.zeros(d, dtype=data.dtype, device=data.device)
        step = max(1, min(8192, (1 << 22) // max(d, 1)))
        for start in range(0, n, step):
            stop = min(n, start + step)
            block = data[start:stop]
            # Column minima and maxima carry a NaN or inf of any entry, and the cast to
            # float32 is monotonic: when both are finite in float32, every entry is.
            low, high = torch.aminmax(block, dim=0)
            if bool((torch.isfinite(low.float()) & torch.isfinite(high.float())).all()):
                col_max = torch.maximum(col_max, torch.maximum(-low, high))
            else:
                ok = torch.isfinite(block.to(torch.float32)).all(dim=1)
                finite[start:stop] = ok
                magnitudes = torch.where(ok[:, None], block.abs(), 0)
                col_max = torch.maximum(col_max, magnitudes.amax(dim=0))
            release_rows(data, start, stop)
        self._col_max = col_max.to(torch.float64)
        if bool(finite.all()):
            return data
        self._kept = finite.nonzero().squeeze(1)
        self._nonfinite = (~finite).nonzero().squeeze(1)
        return data[self._kept] if self._kept.numel() else None

    def _num_indexed(self) -> int:
        """How many rows the index holds (the kept rows, or all of them)."""
        return self.num_items if self._kept is None else int(self._kept.numel())

    def _scores_above_float32(self, query: Tensor) -> bool:
        """Whether scores for ``query`` are computed in more precision than the index's."""
        data = self._require_data()
        return score_dtype(query.dtype, data.dtype) != torch.float32

    def _candidates(self, k: int, wide: bool = False) -> int:
        """How many candidates to ask the index for.

        One more than ``k`` (while there are more rows), so that :meth:`_rescore` sees
        whether the ``k``-th score is tied with one left out. With ``wide`` (an
        exhaustive float32 search answering a float64 question) ``2k + 8``, at most the
        number of indexed rows: the further the last candidate lies below the ``k``-th,
        the more rows :meth:`_rescore` can certify without searching them again.
        """
        if k >= self.num_items:
            return k
        if not wide:
            return k + 1
        return max(k + 1, min(self._num_indexed(), 2 * k + 8))

    def _float32_risk(self, query: Tensor) -> tuple[Tensor, Tensor] | None:
        """Per query row: a bound on ``sum_i |x_i q_i|`` and whether float32 can overflow.

        Args:
            query: ``(n, D)`` validated query.

        Returns:
            ``None`` without :attr:`_col_max`; else ``(reach, unsafe)``, both ``(n,)`` on
            the data's device: ``reach = |q| @ _col_max`` (float64) bounds the magnitudes
            summed in the inner product of the row with every indexed row, and ``unsafe``
            marks rows whose float32 search may have met an infinite or NaN product or
            sum (``reach`` near float32's largest value, or not finite), or whose float32
            query is not finite (a float64 query beyond float32's range). Such a row's
            candidates mean nothing, so it is redone by exact search.
        """
        col_max = self._col_max
        if col_max is None:
            return None
        q = query.to(device=col_max.device, dtype=torch.float64)
        reach = q.abs() @ col_max
        dim = int(col_max.numel())
        # A float32 sum of terms of magnitude at most (1 + u)^3 |x_i q_i| stays below
        # (1 + gamma) times their total, so it cannot overflow while that is finite.
        growth = 1 + _gamma(dim, _F32_UNIT) + 4 * _F32_UNIT
        unsafe = ~(reach * growth < _F32_MAX)  # also True for a NaN reach
        if query.dtype == torch.float64:
            unsafe |= ~torch.isfinite(query.to(torch.float32)).all(dim=1).to(col_max.device)
        return reach, unsafe

    def _float32_error(self, query: Tensor, reach: Tensor) -> Tensor:
        """``(n,)`` float64: how far a float32 search score can lie from the true one.

        For every indexed row ``x`` and query row ``q``, the float32 score the index
        computed from ``fl32(x)`` and ``fl32(q)`` differs from the real ``<x, q>`` by at
        most this, and so does a float64 score of the row (its rounding is added
        twice, for the rescoring and for an exact search's own score). The bound is the
        worst case of any summation order (Higham, *Accuracy and Stability of Numerical
        Algorithms*, §3.1): a relative part ``(2u + u^2 + gamma_D (1 + u)^2 + 2 gamma64_D)``
        of ``reach`` (the casts of both vectors, then the float32 inner product) and an
        absolute part for values that underflow (or are flushed to zero) in float32.

        Args:
            query: ``(n, D)`` validated query.
            reach: ``(n,)`` from :meth:`_float32_risk`.
        """
        col_max = self._col_max
        assert col_max is not None
        dim = int(col_max.numel())
        u = _F32_UNIT
        gamma = _gamma(dim, u)
        relative = 2 * u + u * u + gamma * (1 + u) ** 2 + 2 * _gamma(dim, _F64_UNIT)
        q_l1 = query.to(device=col_max.device, dtype=torch.float64).abs().sum(dim=1)
        absolute = (
            2 * (1 + gamma) * (1 + u) ** 2 * _F32_TINY * (q_l1 + float(col_max.sum()) + 2 * dim)
            + 2 * dim * _F64_TINY
        )
        return 1.01 * (relative * reach + absolute)  # 1%: the rounding of this sum itself

    def _rescore(
        self,
        query: Tensor,
        candidates: Tensor,
        k: int,
        index_scores: Tensor | None = None,
        exhaustive: bool = False,
        skip: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Exact scores for candidate indices, rows sorted; rows in doubt redone exactly.

        When the index was built from the finite rows only (``_finite_only``), candidate
        positions are mapped back to data rows and the best ``k`` non-finite rows of each
        query (found exactly) compete with them, so they rank where exact search ranks
        them (a NaN score first, ``+inf`` before and ``-inf`` after every finite score).

        A row is answered by exact search instead when:

        - the index came back short of ``k`` distinct candidates (e.g. an IVF index whose
          probed lists hold fewer than ``k`` vectors);
        - its ``k``-th exact score equals the next candidate's. An index returns any one
          of several equal scores at its cut-off (Faiss does, even a flat one), so the
          ``k`` best need not be the lowest-indexed of them; given more than ``k``
          candidates (:meth:`_candidates`), exact search then keeps dataset order;
        - (with :attr:`_col_max`) its float32 search may have overflowed or had a
          non-finite query (:meth:`_float32_risk`), so its candidates mean nothing;
        - (``exhaustive`` and scores in float64) the float32 search can have left out a
          row better than the ``k``-th: an exhaustive index hands back the candidates
          with the best float32 scores, so every row left out has a float32 score of at
          most the last candidate's, and a true score of at most that plus
          :meth:`_float32_error`. A row whose ``k``-th float64 score is not above that
          is redone; rows that differ only below float32 precision are then ranked as
          exact search ranks them. Float32 scores skip this check (and cost nothing more).

        Args:
            query: ``(n, D)`` validated query.
            candidates: ``(n, m)`` positions in the indexed rows from the backend, ``-1``
                for missing entries, ``m >= k``.
            k: neighbours per row.
            index_scores: ``(n, m)`` the float32 scores the index gave the candidates, for
                the exhaustive check (``None``: no check).
            exhaustive: whether the index compared the query with every indexed row and
                returned the ``m`` best by its float32 scores.
            skip: ``(N,)`` bool, data rows to pass over (:meth:`search_finite`): they are
                not among the candidates, nor ranked by a row's exact search.
        """
        from proponents.neighbors.exact import exact_top_k

        data = self._require_data()
        dtype = score_dtype(query.dtype, data.dtype)
        q = query.to(device=data.device, dtype=dtype)
        idx = candidates.to(device=data.device, dtype=torch.long)
        # A backend may come back short (e.g. an IVF index whose probed lists hold fewer
        # than k vectors) or with repeats; such rows are answered by exact search.
        short = (idx < 0).any(dim=1)
        if k > 1:
            ordered = torch.sort(idx, dim=1).values
            short |= (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        risk = self._float32_risk(query)
        if risk is not None:
            short |= risk[1]
        safe = idx.clamp(min=0)
        if self._kept is not None:
            # The index holds the finite rows only: map its positions to data rows, and
            # add the best of the non-finite rows (searched exactly) as candidates.
            safe = self._kept[safe.clamp(max=self._kept.numel() - 1)]
            bad = self._nonfinite
            assert bad is not None
            if skip is not None:  # only the rows beyond float32's range are left
                bad = bad[~skip[bad]]
            if bad.numel():
                bad_idx, _ = exact_top_k(data[bad], q, min(k, int(bad.numel())))
                safe = torch.cat([safe, bad[bad_idx]], dim=1)
        scores = _gathered_scores(data, safe, q)
        scores, idx = sort_rows(scores, safe)
        if scores.shape[1] > k:  # a tie across the cut-off may hide a lower index
            short |= scores[:, k - 1] == scores[:, k]
        check = (
            exhaustive
            and index_scores is not None
            and risk is not None
            and dtype == torch.float64
            and int(candidates.shape[1]) < self._num_indexed()
        )
        if check:
            assert index_scores is not None and risk is not None
            last = index_scores.to(device=data.device, dtype=torch.float64).amin(dim=1)
            ceiling = last + self._float32_error(query, risk[0])
            short |= ~(scores[:, k - 1] > ceiling)  # NaN: in doubt as well
        scores, idx = scores[:, :k], idx[:, :k]
        if bool(short.any()):
            rows = short.nonzero().squeeze(1)
            ex_idx, ex_scores = exact_top_k(data, q[rows], k, skip=skip)
            idx[rows] = ex_idx
            scores[rows] = ex_scores
        return idx.to(query.device), scores.to(query.device)


#: Unit roundoff of float32 and float64.
_F32_UNIT = 2.0**-24
_F64_UNIT = 2.0**-53
#: The largest finite float32, and the smallest normal float32 and float64.
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)
_F64_TINY = float(torch.finfo(torch.float64).tiny)


def _refuse_foreign_meta(meta_path: Path, owner: str) -> None:
    """Refuse to replace a file at ``meta_path`` that a save of ours did not write.

    A description of ours is a JSON object naming its index file (any ``format``); one
    that does not parse (empty, cut short by a crash, binary) is taken for a damaged one
    of ours and replaced, as :meth:`IndexedNearestNeighbors.load` rebuilds from it.
    Anything else there, JSON of another kind (a file of the user's), is left as it is.

    Raises:
        StoreError: naming the file.
    """
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_bytes())
    except OSError:
        return  # unreadable: the save's own write reports it
    except ValueError:  # (UnicodeDecodeError included) damaged: ours to replace
        return
    if isinstance(meta, dict) and ("index_file" in meta or "index_crc32" in meta):
        return
    raise StoreError(
        f"{owner}.save: {str(meta_path)!r} is not a description this library wrote, and a "
        "save would replace it; move that file, or save the index to another directory"
    )


def _gamma(n: int, u: float) -> float:
    """``n u / (1 - n u)``: bounds the relative rounding error of an ``n``-term inner
    product in any summation order (``inf`` once ``n u >= 1``)."""
    n = max(int(n), 1)
    return n * u / (1 - n * u) if n * u < 1 else math.inf


def _gathered_scores(data: Tensor, rows: Tensor, query: Tensor) -> Tensor:
    """``(n, m)`` scores ``<data[rows[i, j]], query[i]>`` in ``query``'s dtype.

    Query rows are taken in chunks, so that at most about ``2**22`` gathered entries of
    ``data`` are held at once.
    """
    n, m = int(rows.shape[0]), int(rows.shape[1])
    out = torch.empty(n, m, dtype=query.dtype, device=data.device)
    step = max(1, (1 << 22) // max(1, m * int(data.shape[1])))
    for start in range(0, n, step):
        stop = min(n, start + step)
        gathered = data[rows[start:stop]].to(query.dtype)
        out[start:stop] = torch.einsum("nkd,nd->nk", gathered, query[start:stop])
    return out
