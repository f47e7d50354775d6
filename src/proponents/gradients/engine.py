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
to the generic path, so the fast path can never change a result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from proponents.data import Batch
from proponents.gradients import representations as reps
from proponents.gradients.generic import GenericGradients
from proponents.gradients.hooked import (
    LayerShapeMismatch,
    conv_weight_grads,
    hooked_pass,
    layout,
    record,
    represent,
)
from proponents.gradients.loss import LossSpec
from proponents.gradients.representations import DenseGrads, Grads
from proponents.gradients.selection import HookedLayer, find_hooked_layers


def _channels_last(inputs: tuple) -> tuple:
    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, Tensor) and a.dim() == 4 and a.is_floating_point()
        else a
        for a in inputs
    )


# Relative tolerance of the one-time check of per-layer strategies against autograd.
_CHECK_RTOL = 1e-3


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
        self.hooked: list[HookedLayer] = find_hooked_layers(model, selected) if fast_layers else []
        self._checked = not self.hooked
        self._protect = False
        self._channels_last = False
        self._set_generic()

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
        params, buffers = self._state()
        if not self._checked:
            self._choose_layout(batch)
            batch = self._in_layout(batch)
            self._check(params, buffers, batch)
        else:
            batch = self._in_layout(batch)
        out: list[Grads] = []
        if self.hooked:
            layer_reps, self._protect = hooked_pass(
                self.model, params, self.hooked, self.loss, batch, self._protect
            )
            out.extend(layer_reps)
        if self.generic is not None:
            out.extend(DenseGrads(block) for block in self.generic(params, buffers, batch))
        return out

    def _in_layout(self, batch: Batch) -> Batch:
        """``batch`` with its image inputs in the memory layout chosen for this model."""
        if not self._channels_last:
            return batch
        return Batch(inputs=_channels_last(batch.inputs), labels=batch.labels, size=batch.size)

    def _choose_layout(self, batch: Batch) -> None:
        """Feed 4-D image batches channels-last when that makes the recorded pass faster.

        Only the memory layout changes, not the values; convolutions on the CPU are often
        much faster channels-last. This is tried when no convolution is differentiated
        (e.g. TracInCPFast on a CNN: the whole network runs forward, only the final layer
        is differentiated), since per-example convolution gradients were measured slower
        from channels-last tensors. Timed once, on the first batch; the strategy check that
        follows verifies the results either way.
        """
        self._channels_last = False
        images = [a for a in batch.inputs if isinstance(a, Tensor) and a.dim() == 4]
        if (
            not self.hooked
            or self.generic is not None
            or any(layer.kind == "conv" for layer in self.hooked)
            or not images
            or any(a.device.type != "cpu" or not a.is_floating_point() for a in images)
        ):
            return
        timings = {}
        for channels_last in (False, True, False, True):
            self._channels_last = channels_last
            start = time.perf_counter()
            try:
                record(self.model, self.hooked, self.loss, self._in_layout(batch), True)
            except RuntimeError:  # e.g. a .view() that needs a contiguous input
                timings[channels_last] = float("inf")
                continue
            timings[channels_last] = time.perf_counter() - start  # keeps the second run
        self._channels_last = timings[True] < 0.9 * timings[False]

    def _check(self, params: dict, buffers: dict, batch: Batch) -> None:
        """Tune and verify the per-layer strategies on the first batch.

        Convolutions get the faster of their two exact methods (timed here); every
        hooked layer is then compared with autograd on single examples, and a layer
        that disagrees is moved to the generic path.
        """
        self._checked = True
        records, self._protect = record(self.model, self.hooked, self.loss, batch, self._protect)
        self.hooked = [self._tune(layer, records[layer.name]) for layer in self.hooked]
        layer_reps: list[Grads | None] = []
        for layer in self.hooked:
            try:
                layer_reps.append(
                    represent(layer, self.model, records[layer.name], batch.size, params)
                )
            except LayerShapeMismatch:
                layer_reps.append(None)
        keep = [rep is not None for rep in layer_reps]
        for i in sorted({0, batch.size - 1}):
            truth = self._single_example_grads(params, buffers, batch, i)
            for j, (layer, rep) in enumerate(zip(self.hooked, layer_reps)):
                if rep is None:
                    continue
                got = reps.as_dense(rep)[i]
                want = layout(layer, truth[layer.weight], truth.get(layer.bias or ""))
                scale = max(float(want.norm()), float(got.norm()), 1e-30)
                finite = bool(torch.isfinite(want).all() and torch.isfinite(got).all())
                if finite and float((got - want).norm()) > _CHECK_RTOL * scale:
                    keep[j] = False
        if not all(keep):
            self.hooked = [layer for layer, k in zip(self.hooked, keep) if k]
            self._set_generic()

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

    def _single_example_grads(
        self, params: dict, buffers: dict, batch: Batch, i: int
    ) -> dict[str, Tensor]:
        def pick(x):
            return x[i : i + 1] if isinstance(x, Tensor) and x.dim() > 0 else x

        from torch.utils._pytree import tree_map

        names = [n for layer in self.hooked for n in layer.params]
        leaves = {n: params[n].clone().requires_grad_(True) for n in names}
        with torch.enable_grad():
            out = functional_call(
                self.model, {**params, **leaves, **buffers}, tree_map(pick, batch.inputs)
            )
            value = self.loss.example_loss(out, tree_map(pick, batch.labels))
            grads = torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)
        return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads)}

    @staticmethod
    def dot(test: list[Grads], train: list[Grads]) -> Tensor:
        """Summed inner products over all groups, ``(n_test, n_train)``."""
        total = reps.dot(test[0], train[0])
        for t, r in zip(test[1:], train[1:]):
            total = total + reps.dot(t, r)
        return total

    @staticmethod
    def sq_norm(grads: list[Grads]) -> Tensor:
        """Squared norms of the full per-example gradients, ``(B,)``."""
        total = reps.sq_norm(grads[0])
        for g in grads[1:]:
            total = total + reps.sq_norm(g)
        return total

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


def _wait_for(device: torch.device) -> None:
    """Let queued GPU work finish, so that a wall-clock timing measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
