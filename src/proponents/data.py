"""Batches, labels, test inputs and device moves.

The convention (DESIGN.md §2): a training batch is a tuple or list
``(*model_inputs, label)``; the model is called as ``model(*batch[:-1])`` and
``batch[-1]`` holds the labels. A :class:`~torch.utils.data.Dataset` is wrapped
in a non-shuffling :class:`~torch.utils.data.DataLoader`; a DataLoader is used
as given. A plain ``TensorDataset`` (or a ``Subset`` of one) gets a
:class:`TensorRowsLoader`, which cuts each batch out of the stored tensors in one
operation instead of indexing and stacking example by example.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)

from proponents.errors import (
    ArgumentTypeError,
    BatchFormatError,
    InvalidArgumentError,
    article,
    count,
)
from proponents.user_warnings import warn

#: A function naming the memory format a tensor's batch copies should have.
MemoryFormatOf = Callable[[torch.Tensor], torch.memory_format]

BATCH_CONVENTION = (
    "each batch must be a tuple or list (*model_inputs, label): the model is called as "
    "model(*batch[:-1]) and batch[-1] holds the labels"
)


@dataclass
class Batch:
    """One batch split into model inputs and labels.

    Attributes:
        inputs: positional arguments of the model; tensors carry the batch in dim 0.
        labels: labels of the batch (``None`` when the loss needs none).
        size: number of examples in the batch.
        packed: the examples are told apart only by the labels and the model output (one
            row per example each), not by the model inputs: a ``collate_fn`` concatenated
            them (text for an ``nn.EmbeddingBag`` with offsets, graphs with a batch
            vector). Such a batch is run whole and never split (see :func:`split_batch`).
    """

    inputs: tuple[Any, ...]
    labels: Any
    size: int
    packed: bool = False


def _nested_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors inside ``obj`` (tuples, lists, dict values and dataclass fields,
    recursively), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _nested_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _nested_tensors(item)
    elif _is_dataclass_instance(obj):
        for f in dataclasses.fields(obj):
            yield from _nested_tensors(getattr(obj, f.name))


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def batch_size_of(inputs: Sequence[Any], labels: Any = None) -> int:
    """Number of examples in a batch.

    In order of preference: dim 0 of the first model input that is a tensor with a batch
    dimension; else dim 0 of the tensors nested in the model inputs (inside tuples, lists
    and dicts, e.g. ``model({"x": ..., "mask": ...})``), when they all agree; else dim 0
    of ``labels``, when no model input holds a tensor with a batch dimension that could
    tell (inputs such as lists of strings, or nested tensors of different first sizes).

    Raises:
        BatchFormatError: when none of these tells the batch size.
    """
    for item in inputs:
        if isinstance(item, torch.Tensor) and item.dim() > 0:
            return int(item.shape[0])
    nested = [t for item in inputs for t in _nested_tensors(item)]
    sizes = list(dict.fromkeys(int(t.shape[0]) for t in nested if t.dim() > 0))
    if len(sizes) == 1:
        return sizes[0]
    labels_tell = isinstance(labels, torch.Tensor) and labels.dim() > 0
    if labels_tell and (sizes or not nested):
        return int(labels.shape[0])
    if len(sizes) > 1:
        raise BatchFormatError(
            "cannot tell the batch size: the tensors inside the model inputs have different "
            f"first dimensions ({', '.join(map(str, sizes))}); give every tensor the examples "
            "in dim 0, or labels with one entry per example"
        )
    if any(isinstance(item, np.ndarray) for item in inputs):
        raise BatchFormatError(
            "cannot tell the batch size: the model inputs are NumPy arrays, which are "
            "handed to the model as they are; pass torch tensors (torch.from_numpy(array)) "
            "whose first dimension indexes examples"
        )
    raise BatchFormatError(
        "cannot tell the batch size: no model input or label is a tensor with a batch "
        "dimension; pass tensors whose first dimension indexes examples"
    )


UNBATCHED_HINT = (
    "A DataLoader with batch_size=None yields single examples without a batch dimension; "
    "give it a batch size (DataLoader(dataset, batch_size=32)), or pass the Dataset itself "
    "with batch_size=N"
)


def _check_labels_fit(
    inputs: tuple[Any, ...], labels: Any, size: int, what: str, packed_ok: bool = False
) -> bool:
    """Raise when the labels show the batch is one unbatched example, or another size;
    return whether the batch is packed (:attr:`Batch.packed`).

    Only when the model inputs hold tensors with a batch dimension (they gave ``size``):
    then labels that are a 0-dim tensor or a Python number (one example's label) mean the
    batch is not a batch of ``size`` examples (typically one example from a
    ``DataLoader(batch_size=None)``, whose feature dimension was read as the batch). A
    label tensor with another number of rows means the same there, and elsewhere
    (``packed_ok``: batches a ``collate_fn`` made) a packed batch of one example per
    label row, which the model's output must confirm (:func:`check_packed_output`).
    """
    has_batched_tensor = any(t.dim() > 0 for item in inputs for t in _nested_tensors(item))
    if not has_batched_tensor:
        return False
    if isinstance(labels, (bool, int, float)) or (
        isinstance(labels, torch.Tensor) and labels.dim() == 0
    ):
        shown = labels.item() if isinstance(labels, torch.Tensor) else labels
        raise BatchFormatError(
            f"{article(what)} has a single label ({shown!r}, no batch dimension), so it is one "
            f"example rather than a batch; {BATCH_CONVENTION}, with the examples in dim 0 "
            f"of every tensor. {UNBATCHED_HINT}."
        )
    if isinstance(labels, torch.Tensor) and int(labels.shape[0]) != size:
        if packed_ok:
            return True
        rows = int(labels.shape[0])
        raise BatchFormatError(
            f"{article(what)} has labels with {count(rows, 'row')} but model inputs of "
            f"{count(size, 'example')} (dim 0 of the input tensors): every tensor must have the "
            f"examples in dim 0, one label per example. {UNBATCHED_HINT}."
        )
    return False


def split_batch(batch: Any, what: str = "training batch", packed_ok: bool = True) -> Batch:
    """Split a ``(*model_inputs, label)`` batch.

    A batch whose label tensor has another number of rows than the model inputs is
    *packed* (:attr:`Batch.packed`): one example per label row, told apart by the model
    output alone. Not so for a batch of a loader that collates nothing (``packed_ok``
    false: a ``DataLoader(batch_size=None)`` yields single examples, and its feature
    dimension would be read as the batch), where the mismatch is an error.

    Args:
        batch: a tuple or list with at least two elements.
        what: how to name the batch in error messages.
        packed_ok: whether a packed batch is possible here.

    Raises:
        BatchFormatError: when ``batch`` is not a tuple/list of at least two elements.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        got = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            got += f" of length {len(batch)}"
        raise BatchFormatError(
            f"{article(what)} is {article(got)}, but {BATCH_CONVENTION}. Wrap your dataset so "
            "that each item is (input, label), e.g. torch.utils.data.TensorDataset(x, y)."
        )
    inputs = tuple(batch[:-1])
    labels = as_targets(batch[-1])  # plain-number labels (a collate_fn's list) as a tensor
    size = batch_size_of(inputs, labels)
    if _check_labels_fit(inputs, labels, size, what, packed_ok):
        return Batch(inputs=inputs, labels=labels, size=int(labels.shape[0]), packed=True)
    return Batch(inputs=inputs, labels=labels, size=size)


def collates_batches(source: Any) -> bool:
    """Whether ``source`` yields batches a ``collate_fn`` put together, which can be packed
    (:func:`split_batch`): anything but a ``DataLoader`` with automatic batching off
    (``batch_size=None``), which yields its dataset's items one by one."""
    return not (
        isinstance(source, DataLoader)
        and source.batch_size is None
        and source.batch_sampler is None
    )


def collated(source: Iterable[Any], what: str) -> Iterator[Any]:
    """The items of ``source``, with torch's failure to stack examples of different shapes
    into one batch (from ``default_collate``, also in a worker) made a
    :class:`~proponents.errors.BatchFormatError` that says what to do."""
    items = iter(source)
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except RuntimeError as err:
            if "stack expects each tensor to be equal size" not in str(err):
                raise
            raise BatchFormatError(
                f"the examples of a {what} have different shapes and cannot be stacked into "
                f"one batch ({str(err).strip().splitlines()[-1]}); give a DataLoader whose "
                "collate_fn pads or packs them, or batch_size=1"
            ) from err
        yield item


def repeatable_pass(loader: DataLoader) -> DataLoader:
    """``loader``, or a copy of it whose worker processes start afresh for the pass.

    Workers kept between passes (``persistent_workers=True``) carry their random state
    from one pass to the next, so a random augmentation would draw anew at every
    checkpoint. Workers started for the pass are seeded from the loader's ``generator``
    (or torch's global one), which the caller sets back before every pass; the copy
    shares the dataset, samplers and functions, and the loader's own workers are left
    alone.
    """
    if not (loader.persistent_workers and loader.num_workers > 0):
        return loader
    once = copy.copy(loader)
    # DataLoader refuses to change these after construction; the copy is ours alone
    object.__setattr__(once, "persistent_workers", False)
    object.__setattr__(once, "_iterator", None)
    return once


def output_rows(output: Any) -> int | None:
    """The rows (dim 0) of the first tensor with a batch dimension in a model output, or
    ``None`` where it has none."""
    first = next((t for t in _nested_tensors(output) if t.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def check_packed_output(batch: Batch, output: Any, what: str = "a batch") -> None:
    """Raise unless the model output of a packed ``batch`` has one row per label row.

    The model inputs of a packed batch do not show its examples; the labels and the
    output must agree on them. When they do not, the batch is neither packed nor in the
    usual convention (examples in dim 0 of every tensor).

    Raises:
        BatchFormatError: naming the three counts.
    """
    if not batch.packed:
        return
    rows = output_rows(output)
    if rows == batch.size:
        return
    inputs = batch_size_of(batch.inputs)
    got = "no tensor with a batch dimension" if rows is None else count(rows, "row")
    raise BatchFormatError(
        f"{what} has {count(batch.size, 'label')} (targets) but model inputs of "
        f"{count(inputs, 'example')} (dim 0 of the first input tensor), and the model output "
        f"has {got}: give one label per example, with the examples in dim 0 of every tensor "
        "(a single example needs its batch dimension too: x[None], labels of shape (1,)); "
        "a packed batch (a collate_fn that concatenates examples, such as text for an "
        "nn.EmbeddingBag with offsets) needs a model output with one row per label"
    )


class ListDataset(Dataset):
    """A list (or tuple) of examples read as a map-style dataset, item ``i`` being
    ``examples[i]``: what a DataLoader makes of a list, e.g. ``[(x0, y0), (x1, y1)]``.

    The list is held, not copied, so later edits show (and, like any dataset's, are
    noticed by a saved index or store only where its checks sample them).
    """

    def __init__(self, examples: list | tuple) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Any:
        return self.examples[index]


def is_example_list(data: Any) -> bool:
    """Whether ``data`` is a list (or tuple) of examples, each itself a tuple or list such
    as ``(x, y)``, rather than one batch ``(*inputs, label)`` of tensors."""
    return (
        isinstance(data, (list, tuple))
        and len(data) > 0
        and all(isinstance(item, (tuple, list)) for item in data)
    )


class TensorRows(TensorDataset):
    """A tensor read as a dataset of its rows, item ``i`` being ``tensor[i]`` itself (not
    a one-tuple): what a DataLoader makes of a bare tensor. A ``TensorDataset`` for the
    probes (every value counts), read through a DataLoader (a subclass is never sliced
    as plain rows, see :func:`_tensor_rows`)."""

    def __init__(self, tensor: Tensor) -> None:
        super().__init__(tensor)

    def __getitem__(self, index: Any) -> Tensor:  # type: ignore[override]
        return self.tensors[0][index]


def make_loader(
    data: Dataset | DataLoader | list | tuple | Tensor,
    batch_size: int | None,
    argument: str,
    rows_ok: bool = False,
) -> DataLoader:
    """Wrap a Dataset (or a list of examples) in a non-shuffling DataLoader, or return a
    DataLoader unchanged. With ``rows_ok`` (sources whose items are model inputs, not
    ``(inputs, label)`` pairs) a tensor is read as a dataset of its rows
    (:class:`TensorRows`), as a DataLoader reads it.

    Raises:
        ArgumentTypeError: when ``data`` is none of these, or a tuple of tensors.
        InvalidArgumentError: when the dataset is empty or ``batch_size`` is not a positive int.
    """
    if isinstance(data, Tensor):
        if not rows_ok or data.dim() == 0:
            shape = tuple(data.shape)
            raise ArgumentTypeError(
                f"{argument} is a tensor of shape {shape}, which holds no labels; pass "
                "TensorDataset(inputs, labels) (or a Dataset or DataLoader of (inputs, "
                "label) examples)"
                if not rows_ok
                else f"{argument} is a 0-dim tensor; give a tensor with one row per example"
            )
        data = TensorRows(data)
    if isinstance(data, tuple) and data and all(isinstance(item, Tensor) for item in data):
        raise ArgumentTypeError(
            f"{argument} is a tuple of tensors, which a DataLoader would read as "
            f"{count(len(data), 'example')}, one per tensor; for examples held as rows of "
            "tensors, pass TensorDataset(*tensors)"
        )
    if not rows_ok and isinstance(data, list) and data and all(isinstance(t, Tensor) for t in data):
        raise ArgumentTypeError(
            f"{argument} is a list of tensors, which a DataLoader would read as "
            f"{count(len(data), 'example')}, one per tensor, none with a label; for "
            "examples held as rows of tensors ([X, Y]), pass TensorDataset(*tensors), and "
            "for a list of examples, give (inputs, label) pairs"
        )
    if isinstance(data, (list, tuple)):
        data = ListDataset(data)  # read as a DataLoader reads a list: one item per example
    if isinstance(data, DataLoader):
        refuse_shuffled(data, argument)
        _warn_dropped(data, argument)
        loader = data
    elif isinstance(data, Dataset):
        size = _positive_int(batch_size)
        if size is None:
            raise InvalidArgumentError(
                f"batch_size must be a positive int when {argument} is a Dataset, "
                f"got {batch_size!r}"
            )
        loader_class = TensorRowsLoader if _tensor_rows(data) else DataLoader
        loader = loader_class(data, batch_size=size, shuffle=False)
    else:
        raise ArgumentTypeError(
            f"{argument} must be a torch.utils.data.Dataset, a DataLoader or a list of "
            f"examples, got {type(data).__name__}"
        )
    n = dataset_length(loader)
    if n == 0:
        raise InvalidArgumentError(f"{argument} is empty: there are no examples to score")
    return loader


def _warn_dropped(loader: DataLoader, argument: str) -> None:
    """Warn when a batch sampler with ``drop_last=True`` leaves examples out: the
    loader's batches, not its dataset, are the examples scored (as with a batch sampler
    that picks some).

    That is the DataLoader's own batching (``DataLoader(..., drop_last=True)``) or a
    ``batch_sampler=`` of the user's (``loader.drop_last`` is then ``False``) that batches
    a sampler as torch's :class:`~torch.utils.data.BatchSampler` does: one with a true
    ``drop_last``, a positive ``batch_size`` and a ``sampler`` and ``len()`` that tell
    how many examples it covers. Only lengths are read, never the data or the indices;
    a batch sampler whose length does not fit that batching (a subclass that batches
    otherwise) or whose sampler has no length is not warned about.
    """
    batches = loader.batch_sampler
    if batches is None:  # batch_size=None: the items are yielded as they are
        return
    drop = getattr(batches, "drop_last", False)
    size = _positive_int(getattr(batches, "batch_size", None))
    if not (isinstance(drop, (bool, np.bool_)) and drop) or size is None:
        return
    try:
        n = len(batches.sampler)  # type: ignore[attr-defined]
        kept = len(batches)  # type: ignore[arg-type]
    except (AttributeError, TypeError, NotImplementedError):  # e.g. an IterableDataset
        return
    if kept != n // size:  # it does not batch its sampler as a BatchSampler does
        return
    left = n - kept * size
    if not left:
        return
    own = loader.drop_last and batches.sampler is loader.sampler  # type: ignore[attr-defined]
    if own:
        what, fix = "a DataLoader with drop_last=True", "pass drop_last=False"
    else:
        kind = type(batches).__name__
        what = f"a DataLoader whose batch_sampler is {article(kind)} with drop_last=True"
        fix = f"give the {kind} drop_last=False"
    warn(
        f"{argument} is {what}: its last {count(left, 'example')} (of {n}) are never read, "
        "so they are left out of the results, whose indices are positions among the "
        f"examples it yields; {fix} to include them"
    )


def _positive_int(value: Any) -> int | None:
    """``value`` as an ``int`` when it is a positive integer of any type (``numpy.int64``
    too, not ``bool``), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number >= 1 else None


def _tensor_rows(dataset: Any) -> tuple[tuple[torch.Tensor, ...], Any] | None:
    """``(tensors, row_map)`` when ``dataset``'s items are plain rows of stored tensors.

    True for a ``TensorDataset`` and a ``Subset`` of one (``row_map`` then holds the
    subset's indices; ``None`` means item ``i`` is row ``i``). Subclasses are left alone:
    they may override ``__getitem__``.
    """
    if type(dataset) is TensorDataset:
        return tuple(dataset.tensors), None
    if (
        type(dataset) is Subset
        and type(dataset.dataset) is TensorDataset
        and _row_indices(dataset.indices)
    ):
        return tuple(dataset.dataset.tensors), dataset.indices
    return None


def _row_indices(indices: Any) -> bool:
    """Whether a ``Subset``'s ``indices`` are plain integers, each naming one stored row.

    Anything else (a boolean mask, floats, a 2-D tensor, a ``uint8`` tensor, which
    tensor indexing reads as a mask) is left to the plain DataLoader path, so that it
    gets what indexing the ``TensorDataset`` gives (usually an error) instead of being
    read as row numbers.
    """
    if isinstance(indices, range):
        return True
    if isinstance(indices, torch.Tensor):
        return indices.dim() == 1 and _integer_tensor(indices)
    if isinstance(indices, np.ndarray):
        return indices.ndim == 1 and indices.dtype.kind in "iu"
    return all(type(i) is int or _row_index(i) for i in indices)


def _integer_tensor(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype in (torch.bool, torch.uint8))


def _row_index(i: Any) -> bool:
    if isinstance(i, torch.Tensor):
        return i.dim() == 0 and _integer_tensor(i)
    return isinstance(i, (int, np.integer)) and not isinstance(i, bool)


class TensorRowsLoader(DataLoader):
    """A DataLoader over a ``TensorDataset`` that slices whole batches at once.

    It yields exactly what a plain DataLoader with the default collate function would
    (a list with one freshly allocated, contiguous tensor per stored tensor, rows in the
    sampler's order), but takes a contiguous run of rows as one slice and any other
    index list as one ``index_select``, instead of one ``__getitem__`` per example and
    a stack. That per-example work is most of the data-loading time for small models
    and on GPUs. With worker processes, pinned memory or a custom collate function it
    behaves as a plain DataLoader.
    """

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self.batches()

    def batches(self, layout: MemoryFormatOf | None = None) -> Iterator[Any]:
        """The batches, each sliced tensor copied straight into the layout ``layout`` names.

        Args:
            layout: called with each stored tensor of the model inputs (all but the last,
                which holds the labels by the batch convention), returns the
                ``torch.memory_format`` its batch copy is made in (``None``: every copy
                contiguous, as a plain DataLoader's). A consumer that would convert each
                batch anyway (the gradient engine's channels-last passes) saves a copy per
                batch this way. Labels, batches taken with ``index_select`` and those of
                the plain DataLoader path are contiguous whatever ``layout`` says.
        """
        rows = _tensor_rows(self.dataset)
        if (
            rows is None
            or self.batch_sampler is None
            or self.num_workers > 0
            or self.pin_memory
            or self.collate_fn is not default_collate
        ):
            return super().__iter__()
        return self._slices(*rows, layout)

    def _slices(
        self, tensors: tuple[torch.Tensor, ...], row_map: Any, layout: MemoryFormatOf | None
    ) -> Iterator[Any]:
        assert self.batch_sampler is not None
        n_rows = int(tensors[0].shape[0])
        inputs = tensors[:-1] if layout is not None else ()
        for indices in self.batch_sampler:
            indices = list(indices)
            if row_map is not None:
                indices = [int(row_map[i]) for i in indices]
            given = indices
            indices = [i + n_rows if i < 0 else i for i in indices]
            if indices and not 0 <= min(indices) <= max(indices) < n_rows:
                bad = next(g for g, i in zip(given, indices) if not 0 <= i < n_rows)
                raise IndexError(f"index {bad} is out of range for {n_rows} stored rows")
            first = indices[0] if indices else 0
            stop = first + len(indices)
            if indices == list(range(first, stop)):  # one run of rows (or none): a slice
                # asked batch by batch: the consumer may choose its layout on the first one
                formats = [layout(t) for t in inputs] if layout is not None else []
                formats += [torch.contiguous_format] * (len(tensors) - len(formats))
                yield [t[first:stop].clone(memory_format=f) for t, f in zip(tensors, formats)]
            else:
                picked = torch.as_tensor(indices, dtype=torch.long)
                yield [t.index_select(0, picked.to(t.device)) for t in tensors]


def refuse_shuffled(loader: DataLoader, argument: str) -> None:
    """Raise when ``loader`` draws a new example order on every pass.

    TracIn passes over the data once per checkpoint and adds the scores up column by
    column, so every pass must yield the examples in the same order.

    Raises:
        InvalidArgumentError: naming ``argument``, for a random sampler (the loader's own,
            or the one a ``batch_sampler`` draws its batches from), or a sampler or batch
            sampler that is a one-shot iterator (used up after one pass).
    """
    shuffling = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    batches_from = getattr(loader.batch_sampler, "sampler", None)
    if isinstance(loader.sampler, shuffling) or isinstance(batches_from, shuffling):
        via = " (through its batch_sampler)" if not isinstance(loader.sampler, shuffling) else ""
        raise InvalidArgumentError(
            f"{argument} is a shuffling DataLoader{via}, but every pass must see the examples "
            "in the same order: scores are summed per position over the checkpoints, and the "
            "indices returned are positions in the data. Pass the Dataset itself, or a "
            "DataLoader with shuffle=False (a batch_sampler over a SequentialSampler)"
        )
    for kind in ("batch_sampler", "sampler"):
        given = getattr(loader, kind, None)
        if given is not None and iter(given) is given:
            raise InvalidArgumentError(
                f"{argument}'s {kind} is a one-shot iterator (a generator, say): it is used "
                "up by one pass, but every checkpoint needs a pass over the same examples; "
                "give a list (of index lists, for a batch_sampler) or a Sampler object"
            )


def dataset_length(loader: DataLoader) -> int | None:
    """Number of examples a DataLoader yields, or ``None`` when it cannot be known upfront.

    A ``batch_sampler`` of the user's own (not the DataLoader's batching of its sampler)
    decides which examples come, so its batches of indices are counted (no data is
    loaded); a one-shot iterator of batches cannot be counted without being used up.
    A ``DataLoader(batch_size=None)`` yields its items as they are (whole batches, each
    of any size): its examples are known only by reading them. So are those of an
    ``IterableDataset``: its ``__len__``, if it has one, is only a hint (a stream that
    skips bad records, say), which torch itself does not hold it to.
    """
    if loader.batch_size is None and loader.batch_sampler is None:
        return None
    if isinstance(loader.dataset, IterableDataset):
        return None
    custom = loader.batch_sampler
    if custom is not None and not (
        isinstance(custom, BatchSampler) and custom.sampler is loader.sampler
    ):
        if iter(custom) is custom:
            return None
        return sum(len(indices) for indices in custom)
    try:
        if loader.batch_sampler is not None and getattr(loader, "drop_last", False):
            return len(loader) * int(loader.batch_size or 1)
        if loader.sampler is not None:
            return len(loader.sampler)  # type: ignore[arg-type]
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def count_examples(batches: Iterable[Any], what: str) -> int:
    """Number of examples in one pass over ``batches`` of ``(*model_inputs, label)``.

    For data without a known length (an ``IterableDataset``): the pass only loads and
    splits the batches, without running a model.
    """
    packed_ok = collates_batches(batches)
    return sum(split_batch(b, what, packed_ok).size for b in batches)


def loader_batches(loader: DataLoader) -> int | None:
    """Number of batches a DataLoader yields, or ``None`` when unknown."""
    try:
        return len(loader)
    except TypeError:
        return None


def test_inputs_tuple(inputs: Any, unpack_inputs: bool) -> tuple[Any, ...]:
    """Positional model arguments of a test batch, following ``unpack_inputs``."""
    if unpack_inputs and isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    return (inputs,)


def as_targets(targets: Any) -> Any:
    """The test ``targets`` as given, or as a tensor when they are plain numbers.

    A (nested) list or tuple of Python or NumPy numbers or 0-d tensors (``list(y)`` of a
    label tensor), or a numeric NumPy array, becomes
    ``torch.as_tensor(targets)``, except that integers of any width give an ``int64``
    tensor (class indices, as torch's class losses want; NumPy's default integer is 32
    bits on Windows), floats keep their dtype (Python floats: torch's default) and bools
    stay bool. Tensors, ``None`` and sequences of anything else (tensors, strings: labels
    for a custom loss) are returned unchanged.
    """
    if isinstance(targets, (list, tuple)) and targets and _numbers(targets):
        return _long_if_integer(torch.as_tensor(targets))
    if isinstance(targets, np.ndarray) and targets.dtype.kind in "biuf":
        return _long_if_integer(torch.as_tensor(targets))
    return targets


def _long_if_integer(t: torch.Tensor) -> torch.Tensor:
    integer = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    return t.long() if integer else t


def _numbers(obj: Any) -> bool:
    """Whether ``obj`` is a number (a 0-d real tensor too) or a non-empty (nested)
    list/tuple of numbers only."""
    if isinstance(obj, (list, tuple)):
        return bool(obj) and all(_numbers(o) for o in obj)
    if isinstance(obj, np.generic):
        return obj.dtype.kind in "biuf"
    if isinstance(obj, torch.Tensor):
        return obj.dim() == 0 and not obj.is_complex()
    return isinstance(obj, (int, float))


def test_batches(
    inputs: Any, targets: Any, unpack_inputs: bool
) -> tuple[list[Batch] | DataLoader, bool]:
    """Normalise the test side of ``influence()``.

    ``inputs`` is either one batch of model inputs (with ``targets`` beside it) or a
    DataLoader of ``(*model_inputs, label)`` batches (then ``targets`` must be None).
    The size of a single batch is found as :func:`batch_size_of` says: from the tensors
    in ``inputs`` (also inside tuples, lists and dicts, so ``unpack_inputs=False`` with
    ``model({"x": ..., "mask": ...})`` works), else from ``targets``. Targets that are
    plain numbers are converted by :func:`as_targets`.

    Returns:
        ``(batches, is_loader)``: an iterable of :class:`Batch` and whether it came from
        a DataLoader.
    """
    if isinstance(inputs, DataLoader):
        if targets is not None:
            raise InvalidArgumentError(
                "targets must be None when inputs is a DataLoader: its batches carry "
                "their labels as the last element"
            )
        refuse_shuffled(inputs, "inputs")
        _warn_dropped(inputs, "inputs")
        return inputs, True
    args = test_inputs_tuple(inputs, unpack_inputs)
    if len(args) == 0:
        raise InvalidArgumentError("inputs is an empty tuple: give at least one model input")
    targets = as_targets(targets)
    n_targets: int | None = None
    task_rows: int | None = None
    if targets is not None:
        if isinstance(targets, torch.Tensor) and targets.dim() > 0:
            n_targets = int(targets.shape[0])
        elif isinstance(targets, (list, tuple)):
            n_targets = len(targets)  # one per example, or:
            task_rows = _task_rows(targets)  # several tasks' targets, examples in dim 0
        elif isinstance(targets, torch.Tensor):
            raise ArgumentTypeError(
                f"targets is a 0-dim tensor ({targets.item()!r}): give one target per test "
                "example, with the examples in dim 0 (for a single example, "
                "targets.reshape(1), and inputs with a batch dimension of 1)"
            )
        else:
            raise ArgumentTypeError(
                f"targets must be a tensor with one entry per test example, got "
                f"{type(targets).__name__}"
            )
    # Inputs without any tensor are "of any type" with unpack_inputs=False, or when they
    # hold one string per target (words for a model that tokenizes them, say); then the
    # targets count the examples.
    has_tensors = any(True for a in args for _ in _nested_tensors(a))
    strings = n_targets is not None and has_string_rows(args, n_targets)
    any_type = not has_tensors and (not unpack_inputs or strings)
    try:
        n = batch_size_of(args, targets if has_tensors or any_type else None)
    except BatchFormatError as err:
        datasets = [type(a).__name__ for a in args if isinstance(a, Dataset)]
        if datasets:
            raise BatchFormatError(
                f"inputs is {article(datasets[0])}, a Dataset: give one test batch of model "
                "inputs, or a DataLoader of (*model_inputs, label) test batches, e.g. "
                "DataLoader(inputs, batch_size=64) with targets=None (the labels come "
                "from its batches)"
            ) from None
        if n_targets is None or not any_type:
            raise BatchFormatError(f"inputs: {err}") from None
        n = n_targets  # e.g. a list of strings with a list of labels
    if (
        n_targets is not None
        and n not in (n_targets, task_rows)
        and isinstance(targets, torch.Tensor)
        and has_tensors
        and unpack_inputs
    ):
        # a packed batch (see split_batch): the model output must confirm it
        return [Batch(inputs=args, labels=targets, size=n_targets, packed=True)], False
    if n_targets is not None and n not in (n_targets, task_rows):
        tasks = f" (or {count(task_rows, 'row')} per task)" if task_rows is not None else ""
        raise InvalidArgumentError(
            f"targets has {count(n_targets, 'entry', 'entries')}{tasks} but inputs hold "
            f"{count(n, 'example')} (dim 0 of the first input tensor): give one target per "
            "test example, or for several tasks a tuple of tensors with the examples in dim "
            "0; a single example needs its batch dimension too (x[None], targets of shape (1,))"
        )
    return [Batch(inputs=args, labels=targets, size=n)], False


def labels_inside_hint(inputs: Any) -> str:
    """A hint for a call without targets whose ``inputs`` end with what looks like the
    labels (a tensor of integers, or of one value per example, with as many rows as the
    first input): Captum 0.9 takes the labels inside ``inputs``; this API beside them.
    Empty when nothing suggests it."""
    if not isinstance(inputs, (tuple, list)) or len(inputs) < 2:
        return ""
    first, last = inputs[0], inputs[-1]
    if not (isinstance(first, torch.Tensor) and isinstance(last, torch.Tensor)):
        return ""
    if first.dim() == 0 or last.dim() == 0 or last.shape[0] != first.shape[0]:
        return ""
    integral = not (last.is_floating_point() or last.is_complex())
    if not (integral or last.dim() == 1):
        return ""
    return (
        f". The last of the {len(inputs)} inputs looks like the labels (Captum 0.9 takes "
        "them inside inputs); here they go beside them: influence(inputs[:-1], inputs[-1])"
    )


def _task_rows(targets: list | tuple) -> int | None:
    """The common first dimension of a list or tuple of tensors (the targets of several
    tasks, each with the examples in dim 0), else ``None``."""
    if targets and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in targets):
        rows = {int(t.shape[0]) for t in targets}
        if len(rows) == 1:
            return rows.pop()
    return None


def iter_test_batches(batches: Iterable[Any], is_loader: bool) -> Iterator[Batch]:
    """Yield :class:`Batch` objects from the result of :func:`test_batches`."""
    packed_ok = collates_batches(batches)
    for b in batches:
        yield split_batch(b, "test batch", packed_ok) if is_loader else b


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors (also inside tuples, lists and dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def is_label_list(labels: Any, n: int) -> bool:
    """Whether ``labels`` is a list (or tuple) with one label per example of a batch of
    ``n`` (strings, say), rather than several tasks' tensors with the examples in dim 0:
    such a list is sliced itself, never its items."""
    return isinstance(labels, (list, tuple)) and len(labels) == n and _task_rows(labels) != n


def example_labels(labels: Any, i: int, n: int) -> Any:
    """The labels of example ``i`` of a batch of ``n``, as a batch of one: tensors with a
    row per example sliced (also inside tuples, lists and dicts), a per-example label
    list sliced itself (:func:`is_label_list`), anything else as it is."""
    if is_label_list(labels, n):
        return labels[i : i + 1]
    return map_rows(labels, n, lambda x: x[i : i + 1])


def map_rows(tree: Any, n: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``tree`` with ``fn`` applied to every tensor that holds a row per example of a batch
    of ``n`` (:func:`holds_examples`), also inside tuples, lists and dicts, and the same
    rows taken from a list of one string per example (:func:`string_rows`); anything
    else (a shared mask, a scalar, a string) as it is. Named tuples and dataclasses (a
    model output such as ``Output(logits=...)``) keep their type. One example's rows, a
    chunk of rows and the rows reversed are all taken through here."""
    if holds_examples(tree, n):
        return fn(tree)

    def inner(v: Any) -> Any:
        if string_rows(v, n):
            return type(v)(v[j] for j in fn(torch.arange(n)).tolist())
        return map_rows(v, n, fn)

    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a named tuple
        return type(tree)(*(inner(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(inner(v) for v in tree)
    if _is_dataclass_instance(tree):
        return _dataclass_rows(tree, inner)
    if isinstance(tree, dict):
        return {k: inner(v) for k, v in tree.items()}
    return tree


def _dataclass_rows(tree: Any, inner: Callable[[Any], Any]) -> Any:
    """A copy of dataclass instance ``tree`` with ``inner`` applied to each of its fields,
    also those left out of ``__init__`` and filled in later (``field(init=False)``), and
    to any other attribute set on it. The copy is not made through ``__init__`` (an
    ``InitVar`` needs its value again, a ``__post_init__`` would run again); attributes
    are set as usual (a dict-like output such as a HuggingFace ``ModelOutput`` keeps its
    items in step), and past the guard of a frozen (or otherwise locked) one."""
    out = copy.copy(tree)
    names = [f.name for f in dataclasses.fields(tree)]
    names += [n for n in getattr(tree, "__dict__", {}) if n not in names]
    for name in names:
        if not hasattr(tree, name):  # a field(init=False) never filled in
            continue
        value = inner(getattr(tree, name))
        try:
            setattr(out, name, value)
        except (AttributeError, TypeError):  # frozen, or locked by a __setattr__ of its own
            object.__setattr__(out, name, value)
    return out


def reversed_batch(batch: Batch) -> Batch:
    """``batch`` with its examples in reverse order: every tensor with a row per example
    flipped in dim 0 (also inside tuples, lists and dicts), a per-example label list
    reversed, anything else shared as it is."""
    n = batch.size

    def flip(x: torch.Tensor) -> torch.Tensor:
        return x.flip(0)

    labels = batch.labels
    if is_label_list(labels, n):
        flipped = type(labels)(reversed(labels))
    else:
        flipped = map_rows(labels, n, flip)
    return Batch(inputs=map_rows(batch.inputs, n, flip), labels=flipped, size=n)


def string_rows(x: Any, n: int) -> bool:
    """Whether ``x`` is a tuple or list of ``n`` strings (or bytes), one per example of a
    batch of ``n``: what collating a text field gives, for a model that tokenizes its
    input itself. Only a value *inside* the model inputs counts (:func:`map_rows`): the
    tuple of model inputs itself is never taken for one."""
    return (
        isinstance(x, (tuple, list))
        and n > 0
        and len(x) == n
        and all(isinstance(v, (str, bytes)) for v in x)
    )


def has_string_rows(tree: Any, n: int) -> bool:
    """Whether a :func:`string_rows` value sits inside ``tree`` (tuples, lists, dicts)."""
    if not isinstance(tree, (tuple, list, dict)):
        return False
    items = tree.values() if isinstance(tree, dict) else tree
    return any(string_rows(v, n) or has_string_rows(v, n) for v in items)


def holds_examples(x: Any, n: int) -> bool:
    """Whether ``x`` is a tensor with one row per example of a batch of ``n``: its dim 0
    is ``n``. Any other value (a shared ``(T, T)`` mask, a scalar) is common to all."""
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n


def _may_index_rows(tensors: list[torch.Tensor], n: int) -> bool:
    """Whether some of a batch's input tensors may point into the rows of others, so that
    cutting the batch would break it: an integer tensor whose first dimension is not the
    batch's (the tokens of texts packed for an ``nn.EmbeddingBag``, a graph's edge index
    or its batch vector), or two 1-D integer ones with a row per example (tokens and
    offsets of texts of one token each). Such a batch is run whole, as a packed one; a
    shared float tensor (a table every example uses) does not stop the cut."""

    def integer(t: torch.Tensor) -> bool:
        return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)

    ints = [t for t in tensors if t.dim() > 0 and integer(t)]
    if any(t.shape[0] != n for t in ints):
        return True
    return sum(1 for t in ints if t.dim() == 1) >= 2


def chunk_batch(batch: Batch, size: int) -> list[Batch]:
    """Split a batch into consecutive batches of at most ``size`` examples.

    Tensors whose first dimension is the batch size are sliced, also inside tuples,
    lists and dicts, and so are labels given as a list with one entry per example;
    everything else is passed to every chunk unchanged; a list of one string per example
    is cut like a tensor (:func:`string_rows`). A batch whose model inputs hold neither
    (inputs of another kind, whose examples cannot be told apart here) is not split, nor
    is one with an input that may index another's rows (:func:`_may_index_rows`).
    """
    if batch.size <= size or batch.packed:  # a packed batch is run whole
        return [batch]
    tensors = [t for item in batch.inputs for t in _nested_tensors(item)]
    if not any(holds_examples(t, batch.size) for t in tensors) and not has_string_rows(
        batch.inputs, batch.size
    ):
        return [batch]
    if _may_index_rows(tensors, batch.size):
        return [batch]

    def part(x: Any, start: int) -> Any:
        return map_rows(x, batch.size, lambda t: t[start : start + size])

    labels = batch.labels
    per_example = is_label_list(labels, batch.size)
    return [
        Batch(
            inputs=part(batch.inputs, s),
            labels=labels[s : s + size] if per_example else part(labels, s),
            size=min(size, batch.size - s),
        )
        for s in range(0, batch.size, size)
    ]


def is_image(a: object) -> bool:
    """Whether ``a`` is a tensor a channels-last pass lays out anew: 4-D floating point."""
    return isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point()


def channels_last_only(a: torch.Tensor) -> bool:
    """Whether ``a`` is laid out channels-last (and so not also in the standard layout)."""
    return not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last)


def in_channels_last(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with their image tensors channels-last (those already so are not copied)."""
    return tuple(
        a.contiguous(memory_format=torch.channels_last) if is_image(a) else a for a in args
    )


def copy_layout(channels_last: bool) -> MemoryFormatOf:
    """The memory format of batch copies: channels-last for images if asked, else contiguous."""

    def layout(t: torch.Tensor) -> torch.memory_format:
        return torch.channels_last if channels_last and is_image(t) else torch.contiguous_format

    return layout


def unshared(moved: Any, given: Any, layout: MemoryFormatOf | None = None) -> Any:
    """``moved`` (``given`` after :func:`to_device`) with the tensors it still shares with
    ``given`` replaced by copies, made in the memory format ``layout`` names (contiguous
    without one); tensors the move already copied are kept as they are.

    For batches the caller holds on to and that are used again (a test batch goes through
    the model once per checkpoint): a model that edits its input in place then changes a
    copy, not the caller's tensor and not what the next checkpoint sees.
    """
    if isinstance(moved, torch.Tensor):
        if moved is not given:
            return moved
        return moved.clone(
            memory_format=torch.contiguous_format if layout is None else layout(moved)
        )
    if isinstance(moved, tuple):
        return tuple(unshared(m, g, layout) for m, g in zip(moved, given))
    if isinstance(moved, list):
        return [unshared(m, g, layout) for m, g in zip(moved, given)]
    if isinstance(moved, dict):
        return {k: unshared(v, given[k], layout) for k, v in moved.items()}
    return moved


def copy_batch(batch: Batch) -> Batch:
    """``batch`` with every tensor (inside tuples, lists and dicts too) cloned, in its layout.

    For a batch the model is run on more than once: each run gets its own copy, so a model
    that edits its input in place sees the same input every time.
    """

    def same(t: torch.Tensor) -> torch.memory_format:
        return torch.preserve_format

    return Batch(
        inputs=unshared(batch.inputs, batch.inputs, same),
        labels=unshared(batch.labels, batch.labels, same),
        size=batch.size,
        packed=batch.packed,
    )


def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    """A copy of ``batch`` with its tensors on ``device``."""
    return Batch(
        inputs=to_device(batch.inputs, device),
        labels=to_device(batch.labels, device),
        size=batch.size,
        packed=batch.packed,
    )
