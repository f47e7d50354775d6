"""Leave the user's model exactly as it was found.

Every public call loads checkpoints into the model and switches it to eval mode;
:func:`preserved` snapshots parameters, buffers, ``requires_grad`` flags and
train/eval mode of every submodule, and puts them back on the way out, also
when the call is interrupted by an exception or ``KeyboardInterrupt``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from proponents.allocator import keep_freed_memory


@contextmanager
def preserved(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager that restores ``model`` to its state on entry."""
    params = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)}
    modes = {n: m.training for n, m in model.named_modules(remove_duplicate=False)}
    grads = {
        n: (None if p.grad is None else p.grad.detach().clone())
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters(remove_duplicate=False):
                if n in params:
                    p.copy_(params[n])
                    p.requires_grad_(flags[n])
                    p.grad = grads[n]
            for n, b in model.named_buffers(remove_duplicate=False):
                if n in buffers and b is not None:
                    b.copy_(buffers[n])
        for n, m in model.named_modules(remove_duplicate=False):
            if n in modes:
                m.training = modes[n]


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
