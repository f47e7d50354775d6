"""Inner products with an affine layer's outputs, taken on the layer's (narrower) input side.

When a layer computes ``y = A x + b`` (``nn.Linear``, ``nn.Conv1d/2d/3d``), every stored
source activation is ``s = A x_s + b`` for the layer input ``x_s`` that produced it, so
for any test activation ``t``

    ⟨t, s⟩ = ⟨Aᵀ t, x_s⟩ + ⟨t, b⟩,

an identity, not an approximation. Keeping the source examples' layer *inputs* beside
their activations lets every query pull its few test rows back through the layer
(``Aᵀ t``, the gradient of ``⟨t, A x⟩`` with respect to ``x``: a matrix product for
``Linear``, a transposed convolution for the convolutions) and multiply them with the
stored inputs instead of multiplying ``t`` with the activations. For a layer that widens
its input (a convolution from 16 to 32 channels at one resolution, a transformer's
feed-forward expansion) that is proportionally fewer operations, and storing the inputs
costs no arithmetic at all. The test inputs are not needed: ``t`` may come from inputs
of another size (through a strided convolution) or from saved activations.

This is used only for the exact module types above (a subclass may change ``forward``),
with zero padding, no hooks, and only when it saves at least a third of the work;
:meth:`Pullback.agrees` checks it on real rows before the inputs are stored, so a layer
that is not what its type says is simply searched directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn import grad as conv_grad
from torch.nn.modules.conv import _ConvNd

#: Use a pullback only when the layer input is at most this fraction of the output's width.
MAX_WIDTH_FRACTION = 2 / 3

_CONV_INPUT_GRAD: dict[type, Any] = {
    nn.Conv1d: conv_grad.conv1d_input,
    nn.Conv2d: conv_grad.conv2d_input,
    nn.Conv3d: conv_grad.conv3d_input,
}
_CONV_FORWARD: dict[type, Any] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}
#: The transposed convolutions, the same adjoint; on the CPU several times faster from
#: channels-last inputs than the input gradient above.
_CONV_TRANSPOSE: dict[type, tuple[Any, torch.memory_format]] = {
    nn.Conv1d: (F.conv_transpose1d, torch.contiguous_format),
    nn.Conv2d: (F.conv_transpose2d, torch.channels_last),
    nn.Conv3d: (F.conv_transpose3d, torch.channels_last_3d),
}


def may_pull_back(module: nn.Module) -> bool:
    """Whether ``module``'s type is one a pullback can be built for (shapes decide the rest)."""
    return type(module) is nn.Linear or type(module) in _CONV_INPUT_GRAD


class Pullback:
    """The adjoint of one affine layer, for inputs of a fixed per-example shape.

    Args:
        module: an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (exact type).
        input_shape: the per-example shape of the layer's input, e.g. ``(16, 16, 16)``.
        padding: the convolution's padding as a tuple of ints (ignored for Linear).
    """

    def __init__(
        self, module: nn.Module, input_shape: tuple[int, ...], padding: tuple[int, ...] = ()
    ) -> None:
        self.module = module
        self.input_shape = tuple(input_shape)
        self.width = math.prod(self.input_shape)
        self._padding = padding
        self._output_padding: tuple[int, ...] | None = None

    @classmethod
    def for_layer(
        cls,
        module: nn.Module,
        input_shape: tuple[int, ...],
        output_shape: tuple[int, ...],
    ) -> Pullback | None:
        """A pullback for ``module`` when its type allows one and it saves work, else None."""
        kind = type(module)
        padding: tuple[int, ...] = ()
        if kind is nn.Linear and isinstance(module, nn.Linear):
            if not input_shape or input_shape[-1] != module.in_features:
                return None
        elif kind in _CONV_INPUT_GRAD and isinstance(module, _ConvNd):
            resolved = _numeric_padding(module)
            if resolved is None or len(input_shape) != len(resolved) + 1:
                return None
            padding = resolved
        else:
            return None
        if module._forward_hooks or module._forward_pre_hooks:  # noqa: SLF001
            return None  # a user hook may change what the layer receives or returns
        if math.prod(input_shape) > MAX_WIDTH_FRACTION * math.prod(output_shape):
            return None
        return cls(module, input_shape, padding)

    def pull(self, outputs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(Aᵀ t, ⟨t, b⟩)`` for rows ``t`` of the output shape ``(n, *out)``.

        Returns:
            ``(n, width)`` rows ``Aᵀ t`` (flattened input shape) and ``(n,)`` offsets
            ``⟨t, b⟩`` (zeros without a bias), in ``dtype``.
        """
        m = self.module
        t = outputs.to(dtype)
        weight = _tensor(m.weight).detach().to(dtype)
        bias = _tensor(m.bias).detach().to(dtype) if m.bias is not None else None
        n = int(t.shape[0])
        if isinstance(m, nn.Linear):
            pulled = t @ weight  # (n, *, in_features)
            offset = (t @ bias).reshape(n, -1).sum(1) if bias is not None else None
        else:
            pulled = self._conv_adjoint(t, weight)
            # per-channel sums, in whatever layout t has (no copy)
            offset = t.sum(dim=tuple(range(2, t.dim()))) @ bias if bias is not None else None
        if offset is None:
            offset = torch.zeros(n, dtype=dtype, device=t.device)
        return pulled.reshape(n, self.width), offset

    def _conv_adjoint(self, t: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        assert isinstance(m, _ConvNd)
        n = int(t.shape[0])
        spatial = self.input_shape[1:]
        if self._output_padding is None:
            # the transposed convolution's output size must come out as the input's
            out = t.shape[2:]
            self._output_padding = tuple(
                size - ((o - 1) * st - 2 * p + d * (k - 1) + 1)
                for size, o, st, p, d, k in zip(
                    spatial, out, m.stride, self._padding, m.dilation, m.kernel_size
                )
            )
        valid = all(
            0 <= op < max(st, d) for op, st, d in zip(self._output_padding, m.stride, m.dilation)
        )
        if not valid:
            grad = _CONV_INPUT_GRAD[type(m)]
            return grad(
                (n, *self.input_shape), weight, t, m.stride, self._padding, m.dilation, m.groups
            )
        transpose, layout = _CONV_TRANSPOSE[type(m)]
        if t.device.type == "cpu":
            t = t.contiguous(memory_format=layout)
        return transpose(
            t, weight, None, m.stride, self._padding, self._output_padding, m.groups, m.dilation
        )

    def apply(self, inputs: Tensor, dtype: torch.dtype) -> Tensor:
        """The layer's linear part ``A x`` (no bias) for rows of the input shape ``(n, *in)``."""
        m = self.module
        x = inputs.to(dtype)
        weight = _tensor(m.weight).detach().to(dtype)
        if isinstance(m, nn.Linear):
            return x @ weight.T
        assert isinstance(m, _ConvNd)
        conv = _CONV_FORWARD[type(m)]
        return conv(x, weight, None, m.stride, self._padding, m.dilation, m.groups)

    def gain_estimate(self, iterations: int = 30) -> float:
        """``‖A‖₂``, the most the layer's linear part can stretch an input, estimated.

        Power iteration on ``AᵀA`` from a fixed-seed start (a local generator: the global
        one is untouched), in float64 on the weight's device, over one example of the
        input shape. The estimate approaches ``‖A‖₂`` from below, so callers allow
        headroom; it bounds ``‖Aᵀ t‖`` for every unit test row ``t``.
        """
        weight = _tensor(self.module.weight)
        generator = torch.Generator(device=weight.device).manual_seed(0)
        v = torch.randn(
            (1, *self.input_shape), generator=generator, dtype=torch.float64, device=weight.device
        )
        gain = 0.0
        for _ in range(iterations):
            norm = torch.linalg.vector_norm(v)
            if not bool(norm > 0) or not bool(torch.isfinite(norm)):
                break
            v = v / norm
            out = self.apply(v, torch.float64)
            gain = max(gain, float(torch.linalg.vector_norm(out)))
            v = self.pull(out, torch.float64)[0].reshape(v.shape)
        return gain

    def agrees(self, inputs: Tensor, outputs: Tensor) -> bool:
        """Whether ``⟨Aᵀ t_i, x_j⟩ + ⟨t_i, b⟩`` reproduces ``⟨t_i, t_j⟩`` for a few examples.

        ``inputs`` and ``outputs`` are the layer inputs ``x`` and outputs ``t`` of the
        same examples. Compared in float64, up to float32 round-off relative to
        ``‖t_i‖ ‖t_j‖``.
        """
        n = int(outputs.shape[0])
        if n == 0 or int(inputs.shape[0]) != n:
            return False
        t = outputs.reshape(n, -1).double()
        rows, offsets = self.pull(outputs, torch.float64)
        via = rows @ inputs.reshape(n, -1).double().T + offsets[:, None]
        direct = t @ t.T
        norms = torch.linalg.vector_norm(t, dim=1)
        tol = 1e-4 * norms[:, None] * norms[None, :] + 1e-30
        return bool(torch.isfinite(via).all()) and bool(((via - direct).abs() <= tol).all())


def _tensor(value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return value


def _numeric_padding(module: _ConvNd) -> tuple[int, ...] | None:
    """A convolution's zero padding as ints, or None when it is not symmetric zero padding."""
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return None
    padding = module.padding
    kernel = tuple(module.kernel_size)
    dilation = tuple(module.dilation)
    if padding == "valid":
        return tuple(0 for _ in kernel)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            return None  # PyTorch pads such kernels asymmetrically
        return tuple(t // 2 for t in total)
    if isinstance(padding, tuple) and all(isinstance(p, int) for p in padding):
        return padding
    return None


__all__ = ["MAX_WIDTH_FRACTION", "Pullback", "may_pull_back"]
