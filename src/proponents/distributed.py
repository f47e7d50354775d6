"""Sharding the training set over ``torch.distributed`` ranks and combining the results.

When a process group is initialised (``torchrun`` + ``init_process_group``) or
``distributed=True`` is passed, every rank reads only a contiguous range of the training
DataLoader's batches (the same batches a single process would form, so the scores are the
same numbers), and the per-rank results are combined with torch.distributed collectives so
that every rank returns the single-process answer:

* score matrices: each rank's ``(n_test, n_shard)`` columns, gathered in rank order, which is
  dataset order;
* k most influential: each rank's own top ``k`` (with global indices), gathered and merged
  by the same ordering rule as one process (score, then dataset index);
* self-influence and embeddings: gathered in rank order.

Every distributed call first lets the ranks compute, then exchanges a small status record
(``all_gather_object``) before any tensor is moved: when one rank raised, every other rank
raises :class:`DistributedError` naming that rank and its error, instead of waiting in a
collective for data that never comes. A rank that dies (killed, out of memory) cannot
report; then the process group's ``timeout`` (``init_process_group(timeout=...)``) or
``torchrun``'s worker supervision ends the others.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from proponents.data import TensorRowsLoader
from proponents.errors import ArgumentTypeError, InvalidArgumentError, ProponentsError

__all__ = ["DistributedContext", "DistributedError", "resolve_distributed", "shard_loader"]


class DistributedError(ProponentsError, RuntimeError):
    """Ranks disagree on their inputs, or another rank failed during a distributed call."""


def resolve_distributed(distributed: Any, owner: str) -> DistributedContext | None:
    """The process group to shard over, or ``None`` to work in this process alone.

    Args:
        distributed: ``None`` (use an initialised process group with more than one rank
            when there is one), ``True`` (require one) or ``False`` (never shard).
        owner: class name for messages.

    Raises:
        ArgumentTypeError: when ``distributed`` is not None or a bool.
        InvalidArgumentError: ``distributed=True`` without an initialised process group.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise ArgumentTypeError(
            f"{owner}: distributed must be None (automatic), True or False, got {distributed!r}"
        )
    if distributed is False:
        return None
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not available:
        if distributed:
            raise InvalidArgumentError(
                f"{owner}: distributed=True, but no torch.distributed process group is "
                "initialised; call torch.distributed.init_process_group() first (torchrun "
                "sets the environment it reads), or pass distributed=None/False"
            )
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    return DistributedContext()


def _check_splittable(loader: DataLoader, argument: str) -> None:
    """Raise naming ``argument`` when ``loader``'s batches cannot be split over ranks."""
    if isinstance(loader.dataset, IterableDataset):
        raise InvalidArgumentError(
            f"{argument} is a DataLoader over an IterableDataset, which cannot be split "
            "into per-rank ranges; pass a map-style Dataset, or distributed=False"
        )


def _batches_of(loader: DataLoader, argument: str) -> tuple[list[list[int]], bool]:
    """The index lists of the loader's batches and whether it batches automatically."""
    _check_splittable(loader, argument)
    if loader.batch_sampler is not None:
        return [list(b) for b in loader.batch_sampler], True
    return [[i] for i in loader.sampler], False  # batch_size=None: every item is a batch


def shard_loader(loader: DataLoader, rank: int, world_size: int, argument: str) -> DataLoader:
    """A DataLoader over rank ``rank``'s contiguous range of ``loader``'s batches.

    The batches are exactly those ``loader`` forms (same indices, same collate function
    and worker settings); rank ``r`` gets batches ``[r * B // W, (r + 1) * B // W)``.
    Only those examples are ever read. A rank may get no batch when there are fewer
    batches than ranks.
    """
    batches, auto = _batches_of(loader, argument)
    lo = rank * len(batches) // world_size
    hi = (rank + 1) * len(batches) // world_size
    mine = batches[lo:hi]
    kwargs: dict[str, Any] = dict(
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if auto:
        # keep the batch-slicing loader of a TensorDataset (a user's subclass may take
        # other constructor arguments, so only our own class is rebuilt as itself)
        cls = TensorRowsLoader if type(loader) is TensorRowsLoader else DataLoader
        return cls(loader.dataset, batch_sampler=mine, **kwargs)
    return DataLoader(loader.dataset, batch_size=None, sampler=[b[0] for b in mine], **kwargs)


def shard_size(loader: DataLoader) -> int | None:
    """Examples in a shard made by :func:`shard_loader` (None when items are whole batches)."""
    if loader.batch_sampler is not None:
        return sum(len(b) for b in loader.batch_sampler)
    return None


@dataclass
class _Status:
    ok: bool
    message: str = ""
    shape: tuple[int, ...] | None = None  # None: this rank has nothing to contribute
    dtype: str = ""
    # the non-finite reports held back on this rank: (owner, training rows of its
    # shard, test rows), made dataset positions once every rank's size is known
    nonfinite: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    # what the caller's ``notes`` gave on this rank (small and picklable)
    notes: Any = None
    # the call's arguments that every rank must give alike (see DistributedContext.run)
    call: dict[str, Any] = field(default_factory=dict)


class DistributedContext:
    """The default process group: rank, world size and the collectives used here."""

    def __init__(self) -> None:
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        backend = str(torch.distributed.get_backend())
        self.comm_device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    # -- agreement ---------------------------------------------------------------------
    def agree(self, owner: str, facts: dict[str, Any]) -> None:
        """Raise the same :class:`DistributedError` on every rank when ``facts`` differ.

        Args:
            owner: class name for messages.
            facts: what must be equal on every rank (dataset length, checkpoint
                fingerprints, ...), keyed by a readable name.
        """
        self.agree_on(owner, lambda: facts)

    def agree_on(self, owner: str, facts: Callable[[], dict[str, Any]]) -> None:
        """:meth:`agree` on what ``facts()`` finds on each rank, computed here.

        A rank whose ``facts()`` raises (a checkpoint folder missing on its machine, a
        file it cannot read) raises that error once the ranks have met, and every other
        rank a :class:`DistributedError` naming it: none is left waiting for the rank
        that failed.
        """
        error: Exception | None = None
        try:
            local: dict[str, Any] | str = facts()
        except Exception as err:  # reported to the other ranks, then re-raised
            error, local = err, f"{type(err).__name__}: {err}"
        every: list[Any] = [None] * self.world_size
        # a rank's facts, or the text of its error (facts are always a dict)
        torch.distributed.all_gather_object(every, local)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(every) if isinstance(m, str)]
        if failed:
            shown = "; ".join(f"rank {r} failed with {m}" for r, m in failed)
            raise DistributedError(f"{owner}: {shown}")
        problems = _differences(every)
        if problems:
            raise DistributedError(
                f"{owner}: the {self.world_size} ranks must agree on "
                + ", ".join(every[0])
                + ", but "
                + "; ".join(problems)
            )

    # -- running and exchanging status ----------------------------------------------------
    def run(
        self,
        owner: str,
        compute: Callable[[], Any],
        rows_dim: int | None = None,
        notes: Callable[[], Any] | None = None,
        call: dict[str, Any] | None = None,
    ) -> tuple[Any, list[_Status]]:
        """Run this rank's part, then tell every rank how every other rank fared.

        The non-finite warnings of ``compute`` (see
        :class:`~proponents.scoring.NonFiniteTracker`) are held back and travel with the
        status: after the exchange every rank gives the same warning, with the training
        rows of each rank's shard shifted by the examples of the ranks before it (its
        offset in the dataset, counted along ``rows_dim`` of the ranks' tensors). Test
        rows are not shifted: every rank computes the whole test side.

        Args:
            owner: class name for messages.
            compute: this rank's work; returns a tensor (to be gathered later) or ``None``
                when the rank has nothing to contribute.
            rows_dim: the dimension of the result that indexes this rank's training
                examples, or ``None`` when it does not (its training rows are then
                reported as they are).
            notes: called once ``compute`` has succeeded; what it returns (small and
                picklable) travels with the status, as ``status.notes``.
            call: the call's arguments that every rank must give alike (``k``, say),
                keyed by a readable name; compared once every rank has reported.

        Returns:
            ``(local_result, statuses)``: statuses hold every rank's tensor shape and dtype
            (and notes).

        Raises:
            The local exception on a rank that failed, and :class:`DistributedError` naming
            the failed rank(s) and their errors on the others; :class:`DistributedError` on
            every rank when the ranks gave different ``call`` arguments.
        """
        from proponents.scoring import deferred_nonfinite

        error: Exception | None = None
        local = None
        call = dict(call or {})
        try:
            with deferred_nonfinite() as held:
                local = compute()
            status = _Status(
                True,
                nonfinite=[(t.owner, sorted(t.train), sorted(t.test)) for t in held],
                notes=None if notes is None else notes(),
                call=call,
            )
            described = local[1] if isinstance(local, tuple) else local
            if isinstance(described, Tensor):
                status.shape = tuple(described.shape)
                status.dtype = str(described.dtype).removeprefix("torch.")
        except Exception as err:  # reported to the other ranks, then re-raised
            error = err
            status = _Status(False, f"{type(err).__name__}: {err}", call=call)
        every: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(every, status)
        if error is not None:
            raise error
        failed = [(r, s.message) for r, s in enumerate(every) if not s.ok]
        if failed:
            shown = "; ".join(f"rank {r} failed with {m}" for r, m in failed)
            raise DistributedError(f"{owner}: {shown}")
        problems = _differences([s.call for s in every])
        if problems:
            raise DistributedError(
                f"{owner}: the {self.world_size} ranks must make each call with the same "
                "arguments, but " + "; ".join(problems)
            )
        self._report_nonfinite(every, rows_dim)
        return local, every

    def _report_nonfinite(self, every: Sequence[_Status], rows_dim: int | None) -> None:
        """Give every rank's held-back non-finite reports, in dataset positions, as one
        warning per owner (the same on every rank)."""
        from proponents.scoring import report_nonfinite

        if not any(s.nonfinite for s in every):
            return
        offsets = (
            _offsets(self.sizes(every, rows_dim)) if rows_dim is not None else [0] * len(every)
        )
        report_nonfinite(
            (owner, [i + offset for i in train], test)
            for status, offset in zip(every, offsets, strict=True)
            for owner, train, test in status.nonfinite
        )

    def same_shapes(self, owner: str, every: Sequence[_Status], dim: int) -> None:
        """Raise :class:`DistributedError` on every rank when the ranks' tensors differ in
        a dimension other than ``dim`` (different test inputs, say), before ``all_gather``
        is given tensors of different shapes."""
        shapes = [s.shape for s in every]
        given = [list(s) for s in shapes if s is not None]
        for s in given:
            s[dim] = -1  # the dimension the ranks split
        if any(s != given[0] for s in given[1:]):
            shown = ", ".join(
                f"rank {r}: {tuple(s)}" for r, s in enumerate(shapes) if s is not None
            )
            raise DistributedError(
                f"{owner}: the ranks' results differ in shape beyond the dimension they "
                f"split ({shown}); every rank must pass the same inputs and arguments"
            )

    def sizes(self, every: Sequence[_Status], dim: int) -> list[int]:
        """Every rank's size along ``dim`` (0 for a rank without a tensor)."""
        return [0 if s.shape is None else s.shape[dim] for s in every]

    def gather(
        self, local: Tensor | None, every: Sequence[_Status], dim: int, device: torch.device
    ) -> Tensor:
        """Concatenate every rank's tensor along ``dim`` in rank order, on every rank.

        Tensors of different sizes along ``dim`` are padded to the largest for
        ``all_gather`` and trimmed afterwards; a rank without a tensor contributes an
        empty one. All other dimensions must agree.

        Args:
            local: this rank's tensor (``None``: nothing).
            every: the statuses returned by :meth:`run` for that tensor.
            dim: the dimension to concatenate along.
            device: where the result is returned.
        """
        template = next((s for s in every if s.shape is not None), None)
        if template is None or template.shape is None:
            raise DistributedError("no rank produced a result to gather")
        dtype = getattr(torch, template.dtype)
        sizes = self.sizes(every, dim)
        largest = max(sizes)
        if local is None:
            shape = list(template.shape)
            shape[dim] = 0
            local = torch.zeros(shape, dtype=dtype)
        padded = _pad(local.to(self.comm_device, dtype), largest, dim)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded.contiguous())
        trimmed = [p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)]
        return torch.cat(trimmed, dim=dim).to(device)

    # -- results ---------------------------------------------------------------------------
    def score_columns(
        self,
        owner: str,
        compute: Callable[[], Any],
        k: int | None,
        top_k: Callable[[Tensor, int], tuple[Tensor, Tensor]] | None,
        merge_order: Callable[[Tensor], Tensor],
        device: torch.device,
        notes: Callable[[], Any] | None = None,
        read_notes: Callable[[list[Any]], None] | None = None,
        k_name: str = "k",
        call: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Scores of this rank's training columns, combined over ranks.

        Args:
            owner: class name for messages.
            compute: this rank's ``(n_test, n_shard)`` scores, or ``None`` for no columns;
                with ``top_k=None`` and an int ``k``, this rank's candidates instead:
                ``(global indices, scores)`` of shape ``(n_test, <= k)``.
            k: ``None`` for the whole ``(n_test, n_train)`` matrix in dataset order, else
                the number of best columns per row.
            top_k: ``(scores, k) -> (local indices, scores)``, this method's ordering, or
                ``None`` when ``compute`` returns candidates itself.
            merge_order: candidate scores ``(n_test, m)`` -> the positions of each row,
                best first and stable among equals, which merges the per-rank
                candidates (they arrive rank by rank, each rank's best first).
            device: where results are returned.
            notes: see :meth:`run`.
            read_notes: given every rank's notes, in rank order, on every rank once the
                exchange has succeeded.
            k_name: the caller's name for ``k`` (``top_k``), for the message when the
                ranks ask for different numbers.
            call: further arguments every rank must give alike (see :meth:`run`).

        Returns:
            The score matrix, or ``(indices, scores)`` of shape ``(n_test, k)``.
        """
        # the rows of the result are training examples when it is this rank's columns
        columns = k is None or top_k is not None
        call = {k_name: k, **(call or {})}
        if isinstance(merge_order, _FiniteFirst):
            call["proponents"] = merge_order.proponents
        local, every = self.run(owner, compute, -1 if columns else None, notes, call)
        self.same_shapes(owner, every, -1)
        if read_notes is not None:
            read_notes([s.notes for s in every])
        if k is None:
            return self.gather(local, every, -1, device)
        if top_k is not None:
            total = sum(self.sizes(every, -1))
            if k > total:  # the single-process check, made once the sizes are known
                raise InvalidArgumentError(f"{owner}: k={k} exceeds the {total} training examples")
        if top_k is None:  # compute() already returned its candidates
            idx, val = local if local is not None else (None, None)
            picked = [_Status(True, shape=st.shape, dtype=st.dtype) for st in every]
        else:
            offsets = _offsets(self.sizes(every, -1))
            idx = val = None
            if local is not None and local.shape[1] > 0:
                idx, val = top_k(local, min(k, local.shape[1]))
                idx = idx + offsets[self.rank]
            picked = [
                _Status(True)
                if st.shape is None or st.shape[1] == 0
                else _Status(True, shape=(st.shape[0], min(k, st.shape[1])), dtype=st.dtype)
                for st in every
            ]
        all_val = self.gather(val, picked, -1, device)
        for st in picked:
            st.dtype = "int64" if st.shape is not None else ""
        all_idx = self.gather(idx, picked, -1, device)
        order = merge_order(all_val)[..., :k]
        return all_idx.gather(-1, order), all_val.gather(-1, order)

    def rows(
        self,
        owner: str,
        compute: Callable[[], Tensor | None],
        device: torch.device,
        call: dict[str, Any] | None = None,
    ) -> Tensor:
        """This rank's rows (e.g. self-influence values), concatenated over ranks."""
        local, every = self.run(owner, compute, 0, call=call)
        self.same_shapes(owner, every, 0)
        return self.gather(local, every, 0, device)


def _differences(every: Sequence[dict[str, Any]]) -> list[str]:
    """``"<key> differs (rank 0: ..., rank 1: ...)"`` for each key whose values differ."""
    problems = []
    for key in dict.fromkeys(k for facts in every for k in facts):  # every key, in order
        values = [f.get(key) for f in every]
        if any(v != values[0] for v in values[1:]):
            shown = ", ".join(f"rank {r}: {_short(v)}" for r, v in enumerate(values))
            problems.append(f"{key} differs ({shown})")
    return problems


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


def _pad(t: Tensor, size: int, dim: int) -> Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- entry points used by the public classes -------------------------------------------------
def training_facts(loader: DataLoader, checkpoints: Sequence[Any]) -> dict[str, Any]:
    """What every rank must agree on before sharding: data size and checkpoint contents.

    Raises:
        InvalidArgumentError: when the training data cannot be split over ranks.
    """
    from proponents.checkpoints import checkpoint_fingerprint
    from proponents.data import dataset_length, loader_batches

    _check_splittable(loader, "train_dataset")
    return {
        "dataset length": dataset_length(loader),
        "number of batches": loader_batches(loader),
        "training examples (five sampled)": sampled_examples(loader),
        "checkpoints": [checkpoint_fingerprint(c)[:16] for c in checkpoints],
    }


def sampled_examples(loader: DataLoader) -> str | None:
    """A short digest of five examples spread over what ``loader`` reads (the first, the
    last and three between, :func:`~proponents.fingerprints.loader_probe` without a pass
    over a TensorDataset's tensors), for the ranks to compare; ``None`` for a dataset
    that cannot be indexed (an IterableDataset)."""
    from proponents.fingerprints import loader_probe

    probe = loader_probe(loader, whole=False)
    return None if probe is None else probe[:16]


def _local_part(
    loader: DataLoader, ctx: DistributedContext, argument: str
) -> tuple[DataLoader, int | None, bool]:
    shard = shard_loader(loader, ctx.rank, ctx.world_size, argument)
    return shard, shard_size(shard), len(shard) == 0


def sharded_scores(
    ctx: DistributedContext,
    owner: str,
    loader: DataLoader,
    scores_on: Callable[[DataLoader, int | None], Tensor],
    k: int | None,
    proponents: bool,
    device: torch.device,
    call: dict[str, Any] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """TracIn scores with the training set split over ranks.

    Args:
        ctx: the process group.
        owner: class name for messages.
        loader: the whole training DataLoader (each rank reads only its shard of it).
        scores_on: ``(shard_loader, shard_size) -> (n_test, n_shard)`` scores.
        k: ``None`` for the score matrix, else the number of proponents/opponents.
        proponents: highest (``True``) or lowest scores.
        device: where the result is returned.
        call: further arguments every rank must give alike (see
            :meth:`DistributedContext.run`).

    Returns:
        The ``(n_test, n_train)`` matrix in dataset order, or ``(indices, scores)`` of
        shape ``(n_test, k)`` equal to :func:`~proponents.scoring.k_most` of that matrix.
    """
    from proponents.scoring import k_most

    shard, n, empty = _local_part(loader, ctx, "train_dataset")

    return ctx.score_columns(
        owner,
        (lambda: None) if empty else (lambda: scores_on(shard, n)),
        k,
        lambda s, kk: k_most(s, kk, proponents),
        finite_first_order(proponents),  # the ordering of k_most
        device,
        call=call,
    )


def agree_on_an_empty_test_batch(
    ctx: DistributedContext, owner: str, k: int | None, proponents: bool
) -> None:
    """Take part, for a test batch of no examples, in the exchange :func:`sharded_scores`
    makes on the other ranks: a :class:`DistributedError` on every rank unless every
    rank's test batch is empty (then each returns its empty result)."""
    # the arguments score_columns compares, as sharded_scores gives them (an empty
    # batch's digest would only repeat that it is empty)
    call = {"k": k, _EMPTY_TEST: True, TEST_INPUTS: None, "proponents": proponents}
    ctx.run(owner, lambda: None, None, None, call)


#: The fact by which the ranks of a TracIn call tell an empty test batch apart.
_EMPTY_TEST = "an empty test batch"


def test_batch_call(empty: bool, test: Any = None, is_loader: bool = False) -> dict[str, Any]:
    """The call arguments :func:`sharded_scores` is given for a test batch: whether it is
    empty, and the digest of its values (:func:`test_inputs_digest`)."""
    return {_EMPTY_TEST: empty, TEST_INPUTS: test_inputs_digest(test, is_loader)}


#: The call argument that carries :func:`test_inputs_digest`.
TEST_INPUTS = "the test inputs (their digest)"


def test_inputs_digest(test: Any, is_loader: bool) -> str | None:
    """A short SHA-256 of a test batch's values (``(inputs, targets)``, as given), which
    the ranks compare, or ``None`` when it is not compared: a DataLoader (it is not read
    twice) or a batch holding something only named by its type (a function, say)."""
    import hashlib

    from proponents.fingerprints import hash_object

    if is_loader or test is None:
        return None
    digest = hashlib.sha256()
    return digest.hexdigest()[:16] if hash_object(test, digest) else None


def sharded_values(
    ctx: DistributedContext,
    owner: str,
    loader: DataLoader,
    values_on: Callable[[DataLoader], Tensor],
    device: torch.device,
    argument: str = "inputs_dataset",
) -> Tensor:
    """Per-example values (self-influence, embeddings) with ``loader`` split over ranks.

    Args:
        values_on: ``shard_loader -> (n_shard, ...)`` values.

    Returns:
        ``(n, ...)`` values of every example, in dataset order, on every rank.
    """
    from proponents.data import dataset_length, loader_batches

    shard, _, empty = _local_part(loader, ctx, argument)
    facts = {
        f"{argument} length": dataset_length(loader),
        f"{argument} batches": loader_batches(loader),
    }
    return ctx.rows(owner, (lambda: None) if empty else (lambda: values_on(shard)), device, facts)


@dataclass(frozen=True)
class _FiniteFirst:
    """The ordering :func:`finite_first_order` gives (its direction travels with a call's
    status, so that ranks asking for proponents and opponents are told apart)."""

    proponents: bool

    def key(self, s: Tensor) -> Tensor:
        """What is sorted, largest first: the scores (negated for opponents), ``-inf``
        for every non-finite one."""
        signed = s if self.proponents else -s
        return torch.where(torch.isfinite(s), signed, torch.full_like(s, -float("inf")))

    def __call__(self, s: Tensor) -> Tensor:
        return torch.sort(self.key(s), dim=-1, descending=True, stable=True).indices


def finite_first_order(proponents: bool) -> _FiniteFirst:
    """The ordering of k-most answers: highest (proponents) or lowest scores first,
    non-finite ones last, equal scores in their given order (a callable giving each row's
    order; its ``key`` is what is sorted)."""
    return _FiniteFirst(proponents)


def shard_range(
    loader: DataLoader, rank: int, world_size: int, argument: str = "train_dataset"
) -> tuple[int, int] | None:
    """Positions ``[start, stop)`` (in iteration order) of rank ``rank``'s examples.

    ``None`` for a ``DataLoader(batch_size=None)``: its items are whole batches, whose
    numbers of examples are known only by reading them (the ranks' sizes then come from
    their results, see :func:`sharded_local_rows`).
    """
    batches, auto = _batches_of(loader, argument)
    if not auto:
        return None
    lo = rank * len(batches) // world_size
    hi = (rank + 1) * len(batches) // world_size
    start = sum(len(b) for b in batches[:lo])
    return start, start + sum(len(b) for b in batches[lo:hi])


def even_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[r * n // W, (r + 1) * n // W)``: rank ``rank``'s share of ``n`` stored rows."""
    return rank * n // world_size, (rank + 1) * n // world_size


def sharded_local_rows(
    ctx: DistributedContext,
    owner: str,
    loader: DataLoader,
    values_on: Callable[[DataLoader], Tensor],
) -> tuple[Tensor | None, list[int]]:
    """This rank's rows of per-example values, kept local, and every rank's row count.

    Returns:
        ``(local, sizes)``: ``local`` is ``None`` on a rank with an empty shard.
    """
    shard, _, empty = _local_part(loader, ctx, "train_dataset")
    local, every = ctx.run(owner, (lambda: None) if empty else (lambda: values_on(shard)), 0)
    return local, ctx.sizes(every, 0)
