"""The per-example gradient engine shared by every TracIn method.

:class:`GradientEngine` turns a batch into per-example gradient representations
for a chosen set of parameters, at the model's *current* parameter values (the
caller loads a checkpoint first), and evaluates inner products and squared norms
of those representations. Linear and convolution layers are served from one
batched forward/backward pass (:mod:`.hooked`); all other parameters by
``torch.func`` (:mod:`.generic`).

Before the first use, the engine checks the per-layer strategy against plain
autograd on two single examples; a layer that fails the check (used outside its
``forward``, examples interacting inside the batch, batch not in dim 0) is moved
to the generic path, so the fast path can never change a result. A batch of one
example cannot show examples interacting, so after a check on one the next batch
of two or more is checked again (:attr:`GradientEngine.epoch` counts the changes of
strategy, after which representations computed before no longer line up).
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from proponents.data import (
    Batch,
    channels_last_only,
    chunk_batch,
    copy_batch,
    copy_layout,
    example_labels,
    in_channels_last,
    is_image,
    map_rows,
    output_rows,
    reversed_batch,
)
from proponents.errors import first_names
from proponents.gradients import representations as reps
from proponents.gradients.functional import (
    call_with,
    constants,
    grads_or_zeros,
    reads_requires_grad,
    slot_names,
)
from proponents.gradients.generic import GenericGradients
from proponents.gradients.hooked import (
    LayerShapeMismatch,
    NoClosedForm,
    conv_weight_grads,
    hooked_pass,
    layout,
    record,
    record_parts,
    represent,
)
from proponents.gradients.loss import LossSpec
from proponents.gradients.representations import DenseGrads, Grads
from proponents.gradients.selection import HookedLayer, find_hooked_layers
from proponents.user_warnings import warn

# Smallest sub-batch the forward pass of a batch is split into, and how many rounds of
# timings choose the pass shape (see GradientEngine._choose_pass).
_MIN_SUB_BATCH = 16
# (pass time below which, rounds): 4 rounds for passes under 20 ms, 2 under 200 ms, else 1.
_TIMING_ROUNDS = ((0.02, 4), (0.2, 2))

# Pass shapes chosen so far, per model and _pass_key: timing them again for each new
# object over the same model (one TracInCPFastRandProj per projection size, say) would
# cost more than a pass over a small training set.
_PASS_SHAPES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[bool, int | None]]] = (
    weakref.WeakKeyDictionary()
)

# Agreement the closed-form output gradient must reach with autograd's on the first batch.
_CLOSED_FORM_RTOL = 1e-4

# Relative tolerance of the one-time check of per-layer strategies against autograd.
_CHECK_RTOL = 1e-3
#: Examples of the first batch run again in reverse order by the strategy check.
_REVERSED_EXAMPLES = 16
#: Batches the strategy check looks at, at most, while none shows a gradient to compare.
_MAX_CHECKS = 8


class _RowsAreNotExamples(Exception):
    """An example cut out of a batch by its rows gave a model output of another number of
    rows than one (the argument), or the batch's rows reversed made the model fail (the
    cause)."""


class GradientEngine:
    """Per-example gradients of selected parameters, and their inner products.

    Args:
        model: the user's model (evaluated in its current state; never modified here).
        selected: canonical names of the parameters to differentiate.
        loss: the per-example loss description.
        owner: class name for messages.
        fast_layers: serve Linear/Conv layers with per-layer strategies; ``False``
            forces the generic ``torch.func`` path for every parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        selected: Sequence[str],
        loss: LossSpec,
        owner: str,
        fast_layers: bool = True,
    ):
        self.model = model
        self.loss = loss
        self.owner = owner
        self.selected = list(selected)
        _warn_gradient_hooks(model, self.selected, owner)
        self.hooked: list[HookedLayer] = find_hooked_layers(model, selected) if fast_layers else []
        # strategies verified on a batch of two or more examples / on one example only
        self._checked = not self.hooked
        self._checked_alone = False
        self._checks = 0
        #: incremented whenever a check changes the strategies (and so the layout of the
        #: representations): callers holding earlier ones compute them again
        self.epoch = 0
        self._protect = False
        self._channels_last = False
        self._sub_batch: int | None = None
        self._shaped_for = 0
        self._closed_form = False
        # Set when the first batch shows the model editing its input in place: every
        # model run of a batch then gets its own copy (see compute).
        self._edits_inputs = False
        # Set at the first packed batch (see _packed_if_seen).
        self._packed = False
        #: Whether a batch that looks like the usual convention may still be packed (see
        #: :meth:`_checked_on`); off once a model's output showed another row layout.
        self._may_be_packed = True
        self._set_generic()

    def _demote(self, name: str) -> None:
        """Move hooked layer ``name`` to the generic path (a new strategy epoch)."""
        self.hooked = [layer for layer in self.hooked if layer.name != name]
        self._set_generic()
        self._closed_form = False
        self.epoch += 1

    def _set_generic(self) -> None:
        taken = {n for layer in self.hooked for n in layer.params}
        names = [n for n in self.selected if n not in taken]
        self.generic = GenericGradients(self.model, names, self.loss, self.owner) if names else None

    @property
    def strategies(self) -> dict[str, str]:
        """Which strategy serves each parameter (for inspection and tests)."""
        out = {}
        for layer in self.hooked:
            for n in layer.params:
                out[n] = layer.kind
        if self.generic is not None:
            for n in self.generic.names:
                out[n] = "generic"
        return out

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        return params, buffers

    def compute(self, batch: Batch) -> list[Grads]:
        """Representations of the per-example gradients of ``batch`` (on the model's device).

        Returns:
            One representation per hooked layer, then one per generic parameter.
        """
        given = batch
        batch = self._packed_if_seen(batch)
        if self._checked and self.generic is None:
            # the hooked layers only read their own weights (for shapes and dtypes)
            params: dict[str, Tensor] = {
                la.weight: self.model.get_parameter(la.weight) for la in self.hooked
            }
            buffers: dict[str, Tensor] = {}
        else:
            params, buffers = self._state()
        check = self._needs_check(batch)
        if check or batch.size > self._shaped_for:
            # Chosen again for a larger batch: in score mode the first batch is the test
            # batch, often smaller than the training batches that make up the work.
            self._choose_pass(batch)
            self._shaped_for = batch.size
        batch = self._in_layout(batch)
        if check:
            batch = self._checked_on(params, buffers, batch)
        out: list[Grads] = []
        # The model may run more than once on this batch (a closed-form attempt, then
        # autograd; hooked layers, then the generic ones). A model that edits its input
        # in place gets a copy for each hooked run; the generic run comes last and copies
        # for its own vmap attempts. Any other model runs on the batch itself.
        copies = self._edits_inputs
        if self.hooked:
            try:
                layer_reps, self._protect = hooked_pass(
                    self.model,
                    params,
                    self.hooked,
                    self.loss,
                    batch,
                    self._protect,
                    self._sub_batch,
                    self._closed_form,
                    copies,
                )
            except LayerShapeMismatch as mismatch:
                # A layer that saw the batch whole on the checked batch but not on this one
                # (a head applied to some of the examples): the generic path serves it.
                if str(mismatch) not in {layer.name for layer in self.hooked}:
                    raise
                self._demote(str(mismatch))
                return self.compute(given)
            out.extend(layer_reps)
        if self.generic is not None:
            # the last run on the batch; GenericGradients copies for its own retries
            out.extend(DenseGrads(b) for b in self.generic(params, buffers, batch))
        return out

    def _checked_on(self, params: dict, buffers: dict, batch: Batch) -> Batch:
        """:meth:`_check` on ``batch``, or on it read as packed; the batch to run.

        A packed batch whose inputs happen to have one row per example (graphs of one
        node each, texts of one token) looks like the usual convention. It is read as
        packed when the whole batch gives an output of a row per example while one
        example cut out by its rows gives another number of rows, neither one nor the
        whole batch's (graph index ``i`` of a one-node input: ``i + 1`` rows), or the same
        rows reversed make the model fail (offsets into
        concatenated texts no longer start at 0). A model that fails on one example alone
        (one that needs batch statistics) fails as before.
        """
        try:
            self._check(params, buffers, batch)
        except _RowsAreNotExamples as cut:
            with torch.no_grad():
                whole = output_rows(self.model(*copy_batch(batch).inputs))
            # one example's output rows must differ from the whole batch's too: an output
            # of fixed rows first (prototypes) has the same rows for both
            alone = cut.args[0] if cut.args else None
            if whole == batch.size and alone != whole:
                batch = self._packed_if_seen(dataclasses.replace(batch, packed=True))
            elif cut.__cause__ is not None:
                raise cut.__cause__ from None  # the model's own error on the reversed rows
            # else an output whose first tensor does not have a row per example (an
            # auxiliary output first): rows are examples as usual, and stay so
            self._may_be_packed = False
            self._check(params, buffers, batch)
        return batch

    def _packed_if_seen(self, batch: Batch) -> Batch:
        """``batch``, read as packed once any batch was (:attr:`~proponents.data.Batch.
        packed`).

        ``vmap`` runs examples by their rows of the model inputs, which a packed batch
        does not have: the generic path differentiates packed batches whole. A hooked
        layer whose rows are the examples (a head after the pooling) keeps its per-layer
        strategy, verified again on the first packed batch against each checked
        example's gradient in the whole batch; one whose rows are not (a layer applied
        to every token) fails that check and moves to the generic path. Later batches of
        the same data are read as packed too, also one whose inputs happen to have a row
        per example (texts of one token each), which the rows would misread; for a batch
        in the usual convention the whole-batch gradients are the same.
        """
        if batch.packed and not self._packed:
            self._packed = True
            self._checked = not self.hooked
            self._checked_alone = False
            self._checks = 0
        if self._packed and not batch.packed:
            batch = dataclasses.replace(batch, packed=True)
        return batch

    @property
    def checked_on_several(self) -> bool:
        """Whether the strategies were verified on a batch of two or more examples."""
        return self._checked

    def _needs_check(self, batch: Batch) -> bool:
        return not self._checked and (not self._checked_alone or batch.size >= 2)

    def prepare(self, batch: Batch) -> None:
        """Choose the pass shape and verify the strategies on ``batch``, computing nothing.

        For a caller that is about to compute representations it keeps (the test side of
        a score matrix) from a batch too small to verify them on: preparing on a training
        batch first means they are computed once, with strategies that hold.
        """
        batch = self._packed_if_seen(batch)
        if not self._needs_check(batch):
            return
        params, buffers = self._state()
        self._choose_pass(batch)
        self._shaped_for = batch.size
        self._checked_on(params, buffers, self._in_layout(batch))

    def input_layout(self, tensor: Tensor) -> torch.memory_format:
        """The memory format this engine's passes want ``tensor`` (a batch input) in.

        A data loader that copies each batch anyway can copy into this layout directly
        (:meth:`proponents.data.TensorRowsLoader.batches`); :meth:`compute` converts
        whatever arrives, so asking is an optimisation, never a requirement.
        """
        return copy_layout(self._channels_last)(tensor)

    def _in_layout(self, batch: Batch) -> Batch:
        """``batch`` with its image inputs in the memory layout chosen for this model."""
        if not self._channels_last:
            return batch
        return dataclasses.replace(batch, inputs=in_channels_last(batch.inputs))

    def _forward_dominated(self, batch: Batch) -> bool:
        """Whether a pass is mostly the model's forward pass, on the CPU.

        True when only linear layers are differentiated through hooks (e.g. TracInCPFast:
        the whole network runs forward, the backward pass stops at the final layer) and
        the inputs are on the CPU. Per-example convolution gradients were measured slower
        from channels-last tensors, and on a GPU larger batches are always better.
        """
        tensors = [a for a in batch.inputs if isinstance(a, Tensor)]
        return (
            not batch.packed  # (never split, nor images to lay out)
            and bool(self.hooked)
            and self.generic is None
            and all(layer.kind != "conv" for layer in self.hooked)
            and bool(tensors)
            and all(a.device.type == "cpu" for a in tensors)
        )

    def _choose_pass(self, batch: Batch) -> None:
        """Memory layout and sub-batch size of forward-dominated CPU passes, timed once.

        Neither changes any value. Convolutions on the CPU are often much faster on
        channels-last image tensors, and memory-bound layers (activations, pooling) run
        faster when a sub-batch's activations stay in the processor's caches; which
        helps depends on the model and the machine. So every combination of layout
        (standard, and channels-last for 4-D float inputs) and sub-batch size (the
        whole batch, a half, a quarter; never under 16 examples) is timed on the first
        batch, in interleaved rounds so that a slow moment of the machine does not
        decide (four rounds for passes under 20 ms, two under 200 ms, one above, so a
        large model pays about six extra batches once), and the fastest is kept if it
        beats the plain pass by 5%. The choice is
        remembered for the model (per layers, batch size, input shapes and thread
        count), so later objects over the same model do not time again. The user's
        batch size still bounds memory; only the forward pass is split. The strategy
        check that follows verifies the results either way.
        """
        self._channels_last, self._sub_batch = False, None
        if not self._forward_dominated(batch):
            return
        # A batch may arrive channels-last because the loader already copied it into the
        # layout chosen for an earlier batch; the standard layout is timed as standard.
        batch = Batch(
            inputs=tuple(
                a.contiguous() if is_image(a) and channels_last_only(a) else a for a in batch.inputs
            ),
            labels=batch.labels,
            size=batch.size,
        )
        key = self._pass_key(batch)
        known = _PASS_SHAPES.setdefault(self.model, {})
        if key in known:
            self._channels_last, self._sub_batch = known[key]
            return
        self._time_pass_shapes(batch)
        known[key] = (self._channels_last, self._sub_batch)

    def _pass_key(self, batch: Batch) -> tuple:
        """What the timing of a pass depends on, besides the model itself."""
        inputs = tuple(
            (tuple(a.shape[1:]), a.dtype, a.is_contiguous()) if isinstance(a, Tensor) else None
            for a in batch.inputs
        )
        layers = tuple(layer.name for layer in self.hooked)
        return layers, batch.size, inputs, torch.get_num_threads()

    def _time_pass_shapes(self, batch: Batch) -> None:
        """Time every candidate pass shape on ``batch`` and keep the fastest."""
        images = [a for a in batch.inputs if isinstance(a, Tensor) and a.dim() == 4]
        layouts = [False]
        if images and all(a.is_floating_point() for a in images):
            layouts.append(True)
        sizes: list[int | None] = [None]
        while batch.size // 2 ** len(sizes) >= _MIN_SUB_BATCH and len(sizes) < 3:
            sizes.append(batch.size // 2 ** len(sizes))
        shapes = [(cl, size) for cl in layouts for size in sizes]
        if len(shapes) == 1:
            return
        best = dict.fromkeys(shapes, float("inf"))
        best[shapes[0]] = self._time_pass(batch, *shapes[0])
        # Short passes are timed in several rounds (a few ms are easily disturbed);
        # a pass of a large model once per shape, so tuning costs a handful of batches.
        rounds = next((n for limit, n in _TIMING_ROUNDS if best[shapes[0]] < limit), 1)
        for r in range(rounds):
            for shape in shapes[1:] if r == 0 else shapes:
                best[shape] = min(best[shape], self._time_pass(batch, *shape))
        fastest = min(shapes, key=best.__getitem__)
        if best[fastest] < 0.95 * best[shapes[0]]:
            self._channels_last, self._sub_batch = fastest

    def _time_pass(self, batch: Batch, channels_last: bool, sub_batch: int | None) -> float:
        """Seconds of one recorded pass over ``batch`` in the given shape (inf if it fails)."""
        self._channels_last = channels_last
        # copies made before the clock starts: the batch itself is still to be scored
        parts = [
            copy_batch(p) for p in chunk_batch(self._in_layout(batch), sub_batch or batch.size)
        ]
        start = time.perf_counter()
        try:
            record_parts(self.model, self.hooked, self.loss, parts, True)
        except RuntimeError:  # e.g. a .view() that needs a contiguous input
            return float("inf")
        finally:
            self._channels_last = False
        return time.perf_counter() - start

    def _check(self, params: dict, buffers: dict, batch: Batch) -> None:
        """Tune and verify the per-layer strategies on the first batch.

        A layer whose weight or bias the model uses outside the layer's own ``forward``
        (seen during this batch's pass, see :class:`~proponents.gradients.hooked.
        OutsideUses`) is moved to the generic path: its per-layer strategy would miss
        the gradient of that use, on whichever examples it matters. Convolutions get the
        fastest of their exact methods (timed here); every hooked layer is then compared
        with autograd on single examples, and a layer that disagrees is moved to the
        generic path too.
        """
        if not self.hooked:
            # every layer went to the generic path on an earlier batch (one example, or a
            # shape mismatch): nothing is left to verify, and no gradient to compare
            self._checked = True
            return
        self._checks += 1
        before = self.strategies
        # Every run here gets its own copy: the batch itself is still to be scored. The
        # pass also finds layers whose parameters the model uses outside their forward.
        outside: set[str] = set()
        records, self._protect = record(
            self.model, self.hooked, self.loss, batch, self._protect, True, outside
        )
        self.hooked = [self._tune(layer, records[layer.name]) for layer in self.hooked]
        layer_reps: list[Grads | None] = []
        for layer in self.hooked:
            try:
                layer_reps.append(
                    represent(layer, self.model, records[layer.name], batch.size, params)
                )
            except LayerShapeMismatch:
                layer_reps.append(None)
        keep = [
            rep is not None and layer.name not in outside
            for layer, rep in zip(self.hooked, layer_reps)
        ]
        if batch.packed:
            # Only a layer whose output is the model's output has one row per example by
            # construction (the loss pairs output row i with label i); any other layer's
            # rows could be the examples in an order of its own (sorted around it), which
            # a packed batch cannot be reversed to reveal.
            at_output = self._layers_at_the_output(batch)
            keep = [k and layer.name in at_output for k, layer in zip(keep, self.hooked)]
        for j, same in enumerate(self._same_when_reversed(batch, params, layer_reps)):
            keep[j] = keep[j] and same
        # first, middle and last rows (examples that interact only in part of the batch),
        # and the same among the rows with a finite, non-zero gradient: a row whose
        # gradient is zero (a hinge loss it satisfies) agrees with any scaling
        seen = [rep is None for rep in layer_reps]
        rows = _rows_to_check(layer_reps, batch.size)
        in_batch = self._packed_example_grads(params, buffers, batch, rows) if batch.packed else {}
        for i in rows:
            truth = in_batch.get(i) or self._single_example_grads(params, buffers, batch, i)
            for j, (layer, rep) in enumerate(zip(self.hooked, layer_reps)):
                if rep is None:
                    continue
                got = reps.dense_row(rep, i)
                want = layout(layer, truth[layer.weight], truth.get(layer.bias or ""))
                scale = max(float(want.norm()), float(got.norm()), 1e-30)
                finite = bool(torch.isfinite(want).all() and torch.isfinite(got).all())
                if not finite or scale <= 1e-30:
                    continue
                seen[j] = True
                if float((got - want).norm()) > _CHECK_RTOL * scale:
                    keep[j] = False
        # A batch of one cannot show examples interacting, and a batch where no checked
        # row has a gradient shows nothing: the next batch of two or more is checked too
        # (up to _MAX_CHECKS batches, for a layer whose gradient is always zero).
        conclusive = batch.size >= 2 and all(seen)
        if conclusive or self._checks >= _MAX_CHECKS:
            self._checked = True
        else:
            self._checked_alone = True
        if not all(keep):
            self.hooked = [layer for layer, k in zip(self.hooked, keep) if k]
            self._set_generic()
        self._closed_form = self._closed_form_agrees(batch, records)
        if self.strategies != before:
            self.epoch += 1

    def _same_when_reversed(
        self, batch: Batch, params: dict, layer_reps: list[Grads | None]
    ) -> list[bool]:
        """Whether each hooked layer gives every example the same gradient when the batch
        comes in reverse order.

        A ``forward`` that reorders the examples by their values before a layer (sorting
        by length, say) and restores the order after hands the layer its rows in an order
        of its own, whatever order they came in: the rows the layer records are then not
        the examples in batch order, and a row check that happens to sit where the
        reordering leaves an example in place does not see it. Reversing the batch moves
        every example; a layer whose gradients do not move with them is not served by
        its per-layer strategy. The first :data:`_REVERSED_EXAMPLES` examples (``m``) are
        run reversed, alone, against their rows in the whole batch, compared by
        ``‖a_i - b_{m-1-i}‖² = ‖a_i‖² + ‖b_{m-1-i}‖² - 2⟨a_i, b_{m-1-i}⟩``, from the
        representations' own products (no per-example
        weight gradients), to 1% of the largest norm (more for a layer in half precision,
        whose rounding moves with the rows: 100 of its machine epsilons, at most 30%).
        """
        if batch.size < 2 or batch.packed or not any(rep is not None for rep in layer_reps):
            # (a packed batch cannot be reversed by its rows: its rows of each layer are
            # compared with the examples' gradients in the whole batch instead)
            return [True] * len(layer_reps)
        # the first few examples suffice (any reordering by value moves some of them) and
        # keep the extra pass small beside the batch's own
        n = min(batch.size, _REVERSED_EXAMPLES)
        head = chunk_batch(batch, n)[0]
        try:
            records, self._protect = record(
                self.model, self.hooked, self.loss, reversed_batch(head), self._protect, True
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised unless the batch is packed
            # the whole batch ran: its rows in reverse do not (offsets into concatenated
            # texts no longer start at 0), so they may not be its examples
            if not self._may_be_packed:
                raise
            raise _RowsAreNotExamples from exc
        out = []
        anti = torch.arange(n - 1, -1, -1)
        for layer, rep in zip(self.hooked, layer_reps):
            if rep is None:
                out.append(True)
                continue
            try:
                flipped = represent(layer, self.model, records[layer.name], n, params)
            except LayerShapeMismatch:
                out.append(False)
                continue
            a, b = reps.sq_norm(rep).double()[:n], reps.sq_norm(flipped).double()
            cross = reps.dot(rep, flipped).double()[:n]
            rows = torch.arange(n, device=cross.device)
            b = b[anti.to(b.device)]
            gap = a + b - 2 * cross[rows, anti.to(cross.device)]
            # examples with a non-finite gradient (an undefined loss, say) say nothing;
            # the others still must move with the batch
            usable = torch.isfinite(gap) & torch.isfinite(a) & torch.isfinite(b)
            if not bool(usable.any()):
                out.append(True)
                continue
            scale = float(torch.maximum(a[usable].max(), b[usable].max()))
            eps = torch.finfo(params[layer.weight].dtype).eps
            rtol = min(max(1e-2, 100 * eps), 0.3)
            out.append(float(gap[usable].max()) <= rtol**2 * max(scale, 1e-30))
        return out

    def _closed_form_agrees(self, batch: Batch, records: dict) -> bool:
        """Whether the closed-form loss gradient reproduces autograd's on the first batch.

        Only tried when a single linear layer is differentiated (TracInCPFast and
        TracInCPFastRandProj, or TracInCP on one such layer): if its output is the model's
        output and the loss has a known gradient (see :func:`~proponents.gradients.loss.
        output_gradient`), passes then need no autograd graph and no backward call.
        Every example of the batch must agree with autograd to 1e-4 relative.
        """
        if len(self.hooked) != 1 or self.hooked[0].kind != "linear" or self.generic is not None:
            return False
        if reads_requires_grad(self.model):
            # the closed form runs without grad mode, where such a model's forward takes
            # its inference path (other activations than the scored forward's)
            return False
        name = self.hooked[0].name
        try:
            closed, _ = record_parts(
                self.model, self.hooked, self.loss, [batch], closed_form=True, copy_inputs=True
            )
        except NoClosedForm:
            return False
        want = [g for _, g, _ in records[name]]
        got = [g for _, g, _ in closed[0][name]]
        if len(want) != len(got):
            return False
        compared = False
        for w, g in zip(want, got):
            if w is None or g is None or w.shape != g.shape:
                return False
            # rows non-finite in both (a NaN input, say) are left out of the comparison;
            # a row only autograd makes non-finite (an undefined loss) rules the closed
            # form out, since it would score that example; every other row must agree
            rows = torch.isfinite(w.reshape(w.shape[0], -1)).all(1)
            if bool((~rows & torch.isfinite(g.reshape(g.shape[0], -1)).all(1)).any()):
                return False
            if not bool(rows.any()):
                continue
            w, g = w[rows], g[rows]
            scale = max(float(w.abs().max()), 1e-30)
            if not bool(torch.isfinite(g).all()) or float((w - g).abs().max()) > (
                _CLOSED_FORM_RTOL * scale
            ):
                return False
            compared = True
        return compared

    def _tune(self, layer: HookedLayer, calls: list) -> HookedLayer:
        """Pick the faster exact method for a convolution by timing both once."""
        if layer.kind != "conv" or not calls or calls[0][1] is None:
            return layer
        module = self.model.get_submodule(layer.name)
        x, g, _ = calls[0]
        if x.dim() < 2 or x.shape[0] != g.shape[0]:
            return layer
        best, best_time = layer.method, float("inf")
        for method in ("unfold", "shifts", "grouped"):
            try:
                conv_weight_grads(module, x, g, method)  # warm-up
                _wait_for(x.device)
                start = time.perf_counter()
                conv_weight_grads(module, x, g, method)
                _wait_for(x.device)
                elapsed = time.perf_counter() - start
            except RuntimeError:
                continue
            if elapsed < best_time:
                best, best_time = method, elapsed
        return dataclasses.replace(layer, method=best)

    def _layers_at_the_output(self, batch: Batch) -> set[str]:
        """Names of the hooked layers whose one call in a forward pass of ``batch``
        returns the very tensor the model returns."""
        seen: dict[str, list[object]] = {}

        def hook(name: str):
            def keep(module: nn.Module, args: object, output: object) -> None:
                seen.setdefault(name, []).append(output)

            return keep

        handles = [
            self.model.get_submodule(layer.name).register_forward_hook(hook(layer.name))
            for layer in self.hooked
        ]
        try:
            with torch.no_grad():
                out = self.model(*copy_batch(batch).inputs)
        finally:
            for handle in handles:
                handle.remove()
        return {name for name, outs in seen.items() if len(outs) == 1 and outs[0] is out}

    def _packed_example_grads(
        self, params: dict, buffers: dict, batch: Batch, rows: list[int]
    ) -> dict[int, dict[str, Tensor]]:
        """The hooked layers' gradients of the losses of examples ``rows`` of a packed
        batch, each taken in the whole batch (its examples cannot be run alone): what the
        generic path gives them (:meth:`~proponents.gradients.generic.GenericGradients.
        _packed`)."""
        names = [n for layer in self.hooked for n in layer.params]
        if not names:
            return {}
        truth = GenericGradients(self.model, names, self.loss, self.owner)(params, buffers, batch)
        out: dict[int, dict[str, Tensor]] = {}
        for i in rows:
            out[i] = {n: g[i].reshape(params[n].shape) for n, g in zip(names, truth, strict=True)}
        return out

    def _single_example_grads(
        self, params: dict, buffers: dict, batch: Batch, i: int
    ) -> dict[str, Tensor]:
        from torch.utils._pytree import tree_leaves

        names = [n for layer in self.hooked for n in layer.params]
        leaves = {n: params[n].clone().requires_grad_(True) for n in names}
        example = copy_batch(batch)
        inputs = map_rows(example.inputs, batch.size, lambda x: x[i : i + 1])
        versions = [a._version for a in tree_leaves(inputs) if isinstance(a, Tensor)]
        # the other parameters as the hooked pass sees them (flags kept where read)
        rest = constants(self.model, params, reads_requires_grad(self.model))
        with torch.enable_grad():
            slots = slot_names(self.model)
            out = call_with(self.model, {**rest, **leaves, **buffers}, inputs, slots)
            rows = output_rows(out)
            if self._may_be_packed and not batch.packed and rows not in (1, None):
                # one row of each input may not be one example: a packed batch whose
                # inputs happen to have as many rows as it has examples (one-node graphs)
                raise _RowsAreNotExamples(rows)
            value = self.loss.example_loss(out, example_labels(example.labels, i, batch.size))
            grads = grads_or_zeros(value, [leaves[n] for n in names])
            if not bool(torch.isfinite(value.detach())):  # an undefined loss: NaN scores
                grads = [torch.full_like(g, float("nan")) for g in grads]
        after = [a._version for a in tree_leaves(inputs) if isinstance(a, Tensor)]
        if after != versions:  # the model edits its input in place
            self._edits_inputs = True
        return dict(zip(names, grads))

    @staticmethod
    def dot(test: list[Grads], train: list[Grads]) -> Tensor:
        """Summed inner products over all groups, ``(n_test, n_train)`` (in float32 for
        16-bit gradients: see :func:`~proponents.gradients.representations.widened`)."""
        total = reps.dot(reps.widened(test[0]), reps.widened(train[0]))
        for t, r in zip(test[1:], train[1:]):
            total = total + reps.dot(reps.widened(t), reps.widened(r))
        return total

    @staticmethod
    def sq_norm(grads: list[Grads]) -> Tensor:
        """Squared norms of the full per-example gradients, ``(B,)`` (float32 for 16-bit
        gradients, as :meth:`dot`)."""
        total = reps.sq_norm(reps.widened(grads[0]))
        for g in grads[1:]:
            total = total + reps.sq_norm(reps.widened(g))
        return total

    @staticmethod
    def result_dtype(grads: list[Grads]) -> torch.dtype:
        """The dtype scores are returned in: the gradients' own (the model's)."""
        out = reps.dtype_of(grads[0])
        for g in grads[1:]:
            out = torch.promote_types(out, reps.dtype_of(g))
        return out

    @staticmethod
    def finite(grads: list[Grads]) -> Tensor:
        """``(B,)`` mask of examples whose gradients are all finite."""
        mask = reps.finite_mask(grads[0])
        for g in grads[1:]:
            mask = mask & reps.finite_mask(g)
        return mask

    @staticmethod
    def concat(parts: list[list[Grads]]) -> list[Grads]:
        """Join per-batch representations along the example dimension."""
        return [reps.concat([p[k] for p in parts]) for k in range(len(parts[0]))]

    @staticmethod
    def sum_examples(grads: list[Grads]) -> list[Grads]:
        """The gradient summed over examples, as one row per group."""
        return [reps.sum_examples(g) for g in grads]


def _rows_to_check(layer_reps: list[Grads | None], size: int) -> list[int]:
    """Rows compared with autograd by the strategy check: the first, middle and last of
    the batch, and the first, middle and last of those whose gradient is finite and
    non-zero in some layer (usually the same rows)."""
    rows = {0, size // 2, size - 1}
    useful = torch.zeros(size, dtype=torch.bool)
    for rep in layer_reps:
        if rep is not None:
            norms = reps.sq_norm(rep).detach().cpu()
            useful |= torch.isfinite(norms) & (norms > 0)
    found = useful.nonzero().flatten().tolist()
    if found:
        rows |= {found[0], found[len(found) // 2], found[-1]}
    return sorted(rows)


def _wait_for(device: torch.device) -> None:
    """Let queued GPU work finish, so that a wall-clock timing measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warn_gradient_hooks(model: nn.Module, selected: Sequence[str], owner: str) -> None:
    """Warn about selected parameters with gradient hooks of their own
    (``param.register_hook``: a mask that freezes some rows, a scale).

    Per-example gradients are taken from layer outputs or from copies of the parameters,
    which such hooks never see: the scores use the loss gradient as autograd gives it
    before them. Module hooks (forward and backward) are not concerned: they run.
    """
    hooked = [
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if name in selected and getattr(p, "_backward_hooks", None)
    ]
    if hooked:
        warn(
            f"{owner}: parameter(s) {first_names(hooked)} have gradient hooks "
            "(Tensor.register_hook), which the per-example gradients do not pass through: "
            "the scores use each example's "
            "loss gradient as it is before the hooks. To score a masked or scaled gradient, "
            "put the mask in the forward pass (a parametrization, say), or leave those "
            "parameters out with layers="
        )
