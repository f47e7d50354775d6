"""Per-example gradient representations and their inner products.

A batch's gradients for one parameter group are held in one of two forms:

* :class:`DenseGrads` — the flattened per-example gradient, ``(B, P)``.
* :class:`FactoredGrads` — for a linear map ``y_t = W a_t (+ b)`` applied at ``T``
  positions, the per-example gradient is ``sum_t g_t a_t^T`` with ``g_t`` the
  gradient of the loss at the layer output. Keeping ``a`` ``(B, T, I)`` and ``g``
  ``(B, T, O)`` instead of the ``O x I`` matrix makes inner products cost
  ``T^2 (O + I)`` per pair instead of ``O I``; the bias is a column of ones
  appended to ``a``.

The functions here pick the cheaper way to evaluate each inner product by
counting multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Largest number of elements of a temporary (n_test * T) x (B * T) product tile.
_TILE_ELEMENTS = 1 << 24


@dataclass
class DenseGrads:
    """Flattened per-example gradients of one parameter group, ``(B, P)``."""

    grads: Tensor

    @property
    def size(self) -> int:
        return int(self.grads.shape[0])


@dataclass
class FactoredGrads:
    """Per-example gradients of a linear map, kept as factors.

    Attributes:
        a: layer inputs ``(B, T, I)`` (a column of ones appended when the layer has a bias).
        g: loss gradients at the layer output ``(B, T, O)``.
    """

    a: Tensor
    g: Tensor
    _dense: Tensor | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.a.shape[0])

    @property
    def positions(self) -> int:
        return int(self.a.shape[1])

    def dense(self) -> Tensor:
        """The materialised gradients ``(B, O * I)``, computed once and cached."""
        if self._dense is None:
            w = torch.einsum("bto,bti->boi", self.g, self.a)
            self._dense = w.reshape(w.shape[0], -1)
        return self._dense


Grads = DenseGrads | FactoredGrads


_NARROW = (torch.float16, torch.bfloat16)


def widened(rep: Grads) -> Grads:
    """``rep`` held in float32 when it is in a 16-bit float type, else ``rep`` itself.

    Products of 16-bit gradients overflow long before the scores do (a learning rate
    of 1e-5 scales them back into range only after the product), so inner products and
    norms are formed in float32.
    """
    if isinstance(rep, DenseGrads):
        return DenseGrads(rep.grads.float()) if rep.grads.dtype in _NARROW else rep
    if rep.a.dtype not in _NARROW and rep.g.dtype not in _NARROW:
        return rep
    dense = None if rep._dense is None else rep._dense.float()
    return FactoredGrads(rep.a.float(), rep.g.float(), dense)


def dtype_of(rep: Grads) -> torch.dtype:
    """The floating dtype the representation was computed in (the layer's)."""
    if isinstance(rep, DenseGrads):
        return rep.grads.dtype
    return torch.promote_types(rep.a.dtype, rep.g.dtype)


def as_dense(rep: Grads) -> Tensor:
    """Materialised ``(B, P)`` gradients of any representation."""
    return rep.grads if isinstance(rep, DenseGrads) else rep.dense()


def dense_row(rep: Grads, i: int) -> Tensor:
    """Row ``i`` of :func:`as_dense` of ``rep``, ``(P,)``, without forming the other rows
    (a batch's per-example weight gradients of a wide layer can take gigabytes)."""
    if isinstance(rep, DenseGrads):
        return rep.grads[i]
    if rep._dense is not None:
        return rep._dense[i]
    return FactoredGrads(rep.a[i : i + 1], rep.g[i : i + 1]).dense()[0]


def _factored_cost(n: int, m: int, t1: int, t2: int, o: int, i: int) -> float:
    return float(n) * m * t1 * t2 * (o + i)


def _dense_cost(n: int, m: int, t1: int, t2: int, o: int, i: int, cached: bool) -> float:
    form = (0 if cached else n * t1 * o * i) + m * t2 * o * i
    return float(form) + float(n) * m * o * i


def dot(test: Grads, train: Grads) -> Tensor:
    """Inner products ``<test_i, train_j>`` of one parameter group, ``(n_test, n_train)``."""
    if isinstance(test, FactoredGrads) and isinstance(train, FactoredGrads):
        n, t1, i_dim = test.a.shape
        m, t2, _ = train.a.shape
        o_dim = test.g.shape[2]
        if t1 * t2 == 0:
            return test.a.new_zeros(n, m)
        fac = _factored_cost(n, m, t1, t2, o_dim, i_dim)
        den = _dense_cost(n, m, t1, t2, o_dim, i_dim, cached=test._dense is not None)
        if fac <= den:
            return _factored_dot(test, train)
    return as_dense(test) @ as_dense(train).T


def _factored_dot(test: FactoredGrads, train: FactoredGrads) -> Tensor:
    n, t1, _ = test.a.shape
    m, t2, _ = train.a.shape
    if t1 == 1 and t2 == 1:
        return (test.g[:, 0] @ train.g[:, 0].T) * (test.a[:, 0] @ train.a[:, 0].T)
    out = test.a.new_empty(n, m)
    ta = test.a.reshape(n * t1, -1)
    tg = test.g.reshape(n * t1, -1)
    step = max(1, _TILE_ELEMENTS // max(1, n * t1 * t2))
    for s in range(0, m, step):
        ra = train.a[s : s + step]
        rg = train.g[s : s + step]
        b = ra.shape[0]
        aa = ta @ ra.reshape(b * t2, -1).T
        gg = tg @ rg.reshape(b * t2, -1).T
        out[:, s : s + b] = (aa * gg).view(n, t1, b, t2).sum(dim=(1, 3))
    return out


def _row_sq_norms(x: Tensor) -> Tensor:
    """``(x * x).sum(1)`` of a 2-D tensor without a squared copy of it (one product per
    row, as a batched matrix product): per-example gradients of an embedding table are
    hundreds of megabytes."""
    if x.dim() != 2 or x.is_complex() or not x.is_floating_point():
        return x.pow(2).sum(dim=1)
    return torch.bmm(x.unsqueeze(1), x.unsqueeze(2)).reshape(x.shape[0])


def sq_norm(rep: Grads) -> Tensor:
    """Squared norms of the per-example gradients, ``(B,)``."""
    if isinstance(rep, DenseGrads):
        return _row_sq_norms(rep.grads)
    b, t, i_dim = rep.a.shape
    o_dim = rep.g.shape[2]
    if t == 0:
        return rep.a.new_zeros(b)
    if t == 1:
        return rep.g[:, 0].pow(2).sum(1) * rep.a[:, 0].pow(2).sum(1)
    if rep._dense is None and t * t * (o_dim + i_dim) > t * o_dim * i_dim + o_dim * i_dim:
        return rep.dense().pow(2).sum(dim=1)
    aa = torch.bmm(rep.a, rep.a.transpose(1, 2))
    gg = torch.bmm(rep.g, rep.g.transpose(1, 2))
    return (aa * gg).sum(dim=(1, 2))


def sum_examples(rep: Grads) -> DenseGrads:
    """The gradient summed over the examples of a batch, as a ``(1, P)`` dense row."""
    if isinstance(rep, FactoredGrads) and rep._dense is None:
        w = torch.einsum("bto,bti->oi", rep.g, rep.a)
        return DenseGrads(w.reshape(1, -1))
    return DenseGrads(as_dense(rep).sum(dim=0, keepdim=True))


def concat(reps: list[Grads]) -> Grads:
    """Join representations of consecutive batches along the example dimension."""
    if all(isinstance(r, DenseGrads) for r in reps):
        return DenseGrads(torch.cat([r.grads for r in reps]))  # type: ignore[union-attr]
    if all(isinstance(r, FactoredGrads) for r in reps):
        ts = {r.positions for r in reps}  # type: ignore[union-attr]
        if len(ts) == 1:
            return FactoredGrads(
                torch.cat([r.a for r in reps]),  # type: ignore[union-attr]
                torch.cat([r.g for r in reps]),  # type: ignore[union-attr]
            )
    return DenseGrads(torch.cat([as_dense(r) for r in reps]))


def finite_mask(rep: Grads) -> Tensor:
    """``(B,)`` boolean mask of examples whose gradient factors are all finite."""
    if isinstance(rep, DenseGrads):
        return torch.isfinite(rep.grads).all(dim=1)
    b = rep.a.shape[0]
    return torch.isfinite(rep.a.reshape(b, -1)).all(1) & torch.isfinite(rep.g.reshape(b, -1)).all(1)
