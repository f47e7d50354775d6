"""Mislabel-detection curves: how many known-bad labels a ranking finds as one reads down it.

matplotlib is an optional dependency (the ``plot`` extra); it is imported only when a
figure is drawn. Figures are drawn on an Agg canvas of their own, without pyplot, so the
global matplotlib state (a notebook's backend, open figures) is left alone.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from proponents.checks import check_int
from proponents.errors import ArgumentTypeError, InvalidArgumentError, ProponentsError, count

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


def score_vector(scores: Any, argument: str) -> np.ndarray:
    """Suspicion scores as a 1-D float64 array, or a typed error naming ``argument``.

    Args:
        scores: one score per example: a 1-D tensor, array or sequence of real numbers
            (or an ``(n, 1)`` column of them).
        argument: the parameter name shown in the message.

    Returns:
        The scores as a ``(n,)`` float64 array.

    Raises:
        ArgumentTypeError: ``None``, or values that are not real numbers (strings,
            complex numbers, objects).
        InvalidArgumentError: scores that are not one-dimensional (a ``(4, 10)`` array
            would otherwise be read as 40 examples).
    """
    if scores is None:
        raise ArgumentTypeError(
            f"{argument} must be one score per example (a 1-D tensor, array or sequence of "
            "numbers), got None"
        )
    array = _numpy(scores)
    if array.dtype.kind not in "biufO":
        raise ArgumentTypeError(
            f"{argument} must be real numbers, one score per example, got an array of {array.dtype}"
        )
    try:
        values = array.astype(np.float64)
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"{argument} must be real numbers, one score per example, got values of "
            f"{type(scores).__name__} that are not numbers"
        ) from None
    if values.ndim == 2 and values.shape[1] == 1:  # a column, (n, 1): one score per row
        values = values[:, 0]
    if values.ndim != 1:
        raise InvalidArgumentError(
            f"{argument} must be one-dimensional, one score per example; got shape "
            f"{tuple(values.shape)}"
        )
    return values


def check_fraction(value: Any, argument: str) -> float:
    """``value`` as a float share of the data, or a typed error naming ``argument``.

    Args:
        value: the share of the examples inspected, from 0 to 1 (``0.05`` is the top 5%).
        argument: the parameter name shown in the message.

    Returns:
        ``value`` as a ``float``.

    Raises:
        ArgumentTypeError: a ``bool`` or anything that is not a real number.
        InvalidArgumentError: a number outside ``[0, 1]`` (NaN included), such as ``5``
            meant as 5%.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(
            f"{argument} must be a number from 0 to 1 (a share of the examples), got "
            f"{type(value).__name__} {value!r}"
        )
    share = float(value)
    if not (math.isfinite(share) and 0.0 <= share <= 1.0):
        hint = f" (if {share:g}% is meant, give {share / 100:g})" if 1 < share <= 100 else ""
        raise InvalidArgumentError(
            f"{argument} must be from 0 to 1 (a share of the examples), got {value!r}{hint}"
        )
    return share


def _ranking_vectors(rankings: Any, n: int | None, owner: str) -> tuple[dict[str, Any], int]:
    """Every ranking as a 1-D float array of one common length, and that length.

    Raises:
        ArgumentTypeError: ``rankings`` is not a mapping, or holds scores that are not
            numbers; ``n`` is not an int.
        InvalidArgumentError: a ranking that is not 1-D or whose length is not ``n``
            (or, without ``n``, not that of the first ranking); ``n`` negative; no
            rankings and no ``n``.
    """
    if not isinstance(rankings, Mapping):
        raise ArgumentTypeError(
            f"{owner}: rankings must be a mapping from name to scores (e.g. "
            f"{{'self-influence': scores}}), got {type(rankings).__name__}"
        )
    if n is not None:
        n = check_int(n, f"{owner}: n", or_none=True)
        if n < 0:
            raise InvalidArgumentError(f"{owner}: n must be 0 or more examples, got {n}")
    vectors = {
        name: score_vector(scores, f"{owner}: rankings[{name!r}]")
        for name, scores in rankings.items()
    }
    if n is None:
        if not vectors:
            raise InvalidArgumentError(
                f"{owner}: rankings is empty, so the number of examples is unknown; give n "
                "(the size of the dataset the known-bad indices refer to)"
            )
        first, scores = next(iter(vectors.items()))
        n, source = scores.size, f"rankings[{first!r}] has"
    else:
        source = "n is"
    for name, scores in vectors.items():
        if scores.size != n:
            raise InvalidArgumentError(
                f"{owner}: rankings[{name!r}] has {count(scores.size, 'score')} but {source} "
                f"{n}; every ranking needs one score per example"
            )
    return vectors, n


def found_curve(scores: Any, bad: Sequence[int] | np.ndarray) -> np.ndarray:
    """Share of the bad examples found after inspecting the top ``i`` of the ranking.

    Args:
        scores: ``(n,)`` suspicion scores, higher is more suspicious.
        bad: indices of the examples known to be bad (e.g. flipped labels; repeats count
            once), or a boolean mask of ``n`` entries.

    Returns:
        ``(n + 1,)`` array; entry ``i`` is the share found among the ``i`` most suspicious.

    Raises:
        ArgumentTypeError: ``scores`` that are ``None`` or not numbers.
        InvalidArgumentError: ``scores`` that are not 1-D, an index outside ``[0, n)``
            or a mask of another length.
    """
    order = ranking(score_vector(scores, "scores"))
    mask = np.zeros(order.size, dtype=bool)
    mask[bad_indices(bad, order.size, "bad")] = True
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
    """Share of the known-bad examples that a ranking puts in its top ``fraction``.

    The top ``fraction`` of ``n`` examples holds :func:`inspected` of them: the rounded
    count, but at least one example when ``fraction`` is positive.

    Args:
        scores: ``(n,)`` suspicion scores, higher is more suspicious (a 1-D tensor, array
            or sequence of numbers).
        bad: indices of the examples known to be bad (repeats count once), or a boolean
            mask of ``n`` entries.
        fraction: share of the examples inspected, from 0 to 1 (``0.05``: the top 5%).

    Returns:
        The share of the known-bad examples found there, from 0 to 1 (0 when none is
        known).

    Raises:
        ArgumentTypeError: ``scores`` that are ``None`` or not numbers, ``fraction`` that
            is not a number, ``bad`` that are neither integers nor booleans.
        InvalidArgumentError: ``scores`` that are not 1-D, ``fraction`` outside
            ``[0, 1]``, an index of ``bad`` outside ``[0, n)`` or a mask of another
            length.
    """
    fraction = check_fraction(fraction, "fraction")
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
        rankings: name -> ``(n,)`` suspicion scores (1-D, all of the same length).
        bad: indices of the known-bad examples (repeats count once), or a boolean mask.
        fractions: shares of the data inspected, each from 0 to 1.
        n: dataset size; every ranking must have ``n`` scores. Needed when ``rankings``
            is empty; otherwise the length of the rankings by default.

    Returns:
        name -> {fraction: share found}; the entry ``"random order (expected)"`` holds the
        expected share under a uniformly random order, ``inspected(f, n) / n``, and
        ``"best possible"`` the share a perfect ranking finds.

    Raises:
        ArgumentTypeError: ``rankings`` that is not a mapping or holds scores that are not
            numbers, ``fractions`` that is not a sequence of numbers, ``n`` not an int.
        InvalidArgumentError: a ranking that is not 1-D or has another length than ``n``
            (or than the other rankings), a fraction outside ``[0, 1]``, ``n`` negative,
            no rankings and no ``n``, a known-bad index outside the examples.
    """
    vectors, n = _ranking_vectors(rankings, n, "detection_table")
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, (Sequence, np.ndarray)):
        raise ArgumentTypeError(
            "detection_table: fractions must be a sequence of shares from 0 to 1 (e.g. "
            f"(0.05, 0.1)), got {type(fractions).__name__} {fractions!r}"
        )
    shares = [
        check_fraction(f, f"detection_table: fractions[{i}]") for i, f in enumerate(fractions)
    ]
    bad = bad_indices(bad, n, "detection_table: bad")
    table = {
        name: {f: found_at(scores, bad, f) for f in shares} for name, scores in vectors.items()
    }
    if n:
        table["random order (expected)"] = {f: inspected(f, n) / n for f in shares}
        n_bad = len(bad)
        if n_bad:
            table["best possible"] = {f: min(inspected(f, n), n_bad) / n_bad for f in shares}
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
        InvalidArgumentError: rankings of different lengths, or none (as for
            :func:`detection_table`).
    """
    vectors, n = _ranking_vectors(rankings, None, "detection_figure_png")
    bad = bad_indices(bad, n, "detection_figure_png: bad")
    n_bad = len(bad)
    fig, ax = _new_figure()
    x = np.arange(n + 1) / max(n, 1)
    styles = ["-", "--", "-.", ":"]
    for i, (name, scores) in enumerate(vectors.items()):
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
