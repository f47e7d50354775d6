"""How a user's ``loss_fn`` becomes per-example losses (DESIGN.md §2).

The loss of example ``i`` is ``loss_fn`` applied to example ``i`` alone. For a
batched pass we need the *sum* of those per-example losses, because the gradient
of that sum with respect to the output of any layer is, row by row, the
per-example gradient:

* ``reduction="none"``: ``loss_fn(out, y)`` has one row per example; sum it.
* ``reduction="sum"``:  ``loss_fn(out, y)`` already is the sum.
* ``reduction="mean"``: ``batch_size * loss_fn(out, y)`` (the mean over the batch
  times its size; for losses with several entries per example this equals the
  sum of each example's own mean). Not for a cross-entropy or NLL loss with class
  weights or with labels equal to ``ignore_index``: its mean divides by the labels'
  summed weights (ignored labels weigh 0), so it is not a plain mean over examples.
  Nor for any other "mean" loss on integer labels, which may hide such weights. There
  each example's own loss is evaluated (its weighted loss over its own weights, which
  is undefined, NaN, for an example whose labels are all ignored).
* ``loss_fn=None``: the model output summed over all non-batch dimensions.

A reducing loss (``sample_wise_grads_per_batch=True``, TracInCPFast) without a
``reduction`` attribute reduces as its signature says (a ``reduction=`` keyword bound by
``functools.partial``, or the default, as for ``F.cross_entropy``). Where nothing says
(a ``def`` or lambda), the spec would assume a sum; here each example's own loss is
evaluated instead (:func:`each_alone`), which is exact for whatever the loss does.

An example whose own loss is not finite (an example whose labels are all ignored under
"mean" has the undefined loss 0/0) gets a NaN gradient wherever its own loss is seen:
the per-example rows of a "none" loss, the examples' own losses of a weighted "mean" or
of a loss that states no reduction, and a batch of one. Its scores are then NaN, reported
with the engine's non-finite warning (DESIGN.md §2), even where autograd's gradient of the
NaN is zero.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

from proponents.data import example_labels, holds_examples, map_rows
from proponents.errors import ArgumentTypeError, BatchFormatError, InvalidArgumentError, article

REDUCTIONS = ("none", "sum", "mean")


@dataclass(frozen=True)
class LossSpec:
    """A loss function together with how it reduces over a batch.

    Attributes:
        fn: the user's loss, or ``None`` to differentiate the model output itself.
        reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"output"`` (for ``fn=None``).
        declared: whether ``fn`` states its reduction (a ``reduction`` attribute or
            keyword); ``False`` when nothing says (``reduction`` is then ``"sum"``, for
            the shape check and the saved index, and each example's own loss is used).
    """

    fn: Callable[..., torch.Tensor] | None
    reduction: str
    declared: bool = True
    #: the reduction was read from ``fn``'s signature (no ``reduction`` attribute)
    by_signature: bool = False

    def _apply(self, output: Any, labels: Any) -> Any:
        """``fn(output, labels)``, or ``output.sum()`` without ``fn``; a model output that
        is not a tensor and that the loss cannot take gets an error saying so."""
        try:
            return output.sum() if self.fn is None else self.fn(output, labels)
        except (TypeError, AttributeError) as err:
            if isinstance(output, torch.Tensor):
                raise
            what = "loss_fn" if self.fn is not None else "loss_fn=None (the output is summed)"
            raise ArgumentTypeError(
                f"the model returned {article(type(output).__name__)}, which {what} cannot take "
                f"({type(err).__name__}: {err}). Wrap the model so that it returns the "
                "output tensor (a Module whose forward returns "
                "model(x)['logits']), or pass a loss_fn that accepts this output"
            ) from err

    def batch_total(
        self,
        output: torch.Tensor,
        labels: Any,
        batch_size: int,
        marked: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Sum over the batch of the per-example losses (a scalar).

        Args:
            marked: tensors (recorded layer outputs) whose gradients are taken from this
                total: where an example's own loss is known and not finite, its rows of
                their gradients are made NaN (:func:`_poisoned`).
        """
        _check_class_labels(self.fn, output, labels)
        if self.fn is not None and (
            (not self.declared and self.reduction != "none")
            or _broadcasts_across_examples(self.fn, output, labels)
        ):
            # A loss that does not say how it reduces: each example's own loss is
            # evaluated (DESIGN.md §2), so a wrapper that averages (over the labels it
            # keeps, say) is scored exactly; the spec's assumed sum is not needed. So is
            # one whose targets would broadcast across the examples.
            own = each_alone(self.fn, output, labels, batch_size)
            return _poisoned(own.sum(), own, marked)
        value = self._apply(output, labels)
        if self.fn is None:
            return _poisoned(value, _rows_summed(output, batch_size), marked)
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(
                f"loss_fn returned {type(value).__name__}; it must return a tensor"
            )
        if self.reduction == "none":
            if batch_size > 1 and (value.dim() == 0 or value.shape[0] != batch_size):
                raise InvalidArgumentError(
                    f"loss_fn is used as a per-example loss but returned shape "
                    f"{tuple(value.shape)} for a batch of {batch_size}; return one loss per "
                    "example (reduction='none'), or pass sample_wise_grads_per_batch=True "
                    "for a loss that reduces with 'sum' or 'mean'"
                )
            return _poisoned(value.sum(), _rows_summed(value, batch_size), marked)
        if value.dim() != 0 and value.numel() != 1:
            raise InvalidArgumentError(
                f"loss_fn has reduction={self.reduction!r} but returned shape "
                f"{tuple(value.shape)}; a reducing loss must return a scalar"
            )
        value = value.reshape(())
        if batch_size == 1:  # the batch is the example alone: its loss is the value
            return _poisoned(value, value.reshape(1), marked)
        if self.reduction != "mean":
            return value
        if _weighted_mean(self, labels):
            own = _own_losses(self.fn, output, labels)
            return _poisoned(own.sum(), own, marked)
        return value * batch_size

    def example_losses(self, output: Any, labels: Any, batch_size: int) -> torch.Tensor:
        """``(B,)``: each example's loss, from its rows of a whole batch's ``output``.

        The loss each example has as a batch of one (:meth:`example_loss`): the rows of
        a per-example loss (``reduction='none'``) summed, a reducing loss applied to each
        example alone (:func:`each_alone`), the output's rows summed without a loss.

        Raises:
            InvalidArgumentError: a per-example loss that does not return one row per
                example.
        """
        _check_class_labels(self.fn, output, labels)
        if self.fn is None:
            own = _rows_summed(output, batch_size)
        elif _broadcasts_across_examples(self.fn, output, labels):
            own = each_alone(self.fn, output, labels, batch_size)
        elif self.reduction == "none":
            value = self._apply(output, labels)
            own = _rows_summed(value, batch_size)
            if own is None:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise InvalidArgumentError(
                    f"loss_fn is used as a per-example loss but returned {shape} for a batch "
                    f"of {batch_size}; return one loss per example (reduction='none')"
                )
        else:
            own = _entrywise_own_losses(self, output, labels, batch_size)
            if own is None:
                own = each_alone(self.fn, output, labels, batch_size)
        if own is None:  # check_packed_output saw one row per example: not reached
            raise InvalidArgumentError(f"the model output has no row per example of {batch_size}")
        return own

    def example_loss(self, output: torch.Tensor, labels: Any) -> torch.Tensor:
        """Loss of one example given as a batch of one (a scalar). Callers make the
        gradients of an example whose loss is not finite NaN (:func:`nan_where_undefined`)."""
        return self._apply(output, labels).sum()


def each_alone(fn: Callable[..., Any], output: Any, labels: Any, b: int) -> torch.Tensor:
    """``(B,)``: ``fn`` applied to each example of a batch of ``b`` alone (its rows of the
    model output and its labels, as a batch of one), summed to a scalar per example.

    One ``torch.func.vmap`` over the rows where the output and labels are tensors;
    otherwise, or where vmap cannot run ``fn``, a loop over the examples. The model is
    not run again.
    """
    leaves = [*tree_leaves(output), *tree_leaves(labels)]
    if all(isinstance(t, torch.Tensor) for t in leaves):
        from torch.func import vmap

        def dims(tree: Any) -> Any:
            return tree_map(lambda t: 0 if holds_examples(t, b) else None, tree)

        def alone(out: Any, lab: Any) -> torch.Tensor:
            one = tree_map(lambda t: t.unsqueeze(0), out)
            return fn(one, tree_map(lambda t: t.unsqueeze(0), lab)).sum()

        out_dims, lab_dims = dims(output), dims(labels)
        if any(d == 0 for d in tree_leaves(out_dims)):
            try:
                return vmap(alone, in_dims=(out_dims, lab_dims))(output, labels)
            except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError):
                pass  # what vmap cannot run: the loop below
    rows = [
        fn(map_rows(output, b, itemgetter(slice(i, i + 1))), example_labels(labels, i, b))
        for i in range(b)
    ]
    return torch.stack(
        [r.sum() if isinstance(r, torch.Tensor) else torch.as_tensor(r) for r in rows]
    )


def nan_where_undefined(grads: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` per-example gradients with the rows of examples whose own loss
    (``losses``, ``(B,)``) is not finite set to NaN (DESIGN.md §2: autograd can give an
    undefined loss a zero gradient, e.g. an example whose labels are all ignored)."""
    bad = ~torch.isfinite(losses.detach().reshape(-1)).to(grads.device)
    if grads.shape[0] != bad.shape[0] or not bool(bad.any()):
        return grads  # (masked_fill would copy the whole block for nothing)
    return grads.masked_fill(bad.reshape(-1, *([1] * (grads.dim() - 1))), float("nan"))


def _rows_summed(values: Any, batch_size: int) -> torch.Tensor | None:
    """``(B,)``: each example's entries of ``values`` summed, or ``None`` when ``values``
    has no row per example."""
    if not isinstance(values, torch.Tensor) or values.dim() == 0:
        return None
    if values.shape[0] != batch_size:
        return None
    return values.reshape(batch_size, -1).sum(1)


def _poisoned(
    total: torch.Tensor, own: torch.Tensor | None, marked: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``total`` plus a term that gives each example whose own loss (``own[i]``) is not
    finite a NaN gradient at its rows of every tensor in ``marked``, and every other
    example none.

    Autograd can give an undefined loss a zero gradient (an example whose labels are all
    ignored: 0/0 in the forward pass, but its entries are masked out in the backward one);
    DESIGN.md §2 wants such an example's scores non-finite. The term is
    ``sum_t sum_i t_i.sum() * c_i`` with ``c_i`` 0 or NaN, added on the very tensors the
    gradients are taken at (a NaN sent back from the output would be zeroed by a ReLU
    that is off); no data-dependent branch, and no device synchronisation.
    """
    if own is None:
        return total
    b = own.shape[0]
    for t in marked:
        if not (
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and t.requires_grad
            and t.dim() > 0
            and t.shape[0] == b
            and t.numel() > 0
        ):
            continue
        nan = torch.tensor(float("nan"), dtype=t.dtype, device=t.device)
        factor = torch.where(torch.isfinite(own.detach()).to(t.device), torch.zeros_like(nan), nan)
        total = total + (t.reshape(b, -1).sum(1) * factor).sum()
    return total


_CLASS_LOSSES = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)


def _weighted_mean(spec: LossSpec, labels: Any) -> bool:
    """Whether ``spec.fn``'s "mean" may divide by something other than the batch size.

    True for a cross-entropy or NLL loss on class indices with class weights, or with a
    label equal to ``ignore_index`` in the batch (class probabilities are averaged over
    the batch, weights or not). Always true for any other "mean" loss on integer labels:
    it may divide by class weights or skip labels that nothing outside it shows (a
    wrapper holding ``nn.NLLLoss(weight=...)``, weights under a name of its own, a
    global), whatever attributes or keywords it states. Each example's own loss is
    then evaluated, which is exact for any loss and costs one more evaluation of the
    loss alone, not of the model; the first-batch check cannot see this, because a batch
    of one class (a dataset sorted by label) or without ignored labels divides as a
    plain mean, and the batches that do not may only come later.
    """
    fn = spec.fn
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        return False
    if labels.dtype == torch.bool or labels.numel() == 0:
        return False
    if not isinstance(fn, _CLASS_LOSSES):
        return True
    return fn.weight is not None or bool((labels == fn.ignore_index).any())


def _class_loss_entries(fn: Any, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The per-entry losses of torch's cross-entropy or NLL loss ``fn`` (one of
    :data:`_CLASS_LOSSES`), with its class weights, ignored index and label smoothing:
    weighted, 0 where ignored."""
    if type(fn) is torch.nn.CrossEntropyLoss:
        return torch.nn.functional.cross_entropy(
            output,
            labels,
            weight=fn.weight,
            ignore_index=fn.ignore_index,
            reduction="none",
            label_smoothing=fn.label_smoothing,
        )
    return torch.nn.functional.nll_loss(
        output, labels, weight=fn.weight, ignore_index=fn.ignore_index, reduction="none"
    )


def _own_losses(fn: Any, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)``: ``fn`` applied to each example alone, for a :func:`_weighted_mean` loss.

    For torch's own two classes this is one batched evaluation: the per-entry losses
    (already weighted, 0 where ignored) summed per example, over the example's summed
    label weights. A subclass may compute something else, so it is called on each
    example in turn (on the model output only; the model is not run again).
    """
    if type(fn) not in _CLASS_LOSSES:
        return each_alone(fn, output, labels, len(labels))
    entries = _class_loss_entries(fn, output, labels)
    ignored = labels == fn.ignore_index
    if fn.weight is None:
        weights = (~ignored).to(entries.dtype)
    else:
        # long: a uint8 index would be taken as a boolean mask
        weights = fn.weight.to(entries.dtype)[labels.masked_fill(ignored, 0).long()]
        weights = weights.masked_fill(ignored, 0)
    b = len(labels)
    return entries.reshape(b, -1).sum(1) / weights.reshape(b, -1).sum(1)


#: torch's losses whose ``reduction="none"`` gives one loss per output entry, so that an
#: example's loss alone is the sum (``"sum"``) or mean (``"mean"``) of its entries.
_ENTRYWISE_LOSSES = (
    torch.nn.MSELoss,
    torch.nn.L1Loss,
    torch.nn.SmoothL1Loss,
    torch.nn.HuberLoss,
    torch.nn.BCELoss,
    torch.nn.BCEWithLogitsLoss,
)


def _check_class_labels(fn: Any, output: Any, labels: Any) -> None:
    """Refuse class labels outside the output's classes for cross-entropy and NLL.

    torch reports them as "Target 5 is out of bounds" (or, from the closed-form gradient,
    an index error that does not mention labels; on a GPU a device-side assert).

    Raises:
        BatchFormatError: naming the first such label and the number of classes.
    """
    if type(fn) not in _CLASS_LOSSES or not isinstance(labels, torch.Tensor):
        return  # (a subclass may map its labels before the loss sees them)
    if not isinstance(output, torch.Tensor) or output.dim() < 2 or labels.is_floating_point():
        return  # class probabilities, or an output the loss will refuse itself
    if labels.numel() == 0 or labels.dtype == torch.bool:
        return
    classes = int(output.shape[1])
    low, high = (int(v) for v in torch.aminmax(labels))  # one sync in the usual case
    if 0 <= low and high < classes:
        return
    outside = ((labels < 0) | (labels >= classes)) & (labels != fn.ignore_index)
    if bool(outside.any()):
        bad = int(labels[outside].flatten()[0])
        raise BatchFormatError(
            f"class label {bad} is out of range for a model output of {classes} classes "
            f"(labels must be 0 to {classes - 1}, or ignore_index={fn.ignore_index}); check "
            "the batch's labels, or the number of classes the model outputs"
        )


def _broadcasts_across_examples(fn: Any, output: Any, labels: Any) -> bool:
    """Whether one of torch's entrywise losses would pair every example's output with every
    example's label: targets that broadcast against the output into more entries than it
    has (an ``(n, 1)`` output against ``(n,)`` targets gives ``(n, n)`` differences; torch
    only warns). Alone, each example's ``(1, 1)`` output meets its own ``(1,)`` target, so
    such a batch is scored example by example (:func:`each_alone`)."""
    if type(fn) not in _ENTRYWISE_LOSSES:
        return False
    if not isinstance(output, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return False
    if output.shape == labels.shape:
        return False
    try:
        shape = torch.broadcast_shapes(output.shape, labels.shape)
    except RuntimeError:
        return False  # torch's own error follows
    return math.prod(shape) > output.numel()


def _entrywise_own_losses(
    spec: LossSpec, output: Any, labels: Any, batch_size: int
) -> torch.Tensor | None:
    """``(B,)``: each example's loss alone (as :func:`each_alone` gives it), in one
    evaluation of the loss over the whole batch, for torch's own losses that reduce
    entry by entry (and cross-entropy and NLL, class weights and ignored labels
    included: :func:`_own_losses`); ``None`` for any other loss."""
    fn: Any = spec.fn
    if not isinstance(output, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return None
    if output.dim() == 0 or output.shape[0] != batch_size:
        return None
    if type(fn) in _CLASS_LOSSES:
        if spec.reduction == "mean":
            return _own_losses(fn, output, labels)
        return _class_loss_entries(fn, output, labels).reshape(batch_size, -1).sum(1)
    if type(fn) not in _ENTRYWISE_LOSSES or output.shape != labels.shape:
        return None  # (a broadcasting loss is left to each_alone)
    apart = copy.copy(fn)
    apart.reduction = "none"
    entries = apart(output, labels).reshape(batch_size, -1)
    return entries.mean(1) if spec.reduction == "mean" else entries.sum(1)


def labels_fit_closed_form(spec: LossSpec, labels: Any) -> bool:
    """Whether :func:`output_gradient` can succeed for these labels, before any model run.

    ``False`` for a loss without a closed form here and for labels that rule it out (a
    cross-entropy label equal to ``ignore_index``, say); ``True`` means only that the
    output still has to fit.
    """
    fn = spec.fn
    if fn is None:
        return True
    if type(fn) is torch.nn.CrossEntropyLoss:
        return (
            fn.weight is None
            and fn.label_smoothing == 0
            and isinstance(labels, torch.Tensor)
            and labels.dim() == 1
            and labels.dtype == torch.long
            and not bool((labels == fn.ignore_index).any())
        )
    if type(fn) is torch.nn.MSELoss:
        return isinstance(labels, torch.Tensor)
    return False


def output_gradient(
    spec: LossSpec, output: Any, labels: Any, labels_checked: bool = False
) -> torch.Tensor | None:
    """Each example's loss gradient with respect to the model output, in closed form.

    Row ``i`` is the gradient of example ``i``'s own loss (see the module) with respect
    to ``output[i]``: what autograd gives for the summed per-example losses, without a
    graph or a backward pass. Known forms:

    * no loss: the output summed, gradient all ones;
    * ``nn.CrossEntropyLoss`` without class weights or label smoothing, on ``(B, C)``
      logits and integer class labels: ``softmax(output) - onehot(labels)``;
    * ``nn.MSELoss`` on an output and targets of the same shape: ``2 (output - target)``,
      divided by the number of entries per example for ``reduction="mean"``.

    Args:
        labels_checked: the caller has already seen :func:`labels_fit_closed_form` hold
            for these labels (it is not asked again).

    Returns:
        The ``(B, ...)`` gradient, or ``None`` when this loss or these labels have no
        closed form here (subclasses, other losses, a label equal to ``ignore_index``):
        the caller then differentiates with autograd.
    """
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    fn = spec.fn
    if fn is None:
        return torch.ones_like(output)
    if type(fn) is torch.nn.CrossEntropyLoss:
        if (
            output.dim() != 2
            or not (labels_checked or labels_fit_closed_form(spec, labels))
            or labels.shape[0] != output.shape[0]
        ):
            return None
        _check_class_labels(fn, output, labels)
        grad = torch.softmax(output, dim=1)
        # minus one at each example's label; a scatter costs half what advanced indexing does
        return grad.scatter_add_(1, labels.unsqueeze(1), grad.new_full((grad.shape[0], 1), -1.0))
    if type(fn) is torch.nn.MSELoss:
        if (
            not (labels_checked or labels_fit_closed_form(spec, labels))
            or labels.shape != output.shape
            or labels.dtype != output.dtype
            or output.dim() == 0
        ):
            return None
        grad = 2 * (output - labels)
        if spec.reduction == "mean":
            grad /= max(1, output[0].numel())
        return grad
    return None


def resolve_loss(
    loss_fn: Callable[..., torch.Tensor] | None,
    sample_wise_grads_per_batch: bool | None,
    owner: str,
) -> LossSpec:
    """Check ``loss_fn`` against the batching flag and describe its reduction.

    Args:
        loss_fn: the user's loss or ``None``.
        sample_wise_grads_per_batch: ``True`` needs a reducing loss ("sum"/"mean"),
            ``False`` a per-example one ("none"); ``None`` means "a reducing loss is
            required" (TracInCPFast and TracInCPFastRandProj).
        owner: the class name, for error messages.

    Raises:
        InvalidArgumentError: when the loss reduction contradicts the flag.
        ArgumentTypeError: when ``loss_fn`` is not callable.
    """
    if loss_fn is None:
        return LossSpec(None, "output")
    if not callable(loss_fn):
        raise ArgumentTypeError(
            f"{owner}: loss_fn must be callable (e.g. nn.CrossEntropyLoss()), "
            f"got {type(loss_fn).__name__}"
        )
    if isinstance(loss_fn, type):
        example = "reduction='none'" if sample_wise_grads_per_batch is False else "reduction='sum'"
        raise ArgumentTypeError(
            f"{owner}: loss_fn is the class {loss_fn.__name__}, not a loss; pass an instance, "
            f"e.g. loss_fn={loss_fn.__name__}({example})"
        )
    reduction = getattr(loss_fn, "reduction", None)
    if reduction is not None and reduction not in REDUCTIONS:
        raise InvalidArgumentError(
            f"{owner}: loss_fn.reduction is {reduction!r}; it must be one of {REDUCTIONS}"
        )
    by_signature = False
    if reduction is None and sample_wise_grads_per_batch is not False:
        # A per-example setting keeps taking such a loss as it comes (its rows are
        # checked on every batch), so F.cross_entropy still works with batches of one.
        reduction = signature_reduction(loss_fn)
        by_signature = reduction is not None
    declared = reduction is not None
    if sample_wise_grads_per_batch is None:
        if reduction == "none":
            raise InvalidArgumentError(
                f"{owner} needs a loss that reduces over the batch, but loss_fn has "
                "reduction='none'; use reduction='sum' or 'mean'"
            )
        return LossSpec(loss_fn, reduction or "sum", declared, by_signature)
    if sample_wise_grads_per_batch:
        if reduction == "none":
            raise InvalidArgumentError(
                f"{owner}: sample_wise_grads_per_batch=True needs a loss with reduction "
                "'sum' or 'mean', but loss_fn has reduction='none'; either set "
                "sample_wise_grads_per_batch=False or use reduction='sum'"
            )
        return LossSpec(loss_fn, reduction or "sum", declared, by_signature)
    if reduction in ("sum", "mean"):
        raise InvalidArgumentError(
            f"{owner}: sample_wise_grads_per_batch=False needs a per-example loss "
            f"(reduction='none'), but loss_fn has reduction={reduction!r}; either set "
            "sample_wise_grads_per_batch=True or use reduction='none'"
        )
    return LossSpec(loss_fn, "none", declared)


def signature_reduction(loss_fn: Callable[..., Any]) -> str | None:
    """The reduction a loss without a ``reduction`` attribute states in its signature.

    A ``reduction=`` keyword bound by ``functools.partial`` (``partial(F.cross_entropy,
    reduction="sum")``) or the default of a ``reduction`` parameter (``F.cross_entropy``
    itself averages); ``None`` when the signature names none of ``"none"``, ``"sum"``,
    ``"mean"`` or cannot be read.
    """
    if isinstance(loss_fn, functools.partial):
        bound = loss_fn.keywords.get("reduction")
        if isinstance(bound, str):
            return bound if bound in REDUCTIONS else None
    try:
        param = inspect.signature(loss_fn).parameters.get("reduction")
    except (TypeError, ValueError):
        return None
    if param is None or not isinstance(param.default, str):
        return None
    return param.default if param.default in REDUCTIONS else None
