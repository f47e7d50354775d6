"""Per-example gradients of any differentiable parameters with ``torch.func``.

``vmap(grad_and_value(loss_of_one_example))`` evaluates each example as a batch of one,
vectorised across the batch: no Python loop over examples. Where ``vmap`` cannot
run a model (an operator without a batching rule, data-dependent control flow),
:class:`GenericGradients` falls back once, with a warning, to a per-example
autograd loop that gives the same numbers more slowly.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from proponents.data import (
    Batch,
    check_packed_output,
    copy_batch,
    example_labels,
    has_string_rows,
    holds_examples,
    map_rows,
)
from proponents.gradients.functional import (
    call_with,
    constants,
    grads_or_zeros,
    reads_requires_grad,
    slot_names,
)
from proponents.gradients.loss import LossSpec, nan_where_undefined
from proponents.user_warnings import warn


def _math_attention():
    """Run scaled-dot-product attention with its plain math kernel.

    The fused (flash) CPU kernel has no vmap batching rule, so vmap would evaluate it
    one example at a time; the math kernel is made of batched operators.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _versions(batch: Batch) -> list[int]:
    """The version counters of the batch's input tensors (an in-place edit bumps one)."""
    return [t._version for t in tree_leaves(batch.inputs) if isinstance(t, Tensor)]


def _nans_to_zero(saved: Tensor) -> Tensor:
    """``saved`` with its NaNs replaced by zeros (see GenericGradients._contain)."""
    if not saved.is_floating_point() or bool(torch.isfinite(saved).all()):
        return saved
    return torch.where(torch.isnan(saved), 0, saved)


def _non_finite_to_largest(saved: Tensor) -> Tensor:
    """``saved`` with its NaNs replaced by zeros and its infinities by the largest
    finite values of their sign: where an example's own infinity stands for a limit (a
    ``-inf`` mask before a ``log_softmax``, whose backward pass takes ``exp`` of it),
    the backward pass gives it the same zero, and another example's zero gradient
    times it is still zero."""
    if not saved.is_floating_point() or bool(torch.isfinite(saved).all()):
        return saved
    return torch.nan_to_num(saved, nan=0.0)


def _unchanged(saved: Tensor) -> Tensor:
    return saved


# What torch raises where vmap cannot run a model: a missing batching rule, `.item()` or
# data-dependent control flow, an in-place write it cannot batch (RuntimeError,
# NotImplementedError), or a check of an operator on the shapes it sees (ValueError,
# TypeError, IndexError). Anything else (an OSError of a loss that reads a file, a
# KeyError, a user's own exception class) is the model's or the loss's own failure: it
# propagates, as it would from the loop, instead of switching this object to the loop for
# good. Running out of memory propagates too: a smaller batch_size is the fix, not a
# permanently slower path.
_VMAP_FAILURES = (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError)
_NOT_VMAPS = (torch.OutOfMemoryError, MemoryError)

#: Gradients held at once by the per-example Jacobian of a packed batch (see
#: GenericGradients._packed): the block of examples is sized to this.
_PACKED_BLOCK_BYTES = 64 << 20


class GenericGradients:
    """Per-example gradients of a fixed list of parameters, one ``(B, P_k)`` block each.

    Args:
        model: the model whose structure is called through ``functional_call``.
        names: canonical names of the parameters to differentiate, in output order.
        loss: the per-example loss description.
        owner: class name used in the fallback warning.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], loss: LossSpec, owner: str):
        self.model = model
        self.names = list(names)
        self.loss = loss
        self.owner = owner
        self.use_loop = False
        #: whether the constants keep the model's requires_grad flags (see _split)
        self._keep_flags = reads_requires_grad(model)
        #: whether packed batches' Jacobians are taken one backward pass per example
        #: (``None``: not timed yet; see _jacobian_rows)
        self._packed_loop: bool | None = None
        # Whether the model edits its input in place: unknown until vmap has run once.
        self._edits_inputs: bool | None = None

    def __call__(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: Batch
    ) -> list[Tensor]:
        """Flattened per-example gradients of each parameter in ``names`` order.

        Blocks are kept apart (not concatenated) so no extra copy of the largest
        temporary is made; inner products simply sum over blocks. A packed batch
        (:attr:`~proponents.data.Batch.packed`) is differentiated whole (:meth:`_packed`).
        """
        if batch.packed:
            return self._packed(params, buffers, batch)
        if not self.use_loop and has_string_rows(batch.inputs, batch.size):
            # vmap maps tensors only: each example would be handed every example's string
            self.use_loop = True
            warn(
                f"{self.owner}: the model inputs hold a list of strings, one per example, "
                "which torch.func.vmap cannot map over; per-example gradients of the "
                "parameters outside Linear/Conv layers are taken in a slower loop over examples",
                RuntimeWarning,
            )
        if not self.use_loop:
            # vmap may fail part-way through the model, after the model edited its input
            # in place: the loop that takes over must still see the batch as given, so
            # the attempt runs on a copy until a first success shows whether the model
            # edits its input at all (and on a copy for good if it does).
            attempt = batch if self._edits_inputs is False else copy_batch(batch)
            before = _versions(attempt)
            try:
                out = self._vectorised(params, buffers, attempt)
            except _NOT_VMAPS as err:
                raise err from None
            except _VMAP_FAILURES as err:
                if attempt is batch and _versions(batch) != before:
                    raise RuntimeError(
                        f"{self.owner}: torch.func.vmap could not run this model, and the "
                        "model had already changed its input in place on this batch (it did "
                        "not on earlier ones), so the per-example fallback cannot start from "
                        "the batch as given. Make the model's forward leave its input "
                        "unchanged (e.g. x = x * 2 instead of x.mul_(2))."
                    ) from err
                self.use_loop = True
                warn(
                    f"{self.owner}: torch.func.vmap could not run this model "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); per-example "
                    "gradients fall back to a slower loop over examples (the same values up to "
                    "float rounding), for this and later calls of this object",
                    RuntimeWarning,
                )
            else:
                if self._edits_inputs is None:
                    self._edits_inputs = _versions(attempt) != before
                return out
        return self._looped(params, buffers, batch)

    def _split(self, params: Mapping[str, Tensor]) -> tuple[dict, dict]:
        """The differentiated parameters, and the others as constants (with the model's
        ``requires_grad`` flags where its forward reads them: see :func:`constants`)."""
        chosen = {n: params[n].detach() for n in self.names}
        rest = {n: p for n, p in params.items() if n not in chosen}
        return chosen, constants(self.model, rest, self._keep_flags)

    def _vectorised(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: Batch
    ) -> list[Tensor]:
        chosen, const = self._split(params)
        model, loss = self.model, self.loss
        slots = slot_names(model)

        n = batch.size
        # Only tensors with a row per example are mapped over (and get their batch
        # dimension back inside); a shared one, such as a (T, T) mask, reaches every
        # example whole.
        rows_in = [holds_examples(x, n) for x in tree_leaves(batch.inputs)]
        rows_lab = [holds_examples(x, n) for x in tree_leaves(batch.labels)]

        def one_example(tree: Any, rows: list[bool]) -> Any:
            leaves, spec = tree_flatten(tree)
            return tree_unflatten([x.unsqueeze(0) if r else x for x, r in zip(leaves, rows)], spec)

        def example_loss(p: dict, inputs: tuple, labels: Any) -> Tensor:
            one = one_example(inputs, rows_in)
            out = call_with(model, {**const, **p, **buffers}, one, slots)
            return loss.example_loss(out, one_example(labels, rows_lab))

        in_inputs = tree_map(lambda x: 0 if holds_examples(x, n) else None, batch.inputs)
        in_labels = tree_map(lambda x: 0 if holds_examples(x, n) else None, batch.labels)
        # torch.func.grad differentiates inside whatever the grad mode outside it is; with
        # constants that require gradients (kept flags), autograd must record nothing
        # outside it, or the results would hold a graph through those constants.
        outer = torch.no_grad() if self._keep_flags else torch.enable_grad()
        with outer, warnings.catch_warnings(), _math_attention():
            # vmap's notice that an operator runs through its slower fallback is not
            # actionable for our users; results are unaffected.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            per_example, values = vmap(
                grad_and_value(example_loss), in_dims=(None, in_inputs, in_labels)
            )(chosen, batch.inputs, batch.labels)
        return [
            nan_where_undefined(per_example[n].reshape(batch.size, -1), values) for n in self.names
        ]

    def _packed(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: Batch
    ) -> list[Tensor]:
        """Per-example gradients of a batch whose examples only its model output tells
        apart: one forward pass of the whole batch, each example's loss from its rows of
        the output (:meth:`~proponents.gradients.loss.LossSpec.example_losses`), and the
        Jacobian of those losses (:meth:`_packed_jacobian`).

        An example whose loss is not finite gets NaN gradients, as everywhere
        (:func:`~proponents.gradients.loss.nan_where_undefined`); the others' gradients
        are what each gets alone, also beside such an example (:meth:`_contain`).
        """
        chosen, const = self._split(params)
        grads, losses = self._packed_jacobian(chosen, const, buffers, batch)
        undefined = ~torch.isfinite(losses)
        if bool(undefined.any()):  # (one check of n losses: nothing more in the usual case)
            self._contain(chosen, const, buffers, batch, grads, undefined)
        return [nan_where_undefined(g, losses) for g in grads]

    def _packed_jacobian(
        self,
        chosen: Mapping[str, Tensor],
        const: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        batch: Batch,
        rows: Tensor | None = None,
        saved: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """The forward pass of the packed ``batch`` and the gradients of the losses of
        examples ``rows`` (default: all), as ``(len(rows), numel)`` blocks, one per
        parameter, with the ``(n,)`` losses.

        The Jacobian is taken a block of examples at a time so that at most about
        :data:`_PACKED_BLOCK_BYTES` of gradients are held at once, by backward passes
        vectorised over the examples (``is_grads_batched``) or one per example, whichever
        :meth:`_jacobian_rows` measured faster. ``saved`` (a function of a tensor) maps
        each tensor the forward pass saves for the backward one (see :meth:`_contain`).
        """
        slots = slot_names(self.model)
        leaves = {n: p.clone().requires_grad_(True) for n, p in chosen.items()}
        targets = [leaves[n] for n in self.names]
        n = batch.size
        hooks = (
            contextlib.nullcontext()
            if saved is None
            else torch.autograd.graph.saved_tensors_hooks(saved, _unchanged)
        )
        with torch.enable_grad():
            with hooks:
                out = call_with(self.model, {**const, **leaves, **buffers}, batch.inputs, slots)
                check_packed_output(batch, out)
                losses = self.loss.example_losses(out, batch.labels, n)
            picked = torch.arange(n) if rows is None else rows.cpu()
            m = len(picked)
            if not m or not losses.requires_grad:  # no example depends on these parameters
                return [losses.new_zeros(m, t.numel(), dtype=t.dtype) for t in targets], (
                    losses.detach()
                )
            # one (m, numel) block per parameter, filled a block of examples at a time
            grads = [losses.new_empty(m, t.numel(), dtype=t.dtype) for t in targets]
            width = sum(t.numel() * t.element_size() for t in targets)
            step = max(1, min(m, _PACKED_BLOCK_BYTES // max(width, 1)))
            for start in range(0, m, step):
                block = picked[start : start + step]
                self._jacobian_rows(losses, targets, block, start, grads)
        return grads, losses.detach()

    def _contain(
        self,
        chosen: Mapping[str, Tensor],
        const: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        batch: Batch,
        grads: list[Tensor],
        undefined: Tensor,
    ) -> None:
        """Give the examples of a packed batch whose losses are finite, beside examples
        whose losses are not (``undefined``, ``(n,)``), the gradients they have alone,
        in place in ``grads``.

        The examples share the tensors of the forward pass, so the backward pass of one
        example's loss multiplies the values another example put in them by zeros: an
        example's NaN or infinite activations (or its loss's) make every example's
        gradient NaN (``0 * nan``), through any layer before the pooling. The rows that
        came out non-finite are taken again, only in such a batch, from a forward pass
        whose tensors saved for the backward pass have their NaNs replaced by zeros
        (values that only other examples' zero gradients meet), then, for rows still not
        finite, also their infinities by the largest finite values
        (:func:`_non_finite_to_largest`); a row is kept once it is finite. A row still
        non-finite (an example whose own gradient is) stays as it was.
        """
        dirty = ~undefined.to(grads[0].device)
        for g in grads:
            dirty &= ~torch.isfinite(g).all(1)
        for saved in (_nans_to_zero, _non_finite_to_largest):
            rows = dirty.nonzero().flatten()
            if not len(rows):
                return
            again, _ = self._packed_jacobian(chosen, const, buffers, batch, rows, saved)
            finite = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
            for g in again:
                finite &= torch.isfinite(g).all(1).to(rows.device)
            for whole, g in zip(grads, again):
                whole[rows[finite]] = g[finite.to(g.device)]
            dirty[rows[finite]] = False

    def _jacobian_rows(
        self, losses: Tensor, targets: list[Tensor], rows: Tensor, at: int, out: list[Tensor]
    ) -> None:
        """Write the gradients of ``losses[rows]`` with respect to each of ``targets``
        into rows ``at:at + len(rows)`` of ``out`` (one matrix per target), keeping the
        graph for the next rows.

        Two exact methods: one backward pass vectorised over the rows
        (``is_grads_batched``), or one backward pass per row. Which is faster depends on
        the layers (an embedding's batched backward materialises a dense table per row
        through a slow fallback): both are timed on the first block, and the faster is
        kept. The batched one is left for good where autograd cannot run it (sparse
        gradients, say).
        """
        if self._packed_loop is None:
            began = time.perf_counter()
            if self._batched_rows(losses, targets, rows, at, out):
                middle = time.perf_counter()
                self._looped_rows(losses, targets, rows, at, out)
                self._packed_loop = time.perf_counter() - middle < middle - began
                return
        if self._packed_loop or not self._batched_rows(losses, targets, rows, at, out):
            self._looped_rows(losses, targets, rows, at, out)

    def _batched_rows(
        self, losses: Tensor, targets: list[Tensor], rows: Tensor, at: int, out: list[Tensor]
    ) -> bool:
        """The rows by one vectorised backward pass; ``False`` where autograd cannot."""
        m = len(rows)
        picks = torch.zeros(m, losses.shape[0], dtype=losses.dtype, device=losses.device)
        picks[torch.arange(m), rows] = 1
        try:
            grads = torch.autograd.grad(
                losses,
                targets,
                grad_outputs=picks,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
        except (RuntimeError, NotImplementedError):
            self._packed_loop = True  # e.g. sparse gradients: vmap over backward cannot
            return False
        for whole, g in zip(out, grads):
            if g is None:
                whole[at : at + m] = 0
            else:
                whole[at : at + m] = (g.to_dense() if g.is_sparse else g).reshape(m, -1)
        return True

    def _looped_rows(
        self, losses: Tensor, targets: list[Tensor], rows: Tensor, at: int, out: list[Tensor]
    ) -> None:
        """The rows by one backward pass each."""
        for k, i in enumerate(rows.tolist()):
            for whole, g in zip(out, grads_or_zeros(losses[i], targets, retain_graph=True)):
                whole[at + k] = g.reshape(-1)

    def _looped(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batch: Batch
    ) -> list[Tensor]:
        chosen, const = self._split(params)
        slots = slot_names(self.model)
        rows = []
        for i in range(batch.size):
            one = map_rows(batch.inputs, batch.size, itemgetter(slice(i, i + 1)))
            leaves = {n: p.clone().requires_grad_(True) for n, p in chosen.items()}
            with torch.enable_grad():
                out = call_with(self.model, {**const, **leaves, **buffers}, one, slots)
                value = self.loss.example_loss(out, example_labels(batch.labels, i, batch.size))
                grads = grads_or_zeros(value, [leaves[n] for n in self.names])
            undefined = not bool(torch.isfinite(value.detach()))
            rows.append([g.reshape(-1) * (math.nan if undefined else 1.0) for g in grads])
        return [torch.stack([row[k] for row in rows]) for k in range(len(self.names))]
