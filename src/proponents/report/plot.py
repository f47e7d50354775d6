"""Mislabel-detection curves: how many known-bad labels a ranking finds as one reads down it.

matplotlib is an optional dependency (the ``plot`` extra); it is imported only when a
figure is drawn. Figures are drawn on an Agg canvas of their own, without pyplot, so the
global matplotlib state (a notebook's backend, open figures) is left alone.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from proponents.errors import ArgumentTypeError, InvalidArgumentError, ProponentsError

#: Fractions of the training set at which the found share of bad labels is reported.
DEFAULT_FRACTIONS = (0.05, 0.10, 0.20)


class MissingExtraError(ProponentsError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require_matplotlib() -> None:
    """Check that matplotlib can be imported, or explain which extra provides it.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(
            "the report's mislabel-detection plot needs matplotlib, which is not installed; "
            'install it with: pip install "proponents[plot]"'
        ) from exc


def _new_figure() -> Any:
    """A 640x420 px figure on its own Agg canvas, and its axes."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def ranking(scores: Any) -> np.ndarray:
    """Indices ordering ``scores`` from most to least suspicious (ties: lower index first).

    ``+inf`` (a score that overflowed) is the most suspicious and comes first, ``-inf``
    after every finite score; NaN says nothing and comes last.
    """
    values = np.asarray(_numpy(scores), dtype=np.float64).reshape(-1)
    unknown = np.isnan(values)
    order = np.argsort(-np.where(unknown, 0.0, values), kind="stable")
    return np.concatenate([order[~unknown[order]], order[unknown[order]]])


def _numpy(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):
        from proponents.report.render import tensor_numpy

        return tensor_numpy(values)
    return np.asarray(values)


def bad_indices(bad: Any, n: int, argument: str = "known-bad examples") -> np.ndarray:
    """The distinct known-bad positions, sorted, from indices (a set too) or a boolean
    mask of ``n`` entries.

    Raises:
        ArgumentTypeError: neither integers nor booleans (floats, strings).
        InvalidArgumentError: a mask of another length than ``n``, or an index outside
            ``[0, n)`` (negative indices are not counted from the end); the message
            names ``argument``.
    """
    if isinstance(bad, (set, frozenset)):
        bad = sorted(bad)
    array = _numpy(bad)
    if array.dtype == np.bool_:
        if array.ndim != 1 or array.shape[0] != n:
            raise InvalidArgumentError(
                f"{argument} is a boolean mask of shape {tuple(array.shape)}; a mask needs one "
                f"entry per example ({n}), or give the indices instead"
            )
        return np.flatnonzero(array).astype(np.int64)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise ArgumentTypeError(
            f"{argument} must hold example indices (ints) or be a boolean mask of {n} "
            f"entries, got an array of {array.dtype}"
        )
    flat = array.reshape(-1).astype(np.int64)
    outside = out_of_range(flat, n)
    if outside:
        also = ""
        if len(outside) > 1:
            also = " (also " + ", ".join(map(str, outside[1:10]))
            also += ", …)" if len(outside) > 10 else ")"
        raise InvalidArgumentError(
            f"{argument}: index {outside[0]} is outside the {n} examples{also}; give "
            f"positions 0 to {n - 1} (negative positions are not counted from the end)"
        )
    return np.unique(flat)


def out_of_range(indices: np.ndarray, n: int) -> list[int]:
    """The distinct entries of ``indices`` outside ``[0, n)``, in their first order."""
    flat = indices.reshape(-1)
    outside = flat[(flat < 0) | (flat >= n)]
    return [int(i) for i in dict.fromkeys(outside.tolist())]


def _plain(text: str) -> str:
    """``text`` for a matplotlib label, with ``$`` shown as itself (not as mathtext)."""
    return text.replace("$", r"\$")


def found_curve(scores: Any, bad: Sequence[int] | np.ndarray) -> np.ndarray:
    """Share of the bad examples found after inspecting the top ``i`` of the ranking.

    Args:
        scores: ``(n,)`` suspicion scores, higher is more suspicious.
        bad: indices of the examples known to be bad (e.g. flipped labels; repeats count
            once), or a boolean mask of ``n`` entries.

    Returns:
        ``(n + 1,)`` array; entry ``i`` is the share found among the ``i`` most suspicious.

    Raises:
        InvalidArgumentError: an index outside ``[0, n)`` or a mask of another length.
    """
    order = ranking(scores)
    mask = np.zeros(order.size, dtype=bool)
    mask[bad_indices(bad, order.size)] = True
    total = max(int(mask.sum()), 1)
    return np.concatenate([[0.0], np.cumsum(mask[order]) / total])


def inspected(fraction: float, n: int) -> int:
    """How many of ``n`` examples "the top ``fraction``" holds: ``round(fraction * n)``,
    but at least one when ``fraction`` and ``n`` are positive (the top 5% of 10 examples is
    the first one, not none), and at most ``n``."""
    count = int(round(fraction * n))
    if fraction > 0 and n > 0:
        count = max(count, 1)
    return max(0, min(count, n))


def found_at(scores: Any, bad: Sequence[int] | np.ndarray, fraction: float) -> float:
    """Share of the bad examples among the top ``fraction`` of the ranking (the count of
    :func:`inspected`)."""
    curve = found_curve(scores, bad)
    n = curve.size - 1
    return float(curve[inspected(fraction, n)])


def detection_table(
    rankings: Mapping[str, Any],
    bad: Sequence[int] | np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    n: int | None = None,
) -> dict[str, dict[float, float]]:
    """Found shares at each fraction for every ranking, plus random order (expected value).

    Args:
        rankings: name -> ``(n,)`` suspicion scores.
        bad: indices of the known-bad examples (repeats count once), or a boolean mask.
        fractions: fractions of the data inspected.
        n: dataset size (needed only when ``rankings`` is empty).

    Returns:
        name -> {fraction: share found}; the entry ``"random order (expected)"`` holds the
        expected share under a uniformly random order, ``inspected(f, n) / n``, and
        ``"best possible"`` the share a perfect ranking finds.

    Raises:
        InvalidArgumentError: a known-bad index outside the examples.
    """
    if n is None:
        n = len(_numpy(next(iter(rankings.values())))) if rankings else 0
    bad = bad_indices(bad, n)
    table = {
        name: {f: found_at(scores, bad, f) for f in fractions} for name, scores in rankings.items()
    }
    if n:
        table["random order (expected)"] = {f: inspected(f, n) / n for f in fractions}
        n_bad = len(bad)
        if n_bad:
            table["best possible"] = {f: min(inspected(f, n), n_bad) / n_bad for f in fractions}
    return table


def format_detection(table: Mapping[str, Mapping[float, float]], indent: str = "  ") -> str:
    """The detection table as aligned plain text (one ranking per line, shares in %)."""
    if not table:
        return ""
    fractions = list(next(iter(table.values())))
    width = max(len(name) for name in table) + 2
    head = "".join(f"{'top ' + format(f * 100, 'g') + '%':>10}" for f in fractions)
    lines = [f"{indent}{'ranking':<{width}}{head}"]
    for name, values in table.items():
        row = "".join(f"{v * 100:>9.1f}%" for v in values.values())
        lines.append(f"{indent}{name:<{width}}{row}")
    return "\n".join(lines)


def detection_figure_png(
    rankings: Mapping[str, Any],
    bad: Sequence[int] | np.ndarray,
    title: str = "Finding the flipped labels",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> bytes:
    """Plot the found share of bad labels against the share of data inspected.

    One line per ranking, the random-order diagonal and the best possible curve; dotted
    verticals mark ``fractions``.

    Returns:
        The PNG bytes of the figure.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    n = len(_numpy(next(iter(rankings.values())))) if rankings else 0
    bad = bad_indices(bad, n)
    n_bad = len(bad)
    fig, ax = _new_figure()
    x = np.arange(n + 1) / max(n, 1)
    styles = ["-", "--", "-.", ":"]
    for i, (name, scores) in enumerate(rankings.items()):
        ax.plot(x * 100, found_curve(scores, bad) * 100, styles[i % 4], lw=2, label=_plain(name))
    ax.plot([0, 100], [0, 100], color="0.55", lw=1, label="random order (expected)")
    if n and n_bad:
        best = np.minimum(np.arange(n + 1), n_bad) / n_bad
        ax.plot(x * 100, best * 100, color="0.75", lw=1, ls=":", label="best possible")
    for f in fractions:
        ax.axvline(f * 100, color="0.85", lw=0.8, zorder=0)
    ax.set_xlim(0, min(100, max(40, 200 * n_bad / max(n, 1))))
    ax.set_ylim(0, 101)
    ax.set_xlabel("training examples inspected, most suspicious first (%)")
    ax.set_ylabel("known-bad labels found (%)")
    ax.set_title(_plain(title))
    ax.grid(alpha=0.25)
    ax.legend(loc="lower right", fontsize=9)
    return _png(fig)


def score_figure_png(scores: Any, title: str = "Self-influence, sorted") -> bytes:
    """Plot sorted suspicion scores (used when no known-bad labels are available).

    Returns:
        The PNG bytes of the figure.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    values = np.asarray(_numpy(scores), dtype=np.float64).reshape(-1)
    values = np.sort(values[np.isfinite(values)])[::-1]
    fig, ax = _new_figure()
    x = np.arange(1, values.size + 1) / max(values.size, 1) * 100
    ax.plot(x, values, lw=2)
    if values.size and values[-1] > 0 and values[0] / max(values[-1], 1e-300) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("training examples, most suspicious first (%)")
    ax.set_ylabel("score")
    ax.set_title(_plain(title))
    ax.grid(alpha=0.25)
    return _png(fig)
