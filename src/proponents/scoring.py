"""The TracIn loops: checkpoints outside, batches inside, scores accumulated.

For every checkpoint ``c`` with learning rate ``lr_c`` the model is loaded once,
the test side is differentiated once, and each training batch contributes
``lr_c * <grad test_i, grad train_j>`` to its columns of the score matrix. Only
one training batch's gradients are alive at a time, so memory is bounded by the
batch size and the score matrix itself (``4 * n_test * n_train`` bytes in float32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from proponents.checkpoints import checkpoint_label, learning_rate_from_load_func
from proponents.data import (
    Batch,
    TensorRowsLoader,
    batch_to_device,
    chunk_batch,
    collated,
    collates_batches,
    dataset_length,
    model_device,
    repeatable_pass,
    split_batch,
    unshared,
)
from proponents.distributed import finite_first_order
from proponents.errors import CheckpointLoadError, InvalidArgumentError, ProponentsError, count
from proponents.gradients.engine import GradientEngine
from proponents.gradients.representations import DenseGrads, widened
from proponents.model_guard import GlobalRandomState
from proponents.progress import Progress
from proponents.user_warnings import warn


def load_checkpoint(
    model: nn.Module, load_func: Callable[..., Any], ckpt: Any, index: int, owner: str
) -> float:
    """Load ``ckpt`` into ``model`` with the user's function; return its learning rate."""
    try:
        lr = load_func(model, ckpt)
    except ProponentsError:
        raise
    except Exception as err:
        raise CheckpointLoadError(
            f"{owner}: loading {checkpoint_label(ckpt, index)} failed: {type(err).__name__}: {err}"
        ) from err
    model.eval()
    return learning_rate_from_load_func(lr, checkpoint_label(ckpt, index), owner)


class NonFiniteTracker:
    """Collects examples with non-finite gradients and warns once, naming them.

    Indices are positions in the data the tracker's caller iterated over. When that is
    one rank's shard of the training set, the rank's call runs inside
    :func:`deferred_nonfinite`: :meth:`warn` then hands the indices to it instead of
    warning, and the distributed layer (which knows every shard's offset once the ranks
    have exchanged their sizes) warns on every rank with dataset positions.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.train: set[int] = set()
        self.test: set[int] = set()

    def add(self, mask: Tensor, offset: int, test: bool) -> None:
        bad = (~mask).nonzero().flatten()
        if bad.numel():
            (self.test if test else self.train).update(int(i) + offset for i in bad)

    def warn(self) -> None:
        deferred = _DEFERRED.get()
        if deferred is not None:
            deferred.append(self)
            return
        parts = []
        for what, idx in (("training", self.train), ("test", self.test)):
            if idx:
                shown = sorted(idx)[:10]
                more = f" and {len(idx) - 10} more" if len(idx) > 10 else ""
                parts.append(f"{what} examples {shown}{more}")
        if parts:
            warn(
                f"{self.owner}: non-finite loss, gradient or score for "
                + "; ".join(parts)
                + ". Their scores are non-finite and rank last among proponents and "
                "opponents; all other scores are unaffected. Usual causes: a NaN or "
                "infinite value in the example's inputs or labels, an example whose labels "
                "are all ignored (the undefined loss 0/0 under reduction='mean'), or a "
                "product too large for the dtype",
                RuntimeWarning,
            )


#: Trackers whose warning is held back (see :func:`deferred_nonfinite`), or ``None``.
_DEFERRED: ContextVar[list[NonFiniteTracker] | None] = ContextVar(
    "proponents_deferred_nonfinite", default=None
)


@contextmanager
def deferred_nonfinite() -> Iterator[list[NonFiniteTracker]]:
    """Hold back the non-finite warnings of the trackers that warn inside this block.

    Yields the list that receives them (with their indices as the trackers collected
    them), for the caller to shift to dataset positions and report with
    :func:`report_nonfinite`.
    """
    held: list[NonFiniteTracker] = []
    token = _DEFERRED.set(held)
    try:
        yield held
    finally:
        _DEFERRED.reset(token)


def report_nonfinite(reports: Iterable[tuple[str, Iterable[int], Iterable[int]]]) -> None:
    """Warn once per owner about ``(owner, training indices, test indices)`` reports
    (several reports of one owner are merged), as :meth:`NonFiniteTracker.warn` does."""
    merged: dict[str, NonFiniteTracker] = {}
    for owner, train, test in reports:
        tracker = merged.setdefault(owner, NonFiniteTracker(owner))
        tracker.train.update(int(i) for i in train)
        tracker.test.update(int(i) for i in test)
    for tracker in merged.values():
        tracker.warn()


class TracInRunner:
    """Runs the checkpoint/batch loops of a TracIn method over a gradient engine.

    Args:
        model: the user's model (the caller guards and restores it).
        engine: the per-example gradient engine.
        checkpoints: resolved checkpoints (paths or loaded objects).
        load_func: ``load_func(model, checkpoint) -> learning rate``.
        owner: class name for progress bars and messages.
    """

    def __init__(
        self,
        model: nn.Module,
        engine: GradientEngine,
        checkpoints: Sequence[Any],
        load_func: Callable[..., Any],
        owner: str,
    ):
        self.model = model
        self.engine = engine
        self.checkpoints = checkpoints
        self.load_func = load_func
        self.owner = owner
        # Every pass over a DataLoader starts from the generators as they were when the
        # call began, so random augmentations and shuffled worker seeds are the same at
        # every checkpoint: each example is scored as one input, not a new draw per pass.
        self.generators = GlobalRandomState(model_device(model))
        # and so does a DataLoader's own generator (its worker seeds come from it): the
        # state each loader's first pass began from (the loader kept, so the id stays its)
        self._loader_starts: dict[int, tuple[DataLoader, Tensor]] = {}

    def each_checkpoint(self, bar: Progress, what: str) -> Iterator[tuple[int, float]]:
        """Load each checkpoint in turn (once) and yield ``(index, learning_rate)``."""
        n_ckpt = len(self.checkpoints)
        for c, ckpt in enumerate(self.checkpoints):
            lr = load_checkpoint(self.model, self.load_func, ckpt, c, self.owner)
            bar.set_description(f"{self.owner}: {what}, checkpoint {c + 1}/{n_ckpt}")
            yield c, lr

    def _batches(
        self,
        source: Iterable[Any],
        loader: bool,
        what: str,
        chunk: int | None = None,
        batch_done: Callable[[], None] | None = None,
    ) -> Iterable[Batch]:
        """Batches on the model's device; test batches larger than ``chunk`` are split.

        A DataLoader collates fresh tensors on every pass. Batches given as such (the test
        batch, a single ``inputs_dataset`` batch) are the caller's tensors, used again at
        every checkpoint: they are copied for each pass (by the move to the model's device
        if that copies, else here, in the engine's layout), so a model that edits its input
        in place cannot change them or what the next checkpoint sees.

        ``batch_done`` is called once the last piece of each batch has been used (a
        progress bar counts batches, however many pieces they are split into).
        """
        device = model_device(self.model)
        fresh = isinstance(source, DataLoader)
        collates = collates_batches(source)
        generator = source.generator if isinstance(source, DataLoader) else None
        start = None
        if generator is not None:
            first = (cast(DataLoader, source), generator.get_state())
            start = self._loader_starts.setdefault(id(source), first)
            generator.set_state(start[1])
        if isinstance(source, TensorRowsLoader):
            # its batch copies are made in the layout the engine converts them to anyway
            source = source.batches(self.engine.input_layout)
        elif isinstance(source, DataLoader):
            source = repeatable_pass(source)
        if fresh:
            self.generators.restore()
        try:
            for b in collated(source, what) if fresh else source:
                batch = split_batch(b, what, collates) if loader else b
                for part in chunk_batch(batch, chunk) if chunk else [batch]:
                    moved = batch_to_device(part, device)
                    if not fresh:
                        moved = Batch(
                            inputs=unshared(moved.inputs, part.inputs, self.engine.input_layout),
                            labels=unshared(moved.labels, part.labels),
                            size=moved.size,
                            packed=moved.packed,
                        )
                    yield moved
                if batch_done is not None:
                    batch_done()
        finally:
            if generator is not None and start is not None:
                generator.set_state(start[1])  # the call leaves the loader's generator as it was

    def scores(
        self,
        test: Iterable[Any],
        test_is_loader: bool,
        train: Iterable[Any],
        n_train_batches: int | None,
        n_test_batches: int | None,
        aggregate: bool,
        show_progress: bool,
        n_train: int | None = None,
        test_chunk: int = 256,
    ) -> Tensor:
        """Influence of every training example on every test example (or their sum).

        Args:
            n_train: number of training examples when known upfront (the score matrix is
                then allocated once instead of being joined after the first checkpoint).
            test_chunk: test batches are differentiated in pieces of at most this many
                examples, so a large test batch does not hold all its activations at once.
        """
        n_ckpt = len(self.checkpoints)
        # the bar counts test and training batches; unknown when either count is (a loader
        # over an IterableDataset has no length)
        total = None
        if n_train_batches is not None and n_test_batches is not None:
            total = (n_train_batches + n_test_batches) * n_ckpt
        tracker = NonFiniteTracker(self.owner)
        scores: Tensor | None = None
        dtype: torch.dtype | None = None
        with Progress(show_progress, f"{self.owner}: influence", total) as bar:
            for c, lr in self.each_checkpoint(bar, "influence"):
                if not self.engine.checked_on_several:
                    self._prepare(train)
                test_rep = self._test_side(
                    test, test_is_loader, test_chunk, aggregate, tracker if c == 0 else None, bar
                )
                epoch = self.engine.epoch
                bar.set_description(
                    f"{self.owner}: influence, checkpoint {c + 1}/{n_ckpt}, training batches"
                )
                columns, offset = [], 0
                for batch in self._batches(train, True, "training batch"):
                    rep = self.engine.compute(batch)
                    if self.engine.epoch != epoch:
                        # a check on this batch changed the strategies: the test side's
                        # representations no longer line up with this batch's
                        test_rep = self._test_side(test, test_is_loader, test_chunk, aggregate)
                        epoch = self.engine.epoch
                    block = self.engine.dot(test_rep, rep).mul_(lr)
                    dtype = dtype or self.engine.result_dtype(rep)
                    if scores is None and n_train is not None:
                        scores = block.new_zeros(block.shape[0], n_train)
                    if c == 0:
                        tracker.add(self._train_finite(test_rep, rep, block), offset, test=False)
                    if scores is None:
                        columns.append(block)
                    else:
                        _check_columns(scores, offset + batch.size, self.owner)
                        scores[:, offset : offset + batch.size] += block
                    offset += batch.size
                    bar.update()
                if scores is None:
                    if not columns:
                        raise InvalidArgumentError(
                            f"{self.owner}: the training data yielded no batch"
                        )
                    scores = torch.cat(columns, dim=1)
                    del columns
                elif offset != scores.shape[1]:
                    raise InvalidArgumentError(
                        f"{self.owner}: the training data yielded {count(offset, 'example')} "
                        f"for checkpoint {c + 1} but {scores.shape[1]} for the first; it must "
                        "yield the same examples in the same order every time"
                    )
        assert scores is not None and dtype is not None
        scores = _narrowed(scores, dtype, tracker, dim=0)
        tracker.warn()
        return scores

    def _train_finite(self, test_rep: list, rep: list, block: Tensor) -> Tensor:
        """``(B,)``: training examples of a block with finite gradients whose scores with
        every finite test example are finite (a non-finite test example does not make
        the training examples it meets non-finite; it is reported on its own)."""
        columns = torch.isfinite(block).all(dim=0)
        if bool(columns.all()):  # the usual case: nothing to tell apart
            return columns
        ok = self.engine.finite(rep)
        rows = self.engine.finite(test_rep)
        return ok & torch.isfinite(block[rows.to(block.device)]).all(dim=0).to(ok.device)

    def _prepare(self, train: Iterable[Any]) -> None:
        """Let the engine verify its strategies on the first training batch.

        In score mode the test side comes first and is kept for the whole checkpoint; a
        test batch of one example cannot show examples interacting inside a batch, so the
        strategies are settled on a training batch before it is differentiated.
        """
        for batch in self._batches(train, True, "training batch"):
            self.engine.prepare(batch)
            break

    def _test_side(
        self,
        test: Iterable[Any],
        test_is_loader: bool,
        chunk: int,
        aggregate: bool,
        tracker: NonFiniteTracker | None = None,
        bar: Progress | None = None,
    ) -> list:
        """The test batches' representations, joined (or summed, for ``aggregate``).

        With ``aggregate`` each batch is summed as it comes, so only one row per parameter
        group is kept however many test examples there are. Computed again (once) when a
        check on a later test batch changed the strategies.
        """
        epoch = self.engine.epoch
        parts, offset = [], 0
        summed: list | None = None
        done = None if bar is None else bar.update
        for batch in self._batches(test, test_is_loader, "test batch", chunk, done):
            rep = self.engine.compute(batch)
            if tracker is not None:
                tracker.add(self.engine.finite(rep), offset, test=True)
            offset += batch.size
            if aggregate:
                rows = [widened(r) for r in self.engine.sum_examples(rep)]
                summed = rows if summed is None else _added(summed, rows)
            else:
                parts.append(rep)
        if not parts and summed is None:
            raise InvalidArgumentError(f"{self.owner}: the test inputs hold no batch")
        if self.engine.epoch != epoch:
            return self._test_side(test, test_is_loader, chunk, aggregate)
        return summed if summed is not None else self.engine.concat(parts)

    def self_scores(
        self,
        data: Iterable[Any],
        n_batches: int | None,
        show_progress: bool,
        what: str,
        chunk: int | None = None,
    ) -> Tensor:
        """Self-influence ``sum_c lr_c * ||grad_c(x)||^2`` of every example in ``data``
        (batches of more than ``chunk`` examples taken in pieces)."""
        n_ckpt = len(self.checkpoints)
        total = None if n_batches is None else n_batches * n_ckpt
        tracker = NonFiniteTracker(self.owner)
        result: Tensor | None = None
        dtype: torch.dtype | None = None
        # With a known number of examples every batch's values go straight into one
        # vector: small per-batch results kept alive between the batches' large
        # temporaries fragment the heap (about 50 bytes an example, 13 times the result).
        n = dataset_length(data) if isinstance(data, DataLoader) else None
        with Progress(show_progress, f"{self.owner}: self-influence", total) as bar:
            for c, lr in self.each_checkpoint(bar, f"self-influence of {what}"):
                parts, offset = [], 0
                pieces = self._batches(data, True, "batch", chunk=chunk, batch_done=bar.update)
                for batch in pieces:
                    rep = self.engine.compute(batch)
                    dtype = dtype or self.engine.result_dtype(rep)
                    values = self.engine.sq_norm(rep).mul_(lr)
                    if c == 0:
                        tracker.add(torch.isfinite(values), offset, test=False)
                    if n is not None:
                        if result is None:
                            result = values.new_zeros(n)
                        if offset + batch.size > n:
                            raise InvalidArgumentError(
                                f"{self.owner}: the data yielded more than "
                                f"{count(n, 'example')} for checkpoint {c + 1}, its length; it "
                                "must yield the same examples in the same order every time"
                            )
                        result[offset : offset + batch.size] += values
                    else:
                        parts.append(values)
                    offset += batch.size
                if n is not None and result is not None:
                    if offset != n:
                        raise InvalidArgumentError(
                            f"{self.owner}: the data yielded {count(offset, 'example')} for "
                            f"checkpoint {c + 1} but its length is {n}; it must yield the "
                            "same examples in the same order every time"
                        )
                    continue
                if not parts:
                    raise InvalidArgumentError(f"{self.owner}: the data yielded no batch")
                values = torch.cat(parts)
                if result is None:
                    result = values
                elif values.shape != result.shape:
                    raise InvalidArgumentError(
                        f"{self.owner}: the data yielded {count(values.numel(), 'example')} "
                        f"for checkpoint {c + 1} but {result.numel()} for the first; it must "
                        "yield the same examples in the same order every time"
                    )
                else:
                    result += values
        assert result is not None and dtype is not None
        result = _narrowed(result, dtype, tracker)
        tracker.warn()
        return result


def _narrowed(
    scores: Tensor, dtype: torch.dtype, tracker: NonFiniteTracker, dim: int | None = None
) -> Tensor:
    """Scores summed in float32 for a 16-bit model, returned in the model's dtype; the
    training examples whose scores only the cast makes infinite are reported too."""
    if scores.dtype == dtype:
        return scores
    narrow = scores.to(dtype)
    lost = torch.isfinite(scores) & ~torch.isfinite(narrow)
    if dim is not None:
        lost = lost.any(dim=dim)
    tracker.add(~lost, 0, test=False)
    return narrow


def _added(total: list, rows: list) -> list:
    """Sums of two lists of one-row dense representations, group by group."""
    return [DenseGrads(a.grads + b.grads) for a, b in zip(total, rows)]


def _check_columns(scores: Tensor, end: int, owner: str) -> None:
    if end > scores.shape[1]:
        raise InvalidArgumentError(
            f"{owner}: the training data yielded more examples for a later checkpoint than "
            f"for the first ({scores.shape[1]}); it must yield the same examples every time"
        )


#: Scores ranked at once by :func:`k_most`: its temporaries (keys, a sort's values and
#: indices) are a few times this many entries, not a few times the whole score matrix.
_RANK_BLOCK_ENTRIES = 1 << 20


def k_most(scores: Tensor, k: int, proponents: bool) -> tuple[Tensor, Tensor]:
    """Indices and scores of the ``k`` highest (proponents) or lowest (opponents) scores.

    Ties keep dataset order; non-finite scores are ranked last. The same answer as the
    first ``k`` of a stable sort of each row by :func:`finite_first_order`, computed a
    block of rows at a time, and with :func:`torch.topk` where ``k`` is a small part of
    a row.
    """
    n, m = int(scores.shape[0]), int(scores.shape[1])
    k = min(k, m)
    order = torch.empty(n, k, dtype=torch.long, device=scores.device)
    step = max(1, _RANK_BLOCK_ENTRIES // max(1, m))
    for start in range(0, n, step):
        order[start : start + step] = _top_columns(scores[start : start + step], k, proponents)
    return order, scores.gather(1, order)


def _top_columns(block: Tensor, k: int, proponents: bool) -> Tensor:
    """``(rows, k)`` columns of the first ``k`` of each row of ``block`` in the stable
    order of :func:`finite_first_order`."""
    key = finite_first_order(proponents).key(block)
    if 4 * k >= key.shape[1]:  # most of the row: one stable sort is cheaper
        return torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    values, columns = key.topk(k, dim=1)
    # topk leaves open which of equal keys it keeps at the cut-off: a row whose k-th key
    # equals one left out is sorted whole, so the smaller columns win
    kth = values[:, -1:]
    cut = ((key == kth).sum(dim=1) != (values == kth).sum(dim=1)).nonzero().flatten()
    if cut.numel():
        columns[cut] = torch.sort(key[cut], dim=1, descending=True, stable=True).indices[:, :k]
        values[cut] = key[cut].gather(1, columns[cut])
    # equal keys among the k in column order: by column, then stably by key
    by_column = torch.sort(columns, dim=1).indices
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_key = torch.sort(values, dim=1, descending=True, stable=True).indices
    return columns.gather(1, by_key)
