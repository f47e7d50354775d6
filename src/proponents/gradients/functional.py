"""Calling a model with other tensors in its parameter and buffer slots, and the
per-example gradients autograd gives for them.

``torch.func.functional_call`` with its default ``tie_weights=True`` swaps a tensor in
once per *name* it has, and a submodule registered under two names (``self.head =
self.fc``, a block repeated in a ``ModuleList``) has every slot twice: the second swap
records the first swap's tensor as the original, and a plain tensor is left in the slot
afterwards (``'weight' is not an nn.Parameter`` at the next call). :func:`call_with`
swaps each *slot* (a module object and an attribute) exactly once, under its first name,
and gives a tensor shared by several slots (tied weights) to all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call


def slot_names(model: nn.Module) -> dict[str, str]:
    """``{slot name: canonical name}`` for every parameter and buffer slot of ``model``.

    The canonical name is the one ``named_parameters()`` / ``named_buffers()`` give the
    tensor (its first name); every slot holding that tensor, each under the first name
    it is reached by, maps to it. Compute it once per batch: it walks the module tree.
    """
    canonical: dict[int, str] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        canonical.setdefault(id(tensor), name)
    out: dict[str, str] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for attr, tensor in table.items():
                if tensor is None or (id(module), attr) in seen:
                    continue
                seen.add((id(module), attr))
                name = f"{prefix}.{attr}" if prefix else attr
                if id(tensor) in canonical:
                    out[name] = canonical[id(tensor)]
    return out


def call_with(
    model: nn.Module, tensors: Mapping[str, Tensor], args: Any, slots: Mapping[str, str]
) -> Any:
    """``model(*args)`` with ``tensors`` (by canonical name) in the slots ``slots`` maps
    (from :func:`slot_names`); slots of tensors not given keep their own."""
    given = {slot: tensors[name] for slot, name in slots.items() if name in tensors}
    return functional_call(model, given, args, tie_weights=False)


#: Module types whose ``forward`` takes another code path (PyTorch's inference "fast
#: path": fused kernels, nested tensors that leave padded positions at zero) when grad mode
#: is on but none of their parameters requires gradients. A model holding one of them is
#: differentiated with every parameter's ``requires_grad`` as the user set it (see
#: :func:`reads_requires_grad`), so that the scored forward is the one it trains with.
REQUIRES_GRAD_DEPENDENT: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoder,
    nn.TransformerEncoderLayer,
    nn.MultiheadAttention,
)


def reads_requires_grad(model: nn.Module) -> bool:
    """Whether ``model``'s forward may depend on its parameters' ``requires_grad`` flags.

    True when it contains a module of :data:`REQUIRES_GRAD_DEPENDENT` (or a subclass).
    Such a model's parameters keep their flags while it is differentiated: only the
    selected ones are switched on. Any other model has, besides the selected parameters,
    every flag switched off for the duration (autograd then records nothing for the rest
    of the network, which its forward cannot tell apart).
    """
    return any(isinstance(m, REQUIRES_GRAD_DEPENDENT) for m in model.modules())


def constants(
    model: nn.Module, params: Mapping[str, Tensor], keep_flags: bool
) -> dict[str, Tensor]:
    """Detached ``params`` (by canonical name) to run the model with as constants.

    With ``keep_flags``, each carries the ``requires_grad`` flag of the model's parameter
    of that name (a new leaf sharing its storage), so that a forward that reads the flags
    (see :func:`reads_requires_grad`) takes its training path; run it where autograd
    records nothing for them (under ``torch.no_grad()`` around ``torch.func.grad``) or
    differentiate only the tensors wanted.
    """
    out = {n: t.detach() for n, t in params.items()}
    if keep_flags:
        for name, p in model.named_parameters():
            if p.requires_grad and name in out and out[name].is_floating_point():
                out[name] = out[name].requires_grad_(True)
    return out


def grads_or_zeros(
    value: Tensor, leaves: Sequence[Tensor], retain_graph: bool = False
) -> list[Tensor]:
    """Dense gradients of ``value`` with respect to ``leaves``, zero for a leaf it does not
    depend on, also when it depends on none at all (a loss computed under ``no_grad``
    from the chosen parameters, or without them); ``retain_graph`` keeps the graph for
    another call."""
    if not value.requires_grad:
        return [torch.zeros_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad(value, list(leaves), allow_unused=True, retain_graph=retain_graph)
    out = []
    for leaf, g in zip(leaves, grads):
        if g is None:
            g = torch.zeros_like(leaf)
        elif g.is_sparse:  # an nn.Embedding(sparse=True)
            g = g.to_dense()
        out.append(g)
    return out
