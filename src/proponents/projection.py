"""Seeded random projections of per-example gradients of a linear layer.

A final linear layer's per-example gradient is ``G = sum_t g_t a_t^T`` (``O x I``,
bias folded into ``a``). :class:`GradientProjection` maps it to ``d`` numbers whose
inner products are unbiased estimates of the gradients' inner products.

Dimension rule (per checkpoint; the embedding concatenates checkpoints):

* ``projection_dim=None`` or ``projection_dim >= O * I``: no projection, the exact
  ``O * I`` gradient (a factor is never "projected" to more dimensions than it has).
* otherwise, when the Gaussian matrix ``(O * I, d)`` fits ``max_matrix_elements``:
  a dense Johnson-Lindenstrauss projection of the whole gradient, ``d = projection_dim``.
* otherwise a Kronecker projection ``(R_g g) (x) (R_a a)`` with
  ``d_g = min(O, floor(sqrt(d)))`` and ``d_a = min(I, floor(d / d_g))``, so
  ``d_g * d_a <= projection_dim`` (the spec's bound: at most ``projection_dim`` per
  checkpoint), within ``d_g`` of it unless a factor is smaller.

Matrices come from a local ``torch.Generator`` seeded with ``seed`` (on the CPU, so
results do not depend on the device); the global RNG is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from proponents.gradients.representations import FactoredGrads, Grads, as_dense

# Largest dense projection matrix (elements) before switching to the Kronecker form.
MAX_MATRIX_ELEMENTS = 1 << 25


@dataclass
class GradientProjection:
    """Projection of one checkpoint's per-example gradients.

    Attributes:
        kind: ``"none"``, ``"dense"`` or ``"kronecker"``.
        dim: output dimension.
        matrices: the projection matrices (``(P, d)`` for dense; ``(O, d_g)`` and
            ``(I, d_a)`` for Kronecker).
    """

    kind: str
    dim: int
    matrices: tuple[Tensor, ...]

    @classmethod
    def create(
        cls,
        out_features: int,
        in_features: int,
        projection_dim: int | None,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
        max_matrix_elements: int = MAX_MATRIX_ELEMENTS,
    ) -> GradientProjection:
        """Draw the projection for a layer with ``out_features x in_features`` gradients."""
        full = out_features * in_features
        if projection_dim is None or projection_dim >= full:
            return cls("none", full, ())
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        if full * projection_dim <= max_matrix_elements:
            r = torch.randn(full, projection_dim, generator=gen, dtype=torch.float64)
            r = (r / math.sqrt(projection_dim)).to(device=device, dtype=dtype)
            return cls("dense", projection_dim, (r,))
        d_g = min(out_features, math.isqrt(projection_dim))
        d_a = min(in_features, projection_dim // d_g)
        r_g = torch.randn(out_features, d_g, generator=gen, dtype=torch.float64) / math.sqrt(d_g)
        r_a = torch.randn(in_features, d_a, generator=gen, dtype=torch.float64) / math.sqrt(d_a)
        if d_g == out_features:
            r_g = torch.eye(out_features, dtype=torch.float64)
        if d_a == in_features:
            r_a = torch.eye(in_features, dtype=torch.float64)
        return cls(
            "kronecker",
            d_g * d_a,
            (r_g.to(device=device, dtype=dtype), r_a.to(device=device, dtype=dtype)),
        )

    def __call__(self, rep: Grads) -> Tensor:
        """Project per-example gradients to ``(B, dim)``."""
        if self.kind == "none":
            return as_dense(rep)
        if self.kind == "dense":
            (r,) = self.matrices
            if isinstance(rep, FactoredGrads) and rep.positions == 1 and rep._dense is None:
                o, i = rep.g.shape[2], rep.a.shape[2]
                # sum_{o,i} g_o a_i R[(o,i), k] without forming the O x I gradient
                tmp = rep.a[:, 0] @ r.view(o, i, -1).transpose(0, 1).reshape(i, -1)
                return torch.einsum("bo,bok->bk", rep.g[:, 0], tmp.view(-1, o, self.dim))
            return as_dense(rep) @ r
        r_g, r_a = self.matrices
        if not isinstance(rep, FactoredGrads):
            dense = as_dense(rep).view(rep.size, r_g.shape[0], r_a.shape[0])
            return torch.einsum("boi,od,ie->bde", dense, r_g, r_a).reshape(rep.size, -1)
        pg = rep.g @ r_g  # (B, T, d_g)
        pa = rep.a @ r_a  # (B, T, d_a)
        return torch.einsum("btd,bte->bde", pg, pa).reshape(rep.size, -1)
