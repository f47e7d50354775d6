"""Per-example gradients of linear and convolution layers from one batched pass.

For a layer ``y = W x + b`` evaluated on a batch whose examples do not interact
(eval mode), the gradient of the summed per-example losses at the layer output
is, row by row, each example's own gradient ``g_i``. The per-example weight
gradient is then ``g_i x_i^T`` (summed over positions), so one forward pass that
records each layer's input and one backward pass to the layer outputs give every
example's gradient — without forming a weight gradient at all.

* Linear layers yield :class:`FactoredGrads` (inputs and output gradients).
* Convolutions yield :class:`DenseGrads` built from unfolded inputs
  (``im2col``): ``grad_W_i = g_i @ unfold(x_i)^T``.

A layer called several times in one forward pass contributes the sum over its
calls, which for factors is a concatenation along the position axis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from proponents.data import Batch, check_packed_output, chunk_batch, copy_batch
from proponents.gradients.functional import reads_requires_grad
from proponents.gradients.loss import LossSpec, labels_fit_closed_form, output_gradient
from proponents.gradients.representations import DenseGrads, FactoredGrads, Grads, concat
from proponents.gradients.selection import HookedLayer


class LayerShapeMismatch(Exception):
    """A recorded activation does not carry the batch in its first dimension."""


Calls = list[tuple[Tensor, Tensor | None, Tensor]]


def record(
    model: nn.Module,
    layers: Sequence[HookedLayer],
    loss: LossSpec,
    batch: Batch,
    protect: bool = False,
    copy_inputs: bool = False,
    outside: set[str] | None = None,
) -> tuple[dict[str, Calls], bool]:
    """One forward and backward pass recording, per layer and call, ``(input, grad, output)``.

    The model runs as it is, with its own parameters; for the duration of the pass only
    the recorded layers' parameters require gradients (so autograd builds no graph for
    the rest of the network, and frozen layers can still be recorded), and the flags are
    restored afterwards. Only gradients with respect to the layer outputs are taken, so
    no parameter's ``.grad`` is touched.

    Args:
        model: the model, holding the checkpoint's weights.
        layers: the layers to record.
        loss: the per-example loss description.
        batch: the batch, already on the model's device.
        protect: hand a copy of each recorded output to the rest of the model, so that
            in-place operations after the layer (``ReLU(inplace=True)``) cannot alter the
            tensor whose gradient is taken. Without it, such a modification is detected
            through the tensor's version counter and the pass is redone with protection.
        copy_inputs: run the model on a copy of the batch (see :func:`record_parts`).
        outside: a set to add the names of layers to whose parameters the pass uses
            outside the layers' own forward (see :func:`record_parts`).

    Returns:
        The records, and whether protection was needed (callers keep it on from then on).
    """
    records, protect = record_parts(
        model, layers, loss, [batch], protect, copy_inputs=copy_inputs, outside=outside
    )
    return records[0], protect


class NoClosedForm(Exception):
    """The output gradient of this batch cannot be written in closed form."""


def record_parts(
    model: nn.Module,
    layers: Sequence[HookedLayer],
    loss: LossSpec,
    parts: Sequence[Batch],
    protect: bool = False,
    closed_form: bool = False,
    copy_inputs: bool = False,
    outside: set[str] | None = None,
) -> tuple[list[dict[str, Calls]], bool]:
    """:func:`record` for each of several batches, with hooks and flags set up once.

    Args:
        closed_form: take the loss gradient from :func:`~proponents.gradients.loss.
            output_gradient` instead of autograd, with no graph at all. Only for one
            layer, called once, whose output is the model's output.
        copy_inputs: run the model on copies of the parts, so that ``parts`` stay as
            they are for a later pass over the same batch (for a model that edits its
            input in place; a pass redone with protection copies them again).
        outside: when given (the strategy check), the forward passes and losses run
            under :class:`OutsideUses`, and the names of the layers whose weight or bias
            takes part, differentiably, in any computation outside the layer's own
            ``forward`` are added to it. The per-layer strategy sees only the layer's
            own calls, so such a layer belongs on the generic path. Costs a Python call
            per torch operation, so only the check asks for it.

    Raises:
        NoClosedForm: with ``closed_form=True``, when a part does not meet those
            conditions or its loss has no closed form (nothing is changed then).
    """
    given = parts
    if copy_inputs:
        parts = [copy_batch(part) for part in parts]
    if closed_form and not all(labels_fit_closed_form(loss, part.labels) for part in parts):
        raise NoClosedForm(layers[0].name if layers else "")  # before any model run
    current: dict[str, list[tuple[Tensor, Tensor, int]]] = {}
    recording = {"on": True}
    handles = [
        model.get_submodule(layer.name).register_forward_hook(
            _recorder(current, layer.name, protect and not closed_form, recording),
            with_kwargs=True,
        )
        for layer in layers
    ]
    wanted = {n for layer in layers for n in layer.params}
    watch: OutsideUses | None = None
    results: list[dict[str, Calls]] = []
    modified = False
    try:
        if closed_form:
            for part in parts:
                current.clear()
                current.update((layer.name, []) for layer in layers)
                output = model(*part.inputs)
                check_packed_output(part, output)
                calls = current[layers[0].name] if len(layers) == 1 else []
                grad = None
                # the layer's output must reach the loss as the layer returned it: one
                # edited in place after the layer (a final ReLU(inplace=True)) is the
                # model's output object but no longer the layer's output
                if len(calls) == 1 and calls[0][1] is output and output._version == calls[0][2]:
                    grad = output_gradient(loss, output, part.labels, labels_checked=True)
                if grad is None:
                    raise NoClosedForm(layers[0].name if layers else "")
                results.append({layers[0].name: [(calls[0][0], grad, output)]})
            return results, protect
        if outside is not None:
            watch = OutsideUses(model, layers)
        with torch.enable_grad(), _differentiating(model, wanted):
            for part in parts:
                current.clear()
                current.update((layer.name, []) for layer in layers)
                recording["on"] = True
                with watch if watch is not None else nullcontext():
                    output = model(*part.inputs)
                    check_packed_output(part, output)
                    calls = [c for layer in layers for c in current[layer.name]]
                    total = loss.batch_total(
                        output, part.labels, part.size, marked=[o for _, o, _ in calls]
                    )
                if not protect and any(o._version != v for _, o, v in calls):
                    modified = True
                    break
                recording["on"] = False  # a checkpointed block rerun by backward
                grads = iter(output_grads(total, [o for _, o, _ in calls]))
                results.append(
                    {
                        layer.name: [(x, next(grads), o) for x, o, _ in current[layer.name]]
                        for layer in layers
                    }
                )
    finally:
        for h in handles:
            h.remove()
        if watch is not None:
            watch.remove()
    if outside is not None and watch is not None:
        outside |= watch.found
    if modified:
        redone = record_parts(
            model, layers, loss, given, True, copy_inputs=copy_inputs, outside=outside
        )
        return redone[0], True
    return results, protect


class OutsideUses(TorchFunctionMode):
    """Finds hooked layers whose parameters are used outside the layers' own ``forward``.

    A per-layer strategy rebuilds a layer's gradient from its own calls only: a weight
    that the model also reads elsewhere (``F.linear(x, self.fc.weight)`` in the model's
    ``forward``, ``self.fc.weight.T`` as a decoder, a loss that regularises it, another
    module handed the tensor) gets gradient from that use too, which those calls never
    show. While this mode is active, every torch call that receives one of the layers'
    parameter tensors (the objects themselves, anywhere in its arguments) and returns a
    tensor that requires gradients is such a use unless it happens inside the layer's
    own ``forward``; the layer's name is then added to :attr:`found`. Reading a
    parameter's shape, detaching it, or using it under ``torch.no_grad()`` passes no
    gradient and is not counted.

    "Inside its own ``forward``" is the window between a forward pre-hook registered
    after any the model has and a forward hook placed before all others, so a user's
    own hooks that compute with the weight count as outside. Construction registers
    these hooks; :meth:`remove` removes them.

    Args:
        model: the model.
        layers: the hooked layers to watch.
    """

    def __init__(self, model: nn.Module, layers: Sequence[HookedLayer]):
        super().__init__()
        self.found: set[str] = set()
        self._owner: dict[int, str] = {}
        self._inside: dict[str, int] = {}
        self._handles = []
        for layer in layers:
            module = model.get_submodule(layer.name)
            for p in module.parameters(recurse=False):
                self._owner[id(p)] = layer.name
            self._inside[layer.name] = 0
            self._handles.append(module.register_forward_pre_hook(self._enter(layer.name)))
            self._handles.append(
                module.register_forward_hook(
                    self._leave(layer.name), prepend=True, always_call=True
                )
            )

    def _enter(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._inside[name] += 1

        return hook

    def _leave(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._inside[name] = max(0, self._inside[name] - 1)

        return hook

    def remove(self) -> None:
        """Remove the hooks this object registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if len(self.found) < len(self._inside):
            users = {
                self._owner[id(t)]
                for t in tree_leaves((args, kwargs))
                if isinstance(t, Tensor) and id(t) in self._owner
            }
            users = {u for u in users if not self._inside[u] and u not in self.found}
            if users and any(isinstance(t, Tensor) and t.requires_grad for t in tree_leaves(out)):
                self.found |= users
        return out


def output_grads(total: Tensor, outputs: Sequence[Tensor]) -> list[Tensor | None]:
    """Gradients of ``total`` with respect to recorded layer outputs; ``None`` (a zero
    gradient) for an output it does not depend on, or that autograd does not track (a
    layer run under ``torch.no_grad()`` inside the model's ``forward``: its parameters
    get no gradient, as in training)."""
    tracked = [i for i, o in enumerate(outputs) if o.requires_grad]
    out: list[Tensor | None] = [None] * len(outputs)
    if tracked and total.requires_grad:
        found = torch.autograd.grad(total, [outputs[i] for i in tracked], allow_unused=True)
        for i, g in zip(tracked, found):
            out[i] = g
    return out


@contextmanager
def _differentiating(model: nn.Module, wanted: set[str]) -> Iterator[None]:
    """Inside, the parameters named in ``wanted`` require gradients.

    The others keep their flags in a model whose forward reads them (a transformer
    layer's inference fast path, see :func:`~proponents.gradients.functional.
    reads_requires_grad`): the pass then runs the forward the model trains with. In any
    other model they are switched off, so that autograd records nothing for them.
    """
    keep = reads_requires_grad(model)
    changed = []
    for name, p in model.named_parameters():
        want = name in wanted or (keep and p.requires_grad)
        if p.requires_grad != want:
            changed.append(p)
            p.requires_grad_(want)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(not p.requires_grad)


def represent(
    layer: HookedLayer,
    model: nn.Module,
    calls: Calls,
    batch_size: int,
    params: Mapping[str, Tensor],
) -> Grads:
    """The per-example gradient representation of one recorded layer.

    Raises:
        LayerShapeMismatch: when the layer's input does not have the batch in dim 0.
    """
    module = model.get_submodule(layer.name)
    if layer.kind == "linear":
        return _linear_rep(layer, module, calls, batch_size, params)
    return _conv_rep(layer, module, calls, batch_size, params)


def hooked_pass(
    model: nn.Module,
    params: Mapping[str, Tensor],
    layers: Sequence[HookedLayer],
    loss: LossSpec,
    batch: Batch,
    protect: bool = False,
    sub_batch: int | None = None,
    closed_form: bool = False,
    copy_inputs: bool = False,
) -> tuple[list[Grads], bool]:
    """Per-example gradients of ``layers`` for ``batch``, one representation per layer.

    Args:
        sub_batch: run the pass over consecutive pieces of at most this many examples
            (the representations are joined); ``None`` for one pass over the batch.
        closed_form: try the closed-form loss gradient first (see :func:`record_parts`);
            a batch it does not fit goes through autograd.
        copy_inputs: every model run gets its own copy of the batch (for a model seen to
            edit its input in place: the autograd pass after a failed closed-form one then
            still sees the batch as given).

    Returns:
        The representations, and whether outputs needed protection (see :func:`record`).
    """
    parts = chunk_batch(batch, sub_batch) if sub_batch else [batch]
    records = None
    if closed_form:
        try:
            records, protect = record_parts(model, layers, loss, parts, protect, True, copy_inputs)
        except NoClosedForm:
            records = None
    if records is None:
        records, protect = record_parts(model, layers, loss, parts, protect, False, copy_inputs)
    per_part = [
        [represent(la, model, rec[la.name], part.size, params) for la in layers]
        for rec, part in zip(records, parts)
    ]
    if len(per_part) == 1:
        return per_part[0], protect
    return [concat([p[k] for p in per_part]) for k in range(len(layers))], protect


def _recorder(
    store: dict[str, list[tuple[Tensor, Tensor, int]]],
    name: str,
    protect: bool,
    recording: dict[str, bool],
):
    """A forward hook (``with_kwargs=True``) that records the layer's input and output.

    The input is the first positional argument, or the ``input`` keyword
    (``self.fc(input=x)``). Calls made while ``recording["on"]`` is false are not
    recorded: the forward that activation checkpointing reruns during the backward pass.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        if recording["on"] and isinstance(x, Tensor):
            store[name].append((x.detach(), output, output._version))
        return output.clone() if protect else None

    return hook


def _check_batch(x: Tensor, batch_size: int, layer: HookedLayer) -> None:
    """The layer's input must be ``(batch, ...)`` with at least one feature dimension: a
    1-D input (a Linear applied to a vector parameter) has no batch dimension, even when
    its length is the batch size."""
    if x.dim() < 2 or x.shape[0] != batch_size:
        raise LayerShapeMismatch(layer.name)


def _linear_rep(
    layer: HookedLayer,
    module: nn.Module,
    calls: list[tuple[Tensor, Tensor | None, Tensor]],
    batch_size: int,
    params: Mapping[str, Tensor],
) -> FactoredGrads:
    weight = params[layer.weight]
    out_f, in_f = weight.shape
    extra = 1 if layer.bias is not None else 0
    a_parts, g_parts = [], []
    for x, g, o in calls:
        _check_batch(x, batch_size, layer)
        a = x.reshape(batch_size, -1, in_f)
        if extra:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        grad = torch.zeros_like(o) if g is None else g
        a_parts.append(a)
        g_parts.append(grad.reshape(batch_size, -1, out_f))
    if not a_parts:
        return FactoredGrads(
            weight.new_zeros(batch_size, 0, in_f + extra), weight.new_zeros(batch_size, 0, out_f)
        )
    if len(a_parts) == 1:
        return FactoredGrads(a_parts[0], g_parts[0])
    return FactoredGrads(torch.cat(a_parts, dim=1), torch.cat(g_parts, dim=1))


def _conv_geometry(module: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], ...]:
    """Kernel size, stride, padding and dilation as 2-D pairs (a Conv1d as height 1)."""
    padding = module.padding
    if isinstance(padding, str):  # "same"/"valid": the layer has resolved it at build time
        raise ValueError(f"string padding {padding!r} has no per-example gradient path")
    if isinstance(module, nn.Conv1d):
        return (
            (1, module.kernel_size[0]),
            (1, module.stride[0]),
            (0, padding[0]),
            (1, module.dilation[0]),
        )
    pairs = (module.kernel_size, module.stride, padding, module.dilation)
    return tuple((int(v[0]), int(v[1])) for v in pairs)


def conv_weight_grads(module: nn.Module, x: Tensor, g: Tensor, method: str) -> Tensor:
    """Per-example weight gradients of a convolution, flattened to ``(B, weight.numel())``.

    Args:
        module: the ``nn.Conv1d``/``nn.Conv2d`` layer.
        x: its input ``(B, C, *spatial)``.
        g: the loss gradient at its output ``(B, O, *spatial_out)``.
        method: ``"unfold"`` (im2col, then one batched matrix product), ``"shifts"`` (the
            same columns gathered from strided views of the padded input, one kernel offset
            at a time, which is often faster than im2col) or ``"grouped"`` (one convolution
            backward with the batch folded into groups). All are exact; which is fastest
            depends on the layer's shape, so the engine times them once.
    """
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        raise TypeError(f"expected an nn.Conv1d or nn.Conv2d, got {type(module).__name__}")
    batch_size = x.shape[0]
    kernel, stride, padding, dilation = _conv_geometry(module)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        g = g.unsqueeze(2)
    groups = module.groups
    out_c, in_c = g.shape[1], x.shape[1]
    if method == "grouped":
        weight_shape = (batch_size * out_c, in_c // groups, *kernel)
        _, w, _ = torch.ops.aten.convolution_backward(
            g.reshape(1, batch_size * out_c, *g.shape[2:]),
            x.reshape(1, batch_size * in_c, *x.shape[2:]),
            x.new_empty(weight_shape),
            None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            batch_size * groups,
            [False, True, False],
        )
        return w.reshape(batch_size, -1)
    if method == "shifts":
        return _conv_grads_by_shifts(x, g, groups, kernel, stride, padding, dilation)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    positions = cols.shape[-1]
    if groups == 1:
        w = torch.bmm(g.reshape(batch_size, out_c, positions), cols.transpose(1, 2))
        return w.reshape(batch_size, -1)
    cols = cols.view(batch_size, groups, -1, positions)
    gg = g.reshape(batch_size, groups, out_c // groups, positions)
    return torch.einsum("bgol,bgil->bgoi", gg, cols).reshape(batch_size, -1)


def _conv_grads_by_shifts(
    x: Tensor,
    g: Tensor,
    groups: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    batch_size = x.shape[0]
    out_c, out_h, out_w = g.shape[1:]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    views = [
        xp[
            :,
            :,
            ky * dilation[0] : ky * dilation[0] + (out_h - 1) * stride[0] + 1 : stride[0],
            kx * dilation[1] : kx * dilation[1] + (out_w - 1) * stride[1] + 1 : stride[1],
        ]
        for ky in range(kernel[0])
        for kx in range(kernel[1])
    ]
    # (B, C, kh * kw, Ho, Wo): channel-major, then kernel offset, as in the weight layout
    cols = torch.stack(views, dim=2).reshape(batch_size * groups, -1, out_h * out_w)
    gg = g.reshape(batch_size * groups, out_c // groups, out_h * out_w)
    w = torch.bmm(cols, gg.transpose(1, 2)).transpose(1, 2)  # (B * G, O / G, C / G * kh * kw)
    return w.reshape(batch_size, -1)


def _conv_rep(
    layer: HookedLayer,
    module: nn.Module,
    calls: list[tuple[Tensor, Tensor | None, Tensor]],
    batch_size: int,
    params: Mapping[str, Tensor],
) -> DenseGrads:
    weight = params[layer.weight]
    out_c = weight.shape[0]
    w_total: Tensor | None = None
    b_total: Tensor | None = None
    for x, g, _ in calls:
        _check_batch(x, batch_size, layer)
        if g is None:
            continue
        w = conv_weight_grads(module, x, g, layer.method)
        w_total = w if w_total is None else w_total + w
        if layer.bias is not None:
            b = g.reshape(batch_size, out_c, -1).sum(dim=2)
            b_total = b if b_total is None else b_total + b
    if w_total is None:
        w_total = weight.new_zeros(batch_size, weight.numel())
    if layer.bias is None:
        return DenseGrads(w_total)
    if b_total is None:
        b_total = weight.new_zeros(batch_size, out_c)
    return DenseGrads(torch.cat([w_total, b_total], dim=1))


def layout(layer: HookedLayer, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
    """One example's parameter gradients flattened in the layout of its representation."""
    if layer.kind == "linear":
        w = weight_grad
        if bias_grad is not None:
            w = torch.cat([w, bias_grad.unsqueeze(1)], dim=1)
        return w.reshape(-1)
    parts = [weight_grad.reshape(-1)]
    if bias_grad is not None:
        parts.append(bias_grad.reshape(-1))
    return torch.cat(parts)
