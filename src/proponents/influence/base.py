"""Abstract bases of the public influence classes and the k-most result type."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from proponents.checkpoints import load_flexible_state_dict, resolve_checkpoints
from proponents.checks import check_flag, check_int, check_model
from proponents.data import (
    Batch,
    ListDataset,
    count_examples,
    dataset_length,
    is_example_list,
    labels_inside_hint,
    loader_batches,
    make_loader,
    model_device,
    refuse_shuffled,
    split_batch,
    test_batches,
)
from proponents.distributed import (
    agree_on_an_empty_test_batch,
    resolve_distributed,
    sharded_scores,
    sharded_values,
    test_batch_call,
    training_facts,
)
from proponents.errors import ArgumentTypeError, InvalidArgumentError, count
from proponents.model_guard import call_scope
from proponents.scoring import TracInRunner, k_most
from proponents.user_warnings import warn


class KMostInfluentialResults(NamedTuple):
    """Proponents or opponents of each test example.

    Attributes:
        indices: ``(n_test, k)`` indices into the training set; proponents in
            descending score order, opponents in ascending order.
        influence_scores: ``(n_test, k)`` the scores of those training examples.
    """

    indices: Tensor
    influence_scores: Tensor


class DataInfluence(abc.ABC):
    """Base of every method that scores training examples for a model's predictions."""

    @abc.abstractmethod
    def influence(self, inputs: Any = None, **kwargs: Any) -> Any:
        """Score the training data for ``inputs``; the result type depends on the method."""


class TracInCPBase(DataInfluence):
    """Shared machinery of the TracIn methods over checkpoints.

    Subclasses pick the parameters to differentiate and build the gradient engine;
    this class validates the arguments common to all of them, runs the three modes
    of :meth:`influence` and keeps the user's model unchanged.

    Args:
        model: the model to explain; its parameters are replaced by each checkpoint
            in turn during a call and restored afterwards.
        train_dataset: the training examples, a Dataset or a list of examples such as
            ``[(x0, y0), (x1, y1)]`` (wrapped in a non-shuffling DataLoader of
            ``batch_size``) or a DataLoader used as given; every batch is
            ``(*model_inputs, label)``.
        checkpoints: a directory of checkpoint files (natural order), a list of paths
            (given order) or an iterator of paths or loaded objects.
        checkpoints_load_func: ``f(model, checkpoint) -> learning_rate`` loading one
            checkpoint into the model. Default: :func:`load_flexible_state_dict`.
        loss_fn: the training loss, or ``None`` to use the model output itself.
        batch_size: batch size used when ``train_dataset`` is a Dataset.
        distributed: (keyword-only) ``None`` shards the training set over the ranks of an
            initialised ``torch.distributed`` process group when there is one, ``True``
            requires one, ``False`` never shards. Every rank must then construct the object
            and make each call together; see ``docs/distributed.md``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader | list | tuple,
        checkpoints: Any,
        checkpoints_load_func: Callable[..., Any] = load_flexible_state_dict,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int = 1,
        *,
        distributed: bool | None = None,
    ) -> None:
        name = self.get_name()
        check_model(model, "model", name)
        if not callable(checkpoints_load_func):
            raise ArgumentTypeError(
                f"{name}: checkpoints_load_func must be callable as f(model, checkpoint), "
                f"got {type(checkpoints_load_func).__name__}"
            )
        self.model = model
        self.train_dataset = train_dataset
        self.checkpoints_load_func = checkpoints_load_func
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self._dist = resolve_distributed(distributed, name)

        def read_inputs() -> dict[str, Any]:
            """The training loader and the checkpoints (files are read on each rank)."""
            self.train_dataloader = make_loader(train_dataset, batch_size, "train_dataset")
            self.checkpoints = resolve_checkpoints(checkpoints)
            if self._dist is None:
                return {}
            return training_facts(self.train_dataloader, self.checkpoints)

        if self._dist is None:
            read_inputs()
        else:  # a rank that cannot read them is named on every rank
            self._dist.agree_on(name, read_inputs)

    @classmethod
    def get_name(cls) -> str:
        """The class name, used in progress bars and messages."""
        return cls.__name__

    # -- subclass hooks ---------------------------------------------------------------
    def _runner(self) -> TracInRunner:
        """The loop runner over this method's gradient engine.

        Our own methods provide one; :meth:`influence` and :meth:`self_influence` run on
        it. A subclass written for the spec's base class overrides those two public
        methods instead (the spec leaves them abstract) and needs none, so it is not an
        abstract method here: such a subclass can be created, as with the spec's class.
        """
        raise NotImplementedError(
            f"{self.get_name()} has no gradient engine: override influence() and "
            "self_influence(), or implement _runner() to use TracInCPBase's own"
        )

    # -- shared behaviour ---------------------------------------------------------------
    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """The scope of one public call (see :func:`proponents.model_guard.call_scope`).

        With the default loader, checkpoints are loaded by reference (the model's
        parameters hold the loaded tensors, and are not copied on entry); any other
        loader writes into the model's tensors, which then hold copies.
        """
        by_reference = self.checkpoints_load_func is load_flexible_state_dict
        # Inside torch.inference_mode() every new tensor would be an inference tensor, which
        # autograd cannot use; the call needs gradients, so it leaves that mode (tensors it
        # creates are ordinary ones, and the results it returns too).
        with (
            torch.inference_mode(False),
            call_scope(self.model, model_device(self.model), loads_by_reference=by_reference),
        ):
            yield

    def _n_train(self) -> int | None:
        return dataset_length(self.train_dataloader)

    def _check_k(self, k: Any) -> int:
        """``k`` as an ``int`` (any integer type: ``numpy.int64`` too, not ``bool``)."""
        name = self.get_name()
        k = check_int(k, f"{name}: k", or_none=True)
        n = self._n_train()
        if k < 1 or (n is not None and k > n):
            allowed = (
                "at least 1"
                if n is None
                else f"between 1 and the number of training examples ({n})"
            )
            raise InvalidArgumentError(f"{name}: k={k} is out of range; it must be {allowed}")
        return k

    def _score_dtype(self) -> torch.dtype:
        """The dtype of the scores: that of the differentiated parameters (promoted)."""
        params = dict(self.model.named_parameters())
        names = getattr(self, "_selected", None) or list(params)
        dtypes = [params[n].dtype for n in names if n in params]
        dtype = dtypes[0] if dtypes else torch.get_default_dtype()
        for other in dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
        return dtype

    def _n_train_counted(self) -> int:
        """Number of training examples: the known length, else counted in one data pass."""
        n = self._n_train()
        if n is not None:
            return n
        with self._guarded():  # the pass may draw from the global generators
            return count_examples(self.train_dataloader, "training batch")

    def _empty_influence(
        self, k: int | None, proponents: bool, aggregate: bool
    ) -> Tensor | KMostInfluentialResults:
        """What :meth:`influence` gives for a test batch of no examples, without a model run.

        ``(0, n_train)`` scores (``(1, n_train)`` zeros with ``aggregate``: a sum over no
        examples), or ``(0, k)`` proponents/opponents with ``int64`` indices; in the
        scores' dtype, on the model's device.
        """
        n_train = self._n_train_counted()
        if k is not None and k > n_train:
            raise InvalidArgumentError(
                f"{self.get_name()}: k={k} exceeds the {count(n_train, 'training example')}"
            )
        scores = torch.zeros(
            1 if aggregate else 0,
            n_train,
            dtype=self._score_dtype(),
            device=model_device(self.model),
        )
        if k is None:
            return scores
        return KMostInfluentialResults(*k_most(scores, k, proponents))

    # The API's DataInfluence.influence takes (inputs, **kwargs); each method names the
    # arguments it accepts, so this signature is deliberately narrower than the base's.
    def influence(  # type: ignore[override]
        self,
        inputs: Any = None,
        targets: Any = None,
        k: int | None = None,
        proponents: bool = True,
        unpack_inputs: bool = True,
        show_progress: bool = False,
        *,
        aggregate: bool = False,
    ) -> Tensor | KMostInfluentialResults:
        """Influence of the training examples, in one of three modes.

        * ``inputs=None``: self-influence of every training example, ``(n_train,)``.
        * ``k=None``: the score matrix ``(n_test, n_train)``; ``scores[i, j]`` is the
          influence of training example ``j`` on test example ``i``.
        * ``k`` an int: the ``k`` proponents (highest scores) or opponents (lowest) of
          each test example, as :class:`KMostInfluentialResults` of ``(n_test, k)``.

        Args:
            inputs: the test batch — model inputs called as ``model(*inputs)`` when
                ``unpack_inputs`` and a tuple, else ``model(inputs)`` with ``inputs`` of
                any type (a dict or tuple of tensors, say) — or a DataLoader of
                ``(*model_inputs, label)`` test batches. The number of test examples is
                dim 0 of the first input tensor, else of the tensors nested in
                ``inputs`` (which must agree), else of ``targets``. A batch of no examples
                gives ``(0, n_train)`` scores or ``(0, k)`` results without a model run.
            targets: labels of the test batch, one per example (``None`` with a
                DataLoader, or when the loss needs no labels); a list or NumPy array of
                numbers is converted as ``torch.as_tensor`` would.
            k: number of proponents/opponents per test example, ``1..n_train`` (any
                integer type, e.g. ``numpy.int64``; not ``bool``).
            proponents: ``True`` for proponents, ``False`` for opponents.
            unpack_inputs: whether a tuple ``inputs`` holds several model arguments.
            show_progress: show a progress bar over checkpoints and batches.
            aggregate: (keyword-only) score the whole test batch at once: the influence
                summed over test examples, ``(1, n_train)`` scores, or the ``k`` training
                examples most influential on the batch as a whole.

        Returns:
            A tensor or :class:`KMostInfluentialResults`, on the model's device. The call
            also works inside ``torch.inference_mode()``: it leaves that mode internally,
            since it needs autograd.
        """
        name = self.get_name()
        proponents = check_flag(proponents, "proponents", name)
        unpack_inputs = check_flag(unpack_inputs, "unpack_inputs", name)
        show_progress = check_flag(show_progress, "show_progress", name)
        aggregate = check_flag(aggregate, "aggregate", name)
        if inputs is None:
            if targets is not None:
                raise InvalidArgumentError(
                    f"{name}: targets were given without inputs; pass the test inputs too, or "
                    "neither for self-influence"
                )
            unused = [
                f"{arg}={value!r}"
                for arg, value, default in (
                    ("k", k, None),
                    ("proponents", proponents, True),
                    ("aggregate", aggregate, False),
                )
                if value is not default
            ]
            if unused:
                verb = "has" if len(unused) == 1 else "have"
                warn(
                    f"{name}: influence() without inputs gives the self-influence of every "
                    f"training example; {' and '.join(unused)} {verb} no effect there (pass "
                    "test inputs for proponents or opponents)"
                )
            return self.self_influence(self.train_dataloader, show_progress=show_progress)
        if k is not None:
            k = self._check_k(k)
        test, is_loader = test_batches(inputs, targets, unpack_inputs)
        self._check_targets(inputs, targets, is_loader)
        if isinstance(test, DataLoader):
            empty = dataset_length(test) == 0  # a loader over no examples yields no batch
        else:
            empty = all(batch.size == 0 for batch in test)
        if empty:
            if self._dist is not None:  # the other ranks must have no test examples either
                agree_on_an_empty_test_batch(self._dist, name, k, proponents)
            return self._empty_influence(k, proponents, aggregate)
        n_test_batches = loader_batches(test) if is_loader else 1  # type: ignore[arg-type]

        def scores_on(train: DataLoader, n_train: int | None) -> Tensor:
            with self._guarded():
                return self._runner().scores(
                    test,
                    is_loader,
                    train,
                    loader_batches(train),
                    n_test_batches,
                    aggregate,
                    show_progress,
                    n_train=n_train,
                    test_chunk=self._test_chunk(),
                )

        if self._dist is not None:
            out = sharded_scores(
                self._dist,
                name,
                self.train_dataloader,
                scores_on,
                k,
                proponents,
                model_device(self.model),
                call=test_batch_call(False, (inputs, targets), is_loader),
            )
            return out if isinstance(out, Tensor) else KMostInfluentialResults(*out)
        scores = scores_on(self.train_dataloader, self._n_train())
        if k is None:
            return scores
        if k > scores.shape[1]:
            raise InvalidArgumentError(
                f"{name}: k={k} exceeds the {count(scores.shape[1], 'training example')}"
            )
        return KMostInfluentialResults(*k_most(scores, k, proponents))

    def _check_targets(self, inputs: Any, targets: Any, is_loader: bool) -> None:
        if self.loss_fn is not None and targets is None and not is_loader:
            raise InvalidArgumentError(
                f"{self.get_name()}: targets are required when loss_fn is set; pass the "
                f"labels of the test batch{labels_inside_hint(inputs)}"
            )

    def self_influence(self, inputs_dataset: Any = None, show_progress: bool = False) -> Tensor:
        """Self-influence ``sum_c lr_c * ||grad loss(x)||^2`` of each example.

        Args:
            inputs_dataset: one batch ``(*model_inputs, label)`` or a DataLoader of such
                batches; ``None`` means the training set. A Dataset, or a list of examples
                each a tuple ``(*model_inputs, label)``, is read in batches of the training
                DataLoader's size (``batch_size`` for a training Dataset). A batch of no
                examples gives a ``(0,)`` tensor without a model run.
            show_progress: show a progress bar over checkpoints and batches.

        Returns:
            ``(n,)`` scores on the model's device, in the order of the examples.
        """
        show_progress = check_flag(show_progress, "show_progress", self.get_name())
        argument = "inputs_dataset"
        if inputs_dataset is None:
            inputs_dataset, argument = self.train_dataloader, "train_dataset"
        elif is_example_list(inputs_dataset):  # [(x0, y0), (x1, y1), ...], as for Captum
            inputs_dataset = ListDataset(inputs_dataset)
        if isinstance(inputs_dataset, DataLoader):
            refuse_shuffled(inputs_dataset, argument)
            data: Any = inputs_dataset
            n_batches = loader_batches(inputs_dataset)
        elif isinstance(inputs_dataset, Dataset):
            # the training set's batches are the size this object was built for
            size = self.train_dataloader.batch_size or self.batch_size
            data = make_loader(inputs_dataset, size, "inputs_dataset")
            n_batches = loader_batches(data)
        else:
            if split_batch(inputs_dataset, "inputs_dataset batch").size == 0:
                # a batch of no examples: no model run, the (0,) result on the model's device
                return torch.zeros(0, dtype=self._score_dtype(), device=model_device(self.model))
            data, n_batches = [inputs_dataset], 1
        # what the progress bar names: "self-influence of the training set, checkpoint 1/3"
        of = "the training set" if inputs_dataset is self.train_dataloader else "inputs_dataset"
        if self._dist is not None and isinstance(data, DataLoader):

            def values_on(shard: DataLoader) -> Tensor:
                with self._guarded():
                    return self._runner().self_scores(
                        shard, loader_batches(shard), show_progress, of
                    )

            return sharded_values(
                self._dist, self.get_name(), data, values_on, model_device(self.model), argument
            )
        # one batch given as it is: differentiated in pieces, as a large test batch is
        chunk = None if isinstance(data, DataLoader) else self._test_chunk()
        with self._guarded():
            return self._runner().self_scores(data, n_batches, show_progress, of, chunk)

    def _test_chunk(self) -> int:
        """Most examples of a batch given as it is (a test batch, one ``inputs_dataset``
        batch) that one pass differentiates at once."""
        return max(self.train_dataloader.batch_size or 0, 256)


__all__ = ["Batch", "DataInfluence", "KMostInfluentialResults", "TracInCPBase"]
