"""Rounding-error bounds for inner products, to widen a candidate set by what rounding can hide.

The Euclidean search picks its candidates from ``‖t‖² + ‖s‖² − 2 t·s``, a difference of
large numbers when the vectors sit far from the origin. A pair whose true distance is
among the ``k`` smallest can only be missed when rounding moved its value past the
cut-off, so every pair within twice the rounding bound of the cut-off is kept as a
candidate and decided by the exact distance.

The bound for an inner product of length ``n`` with unit roundoff ``u`` is
``γ Σ |aᵢ bᵢ|`` with ``γ`` the smaller of ``n u / (1 − n u)``, which holds for any
summation order (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), and
``exp(λ √n u + n u² / (1 − u)) − 1 ≈ λ √n u``, the probabilistic bound of Higham & Mary
(2019): under independent rounding errors it fails with probability at most about
``2n exp(−λ²/2)``, which for ``λ = 10`` is below ``10⁻¹⁵`` up to a million terms.
The worst-case bound alone would, for a layer of 100,000 features, widen the candidates to
pairs 1% apart and make the exact step as costly as the search.
"""

from __future__ import annotations

import math

import torch

#: Standard deviations of rounding noise the probabilistic bound allows for.
LAMBDA = 10.0


def product_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of the products a matrix multiply uses for ``dtype`` on ``device``.

    Float32 products may run in TF32 on CUDA (``torch.backends.cuda.matmul.allow_tf32``)
    or in reduced precision wherever ``torch.set_float32_matmul_precision`` allows it; the
    roundoff returned is the coarsest the settings permit.
    """
    if dtype == torch.float64:
        return 2.0**-53
    if dtype != torch.float32:
        return float(torch.finfo(dtype).eps) / 2
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0**-8  # bfloat16 products
    tf32 = precision == "high"
    if device.type == "cuda":
        tf32 = tf32 or torch.backends.cuda.matmul.allow_tf32
    return 2.0**-11 if tf32 else 2.0**-24


def dot_error_factor(n: int, u: float) -> float:
    """Factor ``γ`` with ``|fl(a·b) − a·b| ≤ γ Σ |aᵢ bᵢ|`` for vectors of length ``n``."""
    n = max(int(n), 1)
    worst = n * u / (1 - n * u) if n * u < 1 else math.inf
    likely = math.expm1(LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u))
    return min(worst, likely)


__all__ = ["LAMBDA", "dot_error_factor", "product_roundoff"]
