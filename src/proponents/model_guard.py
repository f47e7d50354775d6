"""Leave the user's model exactly as it was found.

Every public call loads checkpoints into the model and switches it to eval mode;
:func:`preserved` sets the values of every parameter and buffer aside (the
model works on copies meanwhile), with their gradients, ``requires_grad`` flags
and the train/eval mode of every submodule, and puts them back on the way out,
also when the call is interrupted by an exception or ``KeyboardInterrupt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from proponents.allocator import keep_freed_memory


def _registered(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """Every parameter and buffer slot: ``(module, name in it, kind, tensor)``."""
    slots = []
    for module in model.modules():
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, tensor in table.items():
                if tensor is not None:
                    slots.append((module, name, kind, tensor))
    return slots


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager that restores ``model`` to its state on entry.

    Inside, every parameter and buffer keeps its identity but holds a copy of its
    values, and parameters hold no ``.grad``; the original values and gradients are
    set aside untouched and put back on the way out (no copy back). A parameter or
    buffer object that the body replaced in its module (``load_state_dict(...,
    assign=True)``, say) is put back too, so references the user holds stay valid.
    """
    slots = _registered(model)
    originals: dict[int, tuple[torch.Tensor, torch.Tensor | None, bool]] = {}
    for _, _, kind, tensor in slots:
        if id(tensor) in originals:  # tied: one tensor in several slots
            continue
        grad = tensor.grad if kind == "param" else None
        originals[id(tensor)] = (tensor.data, grad, tensor.requires_grad)
    modes = {m: m.training for m in model.modules()}
    try:
        copied: set[int] = set()
        with torch.no_grad():
            for _, _, kind, tensor in slots:
                if id(tensor) not in copied:  # a tied tensor is copied once
                    copied.add(id(tensor))
                    tensor.data = originals[id(tensor)][0].clone()
                    if kind == "param":
                        tensor.grad = None
        yield model
    finally:
        for module, name, kind, tensor in slots:
            table: dict[str, Any] = module._parameters if kind == "param" else module._buffers
            table[name] = tensor
            data, grad, flag = originals[id(tensor)]
            tensor.data = data
            if kind == "param":
                tensor.grad = grad
                tensor.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training


@contextmanager
def call_scope(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Everything a public call runs inside: the model restored on the way out and in eval
    mode meanwhile, the global RNG state restored (iterating a ``DataLoader`` draws from
    it, also on ``device`` when that is a GPU), gradients off unless a step turns them on,
    and glibc's allocator keeping freed memory for reuse (:mod:`proponents.allocator`).
    """
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with (
        keep_freed_memory(),
        preserved(model),
        torch.random.fork_rng(devices=rng_devices),
        torch.no_grad(),
    ):
        model.eval()
        yield
