"""The influence report: one self-contained HTML page (inline images and styles).

:func:`build_report` turns results you already have — proponents and opponents of some
test examples, self-influence of the training set — into an :class:`InfluenceReport`,
which shows itself in a notebook (``_repr_html_``) and writes ``report.html`` with
:meth:`InfluenceReport.save`. The page loads nothing from anywhere: images are ``data:``
URIs, styles are inline, and a Content-Security-Policy forbids every other source.
"""

from __future__ import annotations

import html
import math
import os
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from proponents.checks import check_flag, check_int, check_path
from proponents.errors import ArgumentTypeError, InvalidArgumentError, RenderError, count
from proponents.report import plot
from proponents.report.render import (
    data_uri,
    default_render,
    example_html,
    object_rows,
    tensor_numpy,
)
from proponents.user_warnings import warn

#: Content-Security-Policy of the saved page: inline styles and data: images only.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
.prp-report{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:#1d2330;line-height:1.4;max-width:1160px;margin:0 auto;padding:8px 16px 32px}
.prp-report h1{font-size:1.7em;margin:.4em 0 .1em}
.prp-report h2{font-size:1.3em;margin:1.6em 0 .4em;border-bottom:2px solid #e3e7ef;
  padding-bottom:.2em}
.prp-report h3{font-size:.95em;margin:.5em 0 .3em;color:#4a5468;font-weight:600}
.prp-report h1,.prp-report h2,.prp-report h3,.prp-report .sub,.prp-report .note{
  overflow-wrap:anywhere}
.prp-report .sub{color:#5b6577;margin:0 0 .8em}
.prp-report .note{color:#5b6577;font-size:.92em;max-width:62em}
.prp-report dl.kv{display:grid;
  grid-template-columns:max-content minmax(0,1fr) max-content minmax(0,1fr);
  gap:0;margin:.4em 0 .8em;font-size:.92em;max-width:1000px}
.prp-report dl.kv dt,.prp-report dl.kv dd{margin:0;padding:3px 10px;
  border-bottom:1px solid #e3e7ef}
.prp-report dl.kv dt{color:#5b6577}
.prp-report dl.kv dd{overflow-wrap:anywhere}
.prp-report table.det{border-collapse:collapse;margin:.4em 0 .8em;font-size:.92em}
.prp-report table.det td,.prp-report table.det th{padding:3px 10px;
  border-bottom:1px solid #e3e7ef;text-align:left}
.prp-report table.det td.num,.prp-report table.det th.num{text-align:right;
  font-variant-numeric:tabular-nums}
.prp-report .top{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.prp-report figure{margin:0}
.prp-report figure img{max-width:100%;height:auto;border:1px solid #e3e7ef;border-radius:6px}
.prp-report .cards{display:flex;flex-wrap:wrap;gap:8px}
.prp-report .card{border:1px solid #d5dbe6;border-radius:6px;padding:5px;background:#fff;
  width:96px;font-size:11.5px;line-height:1.3;box-sizing:border-box}
.prp-report .card.text{width:190px}
.prp-report .card.bad{border:2px solid #c62828;background:#fff5f5}
.prp-report .card.test{width:118px;background:#f4f7fc;border-color:#9fb2d6}
.prp-report .card.test.text{width:230px}
.prp-report .ex-img{display:block;width:84px;height:84px;object-fit:contain;
  image-rendering:pixelated;margin:0 auto 3px;background:#fff}
.prp-report .card.test .ex-img{width:106px;height:106px}
.prp-report .ex-text{white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,
  SFMono-Regular,Menlo,Consolas,monospace;font-size:11.5px;background:#f7f8fa;padding:3px;
  border-radius:3px;margin-bottom:3px;max-height:9em;overflow:auto}
.prp-report .meta div{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.prp-report .card.text .meta div{white-space:normal}
.prp-report .wrong{color:#c62828;font-weight:600}
.prp-report .badge{display:inline-block;background:#c62828;color:#fff;border-radius:3px;
  padding:0 4px;font-size:10px;font-weight:600}
.prp-report .row{display:flex;gap:16px;align-items:flex-start;padding:10px 0;
  border-bottom:1px solid #e3e7ef}
.prp-report .strips{flex:1;min-width:0}
.prp-report footer{margin-top:2em;color:#8a93a5;font-size:.85em}
"""


@dataclass
class Results:
    """Indices and scores of the training examples shown for each test example.

    Attributes:
        indices: ``(n_test, k)`` training-set positions.
        scores: ``(n_test, k)`` their scores.
    """

    indices: np.ndarray
    scores: np.ndarray


def as_results(value: Any, what: str) -> Results:
    """Read proponent/opponent results from the forms the library returns.

    Accepted: a :class:`~proponents.KMostInfluentialResults` (or any ``(indices, scores)``
    pair), or the ``{layer: (indices, values)}`` dict of ``SimilarityInfluence`` with a
    single layer.

    Raises:
        InvalidArgumentError: shapes that do not match, or a dict with several layers.
    """
    if isinstance(value, Mapping):
        if len(value) != 1:
            raise InvalidArgumentError(
                f"{what}: a SimilarityInfluence result with {len(value)} layers "
                f"({', '.join(map(str, value))}) was given; pass the entry of one layer, e.g. "
                f"{what}=result[{next(iter(value))!r}]"
            )
        value = next(iter(value.values()))
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ArgumentTypeError(
            f"{what} must be KMostInfluentialResults or an (indices, scores) pair, got "
            f"{type(value).__name__}"
        )
    indices = _index_array(value[0], f"{what} indices")
    scores = _float_array(value[1], f"{what} scores")
    if indices.ndim == 1:
        indices, scores = indices[None], scores[None]
    if indices.shape != scores.shape or indices.ndim != 2:
        raise InvalidArgumentError(
            f"{what}: indices {tuple(indices.shape)} and scores {tuple(scores.shape)} must both "
            "be (n_test, k)"
        )
    return Results(indices, scores)


def _index_array(values: Any, what: str) -> np.ndarray:
    """``values`` as an int64 array of example positions; floats only of whole values.

    Raises:
        ArgumentTypeError: values that are not numbers (strings, booleans, objects).
        InvalidArgumentError: a float that is not a whole number (``2.7``, NaN), which
            would otherwise be cut to another example's position.
    """
    array = _numpy(values)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind != "f":
        if array.size == 0:
            return array.astype(np.int64)
        raise ArgumentTypeError(
            f"{what} must be integer positions of examples, got an array of {array.dtype}"
        )
    whole = np.isfinite(array) & (array == np.round(array))
    if not bool(whole.all()):
        odd = array[~whole].reshape(-1)
        shown = ", ".join(f"{v:g}" for v in odd[:5].tolist()) + (", …" if odd.size > 5 else "")
        raise InvalidArgumentError(
            f"{what} must be integer positions of examples, got "
            + (
                "1 value that is not a whole number"
                if odd.size == 1
                else f"{odd.size} values that are not whole numbers"
            )
            + f" ({shown})"
        )
    return array.astype(np.int64)


def _float_array(values: Any, what: str) -> np.ndarray:
    """``values`` as a float64 array of scores, or a typed error naming ``what``.

    Raises:
        ArgumentTypeError: ``None``, strings (even ``"1.5"``, which NumPy would read as a
            number), complex numbers or other values that are not real numbers.
    """
    if values is None:
        raise ArgumentTypeError(f"{what} must be numbers (scores), got None")
    array = _numpy(values)
    if array.dtype.kind not in "biufO":
        raise ArgumentTypeError(
            f"{what} must be real numbers (scores), got an array of {array.dtype}"
        )
    try:
        return array.astype(np.float64)
    except (TypeError, ValueError):
        raise ArgumentTypeError(
            f"{what} must be real numbers (scores), got {type(values).__name__} holding "
            "values that are not numbers"
        ) from None


def _check_text(value: Any, argument: str, or_none: bool = False) -> str | None:
    """Return ``value`` if it is a ``str`` (or ``None`` where allowed), else raise naming
    ``argument``.

    Raises:
        ArgumentTypeError: any other type.
    """
    if isinstance(value, str) or (or_none and value is None):
        return value
    wanted = "a str or None" if or_none else "a str"
    given = "None" if value is None else f"{type(value).__name__} {value!r}"
    raise ArgumentTypeError(f"build_report: {argument} must be {wanted}, got {given}")


def _check_notes(notes: Any) -> list[str]:
    """``notes`` as a list of sentences, or a typed error naming it.

    Raises:
        ArgumentTypeError: a single string (it would be shown one character per
            paragraph), something that is not a list or tuple, or an entry that is not a
            string.
    """
    if isinstance(notes, str):
        raise ArgumentTypeError(
            f"build_report: notes must be a list of sentences, got one str {notes!r}; "
            f"wrap it in a list: notes=[{notes!r}]"
        )
    if isinstance(notes, (bytes, bytearray)) or not isinstance(notes, Iterable):
        raise ArgumentTypeError(
            f"build_report: notes must be a list (or tuple) of str, got {type(notes).__name__}"
        )
    notes = list(notes)  # any iterable of sentences (a generator, say)
    for i, note in enumerate(notes):
        if not isinstance(note, str):
            raise ArgumentTypeError(
                f"build_report: notes[{i}] must be a str, got {type(note).__name__} {note!r}"
            )
    return list(notes)


def _check_mapping(value: Any, argument: str, holds: str) -> Mapping[Any, Any] | None:
    """Return ``value`` if it is ``None`` or a mapping, else raise naming ``argument``.

    Raises:
        ArgumentTypeError: any other type (a list of pairs included).
    """
    if value is None or isinstance(value, Mapping):
        return value
    raise ArgumentTypeError(
        f"build_report: {argument} must be a mapping ({holds}) or None, got {type(value).__name__}"
    )


def _check_label_names(value: Any) -> Any:
    """Return ``value`` if it can name labels: ``None``, a mapping from label to name, or
    a sequence (a list, tuple or 1-D array) whose entry ``i`` names label ``i``; another
    iterable of names (a pandas Series or Index, ``dict.values()``) as a list.

    Raises:
        ArgumentTypeError: any other type; a single string (its characters would be read
            as the names of labels 0, 1, ...) included.
    """
    if value is None or isinstance(value, Mapping):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return value
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, bytearray, np.ndarray)):
        return list(value)  # a pandas Series or Index, dict.values(): names in order
    raise ArgumentTypeError(
        "build_report: label_names must be a list of names (entry i names label i), a "
        f"dict from label to name, or None; got {type(value).__name__} {value!r}"
    )


def _entries(n: int) -> str:
    """A count of given values, for messages: "1 entry", "3 entries"."""
    return count(n, "entry", "entries")


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return tensor_numpy(value)
    try:
        return np.asarray(value)
    except ValueError:  # rows of different lengths, e.g. the classes of multi-label predictions
        return object_rows(value)


def _prediction_array(value: Any) -> np.ndarray:
    """Predictions, one entry per example. A multi-hot ``(n, C)`` array (0s and 1s, ``C >=
    2``) becomes each example's list of classes present, the form ``predict`` gives for a
    multi-label model; lists of classes of different lengths are kept as they are."""
    array = _numpy(value)
    if (
        array.ndim == 2
        and array.shape[1] >= 2
        and array.dtype.kind in "biuf"
        and bool(np.isin(array, (0, 1)).all())
    ):
        return object_rows(np.flatnonzero(row).tolist() for row in array)
    return array


def _dataset(data: Any, what: str) -> Any:
    if isinstance(data, DataLoader):
        data = data.dataset
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ArgumentTypeError(
            f"{what} must be a map-style Dataset (or a sequence) of (*inputs, label) items, "
            f"got {type(data).__name__}"
        )
    return data


def split_item(item: Any) -> tuple[tuple[Any, ...], Any]:
    """``(*inputs, label)`` -> ``(inputs, label)``; any other item has no label."""
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return tuple(item[:-1]), item[-1]
    if isinstance(item, (tuple, list)) and len(item) == 1:
        return (item[0],), None
    return (item,), None


def _label_value(label: Any) -> Any:
    if isinstance(label, torch.Tensor):
        return label.item() if label.numel() == 1 else label.tolist()
    if isinstance(label, np.generic):
        return label.item()
    if isinstance(label, np.ndarray):
        return label.item() if label.size == 1 else label.tolist()
    return label


def _fmt_number(value: float) -> str:
    """A short number for a card: ``0.0123``, ``4.56``, ``1264``, ``1.26e+05``."""
    size = abs(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:  # -0.0 too, which would show as "-0"
        return "0"
    if size >= 1e5 or 0 < size < 1e-3:
        return f"{value:.2e}"
    if size >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


@dataclass
class _Card:
    body: str
    is_image: bool
    lines: list[str]
    #: full text of a line, by position, shown on hover where the card cuts it with "…"
    titles: dict[int, str] = field(default_factory=dict)
    bad: bool = False
    test: bool = False

    def html(self) -> str:
        classes = ["card"]
        if not self.is_image:
            classes.append("text")
        if self.bad:
            classes.append("bad")
        if self.test:
            classes.append("test")
        meta = "".join(
            f'<div title="{html.escape(self.titles[i], quote=True)}">{line}</div>'
            if i in self.titles
            else f"<div>{line}</div>"
            for i, line in enumerate(self.lines)
        )
        return f'<div class="{" ".join(classes)}">{self.body}<div class="meta">{meta}</div></div>'


@dataclass
class InfluenceReport:
    """A finished report: HTML for a notebook or a browser, and its figure.

    Attributes:
        title: the page title.
        fragment: the report as an HTML fragment (scoped styles included), as shown in a
            notebook.
        figure_png: the mislabel-detection curve (or sorted scores) as PNG bytes, or
            ``None`` when there was nothing to plot.
        figure_name: file name the figure is saved under, beside the HTML.
        figures: the numbers the report states, e.g. ``{"detection": {...}}``.
    """

    title: str
    fragment: str
    figure_png: bytes | None = None
    figure_name: str = "mislabel_curve.png"
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def html(self) -> str:
        """The complete, self-contained HTML document."""
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{html.escape(self.title)}</title>\n</head>\n<body style="margin:0">\n'
            f"{self.fragment}\n</body>\n</html>\n"
        )

    def _repr_html_(self) -> str:
        return self.fragment

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report.

        Args:
            path: the HTML file to write, or a directory (``report.html`` is written in it;
                ``"."`` for the current one). The figure is written beside it as
                :attr:`figure_name`.

        Returns:
            The path of the HTML file.

        Raises:
            ArgumentTypeError: ``path`` is not a ``str`` or ``os.PathLike``.
            InvalidArgumentError: ``path`` is empty.
        """
        check_path(path, "path", "InfluenceReport.save")
        if os.fspath(path) == "":
            raise InvalidArgumentError(
                "InfluenceReport.save: path is empty; give the HTML file to write (e.g. "
                "'report.html') or a directory to write report.html in ('.' for the "
                "current one)"
            )
        target = Path(path)
        if target.is_dir() or (not target.suffix and not target.exists()):
            target = target / "report.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        # Undecodable bytes of a file name (surrogates) are shown as U+FFFD; each file is
        # written whole beside its place and moved in, so a failure keeps the old one.
        write_whole(target, self.html.encode("utf-8", errors="replace"))
        if self.figure_png is not None:
            write_whole(target.parent / self.figure_name, self.figure_png)
        return target


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    The temporary file is created under a random name that must not exist yet, so a link
    planted under a name it might take cannot send the bytes outside the folder.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_unwritten(folder: Path, names: Iterable[str], written: Collection[str]) -> None:
    """Remove the files of ``names`` in ``folder`` that a run did not write (a figure an
    earlier run left beside a report that no longer shows it); nothing else is touched.
    A file that cannot be removed is named in a warning."""
    for name in names:
        path = folder / name
        if name in written or not (path.is_file() or path.is_symlink()):
            continue
        try:
            path.unlink()
        except OSError as exc:
            warn(f"{path} is left from an earlier run and could not be removed: {exc}")


class _Examples:
    """Reads, renders and labels the examples of one dataset."""

    def __init__(
        self,
        data: Any,
        what: str,
        render: Callable[..., Any] | None,
        label_names: Any,
        predictions: np.ndarray | None,
        bad: set[int],
        unnamed: set[int] | None = None,
    ) -> None:
        self.data = _dataset(data, what)
        self.what = what
        self.render = render
        self.label_names = label_names
        self.predictions = predictions
        self.bad = bad
        #: integer labels that ``label_names`` has no name for (shown as numbers)
        self.unnamed = unnamed if unnamed is not None else set()

    def __len__(self) -> int:
        return len(self.data)

    def classes_text(self, classes: list[int]) -> str:
        """The classes of a multi-label example, each named as :meth:`label_text` names
        a class: ``"[cat, bird]"``."""
        return "[" + ", ".join(self.label_text(c) for c in classes) + "]"

    def label_text(self, label: Any) -> str:
        value = _label_value(label)
        names = self.label_names
        if names is not None and _is_integral_float(value):
            # a float target of a whole value (BCE losses take 0./1.) names its class
            value = int(value)
        if names is not None and isinstance(value, (int, np.integer)):
            try:
                # a list names labels 0, 1, ...: -1 is no label of it, not its last name
                if int(value) < 0 and not isinstance(names, Mapping):
                    raise IndexError(value)
                return str(names[int(value)])
            except (KeyError, IndexError, TypeError):
                self.unnamed.add(int(value))
        if isinstance(value, float):
            return _fmt_number(value)
        if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            # a multi-output prediction or label: its values, each written short
            shown = (_fmt_number(v) if isinstance(v, float) else str(v) for v in value)
            return "[" + ", ".join(shown) + "]"
        return str(value)

    def card(
        self, index: int, score: float | None = None, test: bool = False, prediction: Any = None
    ) -> _Card:
        n = len(self.data)
        if not 0 <= index < n:
            raise InvalidArgumentError(
                f"index {index} is out of range for {self.what} of {count(n, 'example')}"
            )
        inputs, label = split_item(self.data[index])
        if self.render is None:
            shown = default_render(inputs)
        else:
            try:
                shown = self.render(*inputs)
            except Exception as err:  # noqa: BLE001 - any failure of the user's function
                raise RenderError(
                    f"render() raised {type(err).__name__}: {err} for {self.what} #{index}; "
                    "it is called as render(*inputs) with the example's model inputs"
                ) from err
        if prediction is None and self.predictions is not None:
            prediction = self.predictions[index]
        # A multi-hot label is shown as its classes, the form of a multi-label prediction.
        present = _multi_hot(label)
        predicted = _class_list(prediction) if prediction is not None else None
        if present is not None and prediction is not None and predicted is None:
            present = None  # beside values (a regression's), the label's values are shown
        if present is not None:
            label_text: str | None = self.classes_text(present)
        else:
            label_text = self.label_text(label) if label is not None else None
        alt = f"{self.what} #{index}" + (f", label {label_text}" if label_text else "")
        body, is_image = example_html(shown, alt)
        lines = [f"<b>{'test' if test else 'train'} #{index}</b>"]
        titles: dict[int, str] = {}
        if label_text is not None:
            titles[len(lines)] = f"label: {label_text}"
            lines.append(f"label: {html.escape(label_text)}")
        if prediction is not None:
            if present is not None and predicted is not None:  # classes beside classes
                pred_text, wrong = self.classes_text(predicted), predicted != present
            else:
                pred_text = self.label_text(prediction)
                # only a class can be wrong: a regression value or a string label is shown
                wrong = (
                    label_text is not None
                    and (_is_class(label) or _is_integral_float(label))
                    and _is_class(prediction)
                    and pred_text != label_text
                )
            css = ' class="wrong"' if wrong else ""
            titles[len(lines)] = f"predicted: {pred_text}"
            lines.append(f"<span{css}>predicted: {html.escape(pred_text)}</span>")
        if score is not None:
            lines.append(f"score: {_fmt_number(float(score))}")
        bad = index in self.bad
        if bad:
            lines.append('<span class="badge">known bad</span>')
        return _Card(body, is_image, lines, titles, bad=bad, test=test)


def _multi_hot(label: Any) -> list[int] | None:
    """The classes present in a multi-hot label (``[1, 0, 1]`` -> ``[0, 2]``); ``None``
    for any other label (one value, or a vector with an entry other than 0 and 1)."""
    value = _label_value(label)
    if not isinstance(value, list) or len(value) < 2:
        return None
    if not all(isinstance(v, (bool, int, float)) and v in (0, 1) for v in value):
        return None
    return [i for i, v in enumerate(value) if v]


def _class_list(prediction: Any) -> list[int] | None:
    """A prediction as a sorted list of classes: a list of integers (the classes a
    multi-label model predicts present) or one integer; ``None`` for anything else."""
    value = _label_value(prediction)
    if _is_class(value):
        return [int(value)]
    if isinstance(value, list) and all(_is_class(v) for v in value):
        return sorted(int(v) for v in value)
    return None


def _is_integral_float(value: Any) -> bool:
    """Whether ``value`` is one float of integral value, as a binary model's ``1.0``
    target (compared with a class prediction, it is that class)."""
    value = _label_value(value)
    return isinstance(value, float) and math.isfinite(value) and value == round(value)


def _is_class(value: Any) -> bool:
    """Whether ``value`` is one integer (a class index): a Python or NumPy integer, or a
    one-element integer tensor or array."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    if isinstance(value, torch.Tensor):
        integer = not (value.dtype.is_floating_point or value.dtype.is_complex)
        return value.numel() == 1 and integer and value.dtype != torch.bool
    if isinstance(value, np.ndarray):
        return value.size == 1 and value.dtype.kind in "iu"
    return False


def _non_finite_note(scores: np.ndarray, name: str) -> str:
    """A sentence on the scores that are not finite and where they rank, or ``""``."""
    kinds = [
        (int(np.sum(scores == np.inf)), "+inf", "ranked first (an overflow: most suspicious)"),
        (int(np.sum(scores == -np.inf)), "-inf", "ranked after every finite score"),
        (int(np.sum(np.isnan(scores))), "NaN", "ranked last (no score)"),
    ]
    found = [f"{n} {value}, {where}" for n, value, where in kinds if n]
    if not found:
        return ""
    total = sum(n for n, _, _ in kinds)
    has = "has" if total == 1 else "have"
    return (
        f"{count(total, 'training example')} {has} a {name} that is not a finite number: "
        + "; ".join(found)
        + "."
    )


def _kv_table(rows: Mapping[str, Any]) -> str:
    cells = "".join(
        f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in rows.items()
    )
    return f'<dl class="kv">{cells}</dl>'


def _detection_html(table: Mapping[str, Mapping[float, float]]) -> str:
    fractions = list(next(iter(table.values())).keys())
    head = "".join(f'<th class="num">top {f * 100:g}%</th>' for f in fractions)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f'<td class="num">{v * 100:.1f}%</td>' for v in values.values())
        + "</tr>"
        for name, values in table.items()
    )
    return '<table class="det"><tr><th>ranking</th>' + head + "</tr>" + rows + "</table>"


#: What ranks high by TracIn self-influence (the default ``ranking_note``).
TRACIN_RANKING_NOTE = "Examples the model found hard to fit (wrong labels, odd inputs) rank high."
#: What TracIn's proponent and opponent strips show (the default ``examples_note``).
TRACIN_EXAMPLES_NOTE = (
    "Each test example (blue) beside the training examples with the highest influence "
    "scores on its loss at its label (proponents: they made the model more right about "
    "it) and the lowest (opponents: they pushed it away from its label, towards the "
    "mistake when it is misclassified)."
)

#: Values of ``build_report(test_predictions_for=...)``.
PREDICTIONS_FOR = ("shown", "all")


def _shown_predictions(
    predictions: Any, predictions_for: str | None, rows: list[int], default_rows: bool, n_test: int
) -> list[Any] | None:
    """The prediction of each shown row, from one per row or one per test example."""
    if predictions_for is not None and predictions_for not in PREDICTIONS_FOR:
        raise InvalidArgumentError(
            f"test_predictions_for must be 'shown' (one per shown test example) or 'all' "
            f"(one per test example), got {predictions_for!r}"
        )
    if predictions is None:
        return None
    array = _prediction_array(predictions)
    if array.ndim > 1 and math.prod(array.shape[1:]) > 1:
        values = [row.tolist() for row in array]  # several values per example
    else:
        values = list(array.reshape(-1))
    n_shown = len(rows)
    if predictions_for is None:
        if len(values) == n_shown and len(values) == n_test:
            # Both readings fit; they agree only when row r is test example r.
            if not default_rows and rows != list(range(n_test)):
                raise InvalidArgumentError(
                    f"test_predictions has {_entries(len(values))}, both the number of "
                    "shown test examples and of test examples, and test_indices reorders them; say "
                    "which it is: test_predictions_for='all' (indexed by test position) or "
                    "'shown' (in the order of test_indices)"
                )
            predictions_for = "shown"
        elif len(values) == n_shown:
            predictions_for = "shown"
        elif len(values) == n_test:
            predictions_for = "all"
        else:
            raise InvalidArgumentError(
                f"test_predictions has {_entries(len(values))}; give one per shown test "
                f"example ({n_shown}) or one per test example ({n_test})"
            )
    expected = n_shown if predictions_for == "shown" else n_test
    if len(values) != expected:
        what = "shown test example" if predictions_for == "shown" else "test example"
        raise InvalidArgumentError(
            f"test_predictions has {_entries(len(values))} but "
            f"test_predictions_for={predictions_for!r} needs one per {what} ({expected})"
        )
    return values if predictions_for == "shown" else [values[i] for i in rows]


def build_report(
    train_dataset: Any,
    test_dataset: Any,
    proponents: Any,
    opponents: Any = None,
    *,
    test_indices: Sequence[int] | np.ndarray | None = None,
    test_predictions: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    test_predictions_for: str | None = None,
    train_predictions: Sequence[Any] | np.ndarray | torch.Tensor | None = None,
    self_influence: Any = None,
    self_influence_name: str = "self-influence",
    mislabeled: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    baselines: Mapping[str, Any] | None = None,
    label_names: Sequence[str] | Mapping[int, str] | None = None,
    render: Callable[..., Any] | None = None,
    title: str = "Influence report",
    subtitle: str | None = None,
    summary: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    proponents_title: str = "Proponents: lowered this example's loss on its label",
    opponents_title: str = "Opponents: raised it",
    ranking_note: str | None = None,
    examples_note: str | None = None,
    n_suspicious: int = 24,
    plot_figure: bool = True,
) -> InfluenceReport:
    """Build the influence report from results computed elsewhere (e.g. in a notebook).

    Args:
        train_dataset: the training set the indices refer to; a map-style Dataset or a
            DataLoader over one, whose items are ``(*inputs, label)``.
        test_dataset: the test set ``test_indices`` refer to (same item form).
        proponents: for each shown test example, its proponents:
            :class:`~proponents.KMostInfluentialResults`, an ``(indices, scores)`` pair of
            ``(n_shown, k)``, or a one-layer ``SimilarityInfluence`` result.
        opponents: the same for opponents, or ``None``.
        test_indices: positions in ``test_dataset`` of the ``n_shown`` rows; default
            ``0..n_shown-1``.
        test_predictions: the model's predicted labels: one per shown test example
            (``n_shown`` entries, in the order of ``test_indices``), or one per test example
            (``len(test_dataset)`` entries, indexed by test position).
        test_predictions_for: which of the two ``test_predictions`` holds: ``"shown"`` or
            ``"all"``. ``None`` (default) tells them apart by length; when both lengths
            are equal and ``test_indices`` is not ``0..n-1`` in order, the two readings
            differ and it must be given.
        train_predictions: the predicted label of every training example
            (``len(train_dataset)`` entries), or ``None``.
        self_influence: ``(n_train,)`` suspicion scores (higher is more suspicious), or
            ``None`` to leave out the ranking.
        self_influence_name: what those scores are, as shown in the report.
        mislabeled: training indices known to be mislabelled (e.g. flipped on purpose),
            or a boolean mask with one entry per training example; they are marked, and a
            detection curve compares the rankings. Repeated indices count once; an empty
            list means none is known.
        baselines: other ``(n_train,)`` suspicion scores to compare in the detection curve,
            by name (e.g. ``{"final loss": losses}``).
        label_names: names of integer labels (a list, tuple or 1-D array whose entry ``i``
            names label ``i``, or a dict from label to name); a float label of a whole
            value (a binary model's ``1.0`` target) is named like that integer. A label it
            has no name for is shown as its number, with a ``UserWarning`` listing those
            labels.
        render: a function ``render(*inputs)`` -> what to show for an example: an image
            array or tensor, a PIL image, PNG bytes, or a string (shown as escaped text).
            By default an example's only input is shown (image-like arrays as images,
            anything else as text).
        title: the page title.
        subtitle: one line under the title.
        summary: facts listed at the top: a mapping from name to value.
        notes: extra sentences shown under the summary (escaped), one paragraph each: a
            list or tuple of str (a single sentence too goes in a list).
        proponents_title: heading of the proponent strips.
        opponents_title: heading of the opponent strips.
        ranking_note: what ranks high by ``self_influence``, shown under the ranking's
            heading; ``None``: TracIn's reading (examples the model found hard to fit).
        examples_note: what the proponent and opponent strips show, under their heading;
            ``None``: TracIn's reading (influence scores on the test example's loss).
        n_suspicious: how many of the most suspicious training examples to show (0 or
            more; at most the whole training set is shown).
        plot_figure: draw the detection curve (or sorted scores) with matplotlib
            (``True`` or ``False``).

    Returns:
        The :class:`InfluenceReport`.

    Raises:
        MissingExtraError: ``plot_figure`` is true and matplotlib is not installed.
        InvalidArgumentError: indices out of range, float indices (of the results or
            ``test_indices``) that are not whole numbers, shapes or lengths that do not
            fit, ``test_predictions`` whose reading is ambiguous without
            ``test_predictions_for``, a negative ``n_suspicious``.
        ArgumentTypeError: ``mislabeled`` that are neither integers nor a boolean mask;
            result indices or ``test_indices`` that are not numbers; scores
            (``self_influence``, ``baselines``, the results') that are not numbers;
            ``title`` or another text that is not a ``str``; ``summary`` or ``baselines``
            that is not a mapping; ``label_names`` that is neither a sequence nor a
            mapping; ``notes`` that is a single ``str`` or holds something else than
            strings; ``render`` that is not callable; ``n_suspicious`` that is not an int;
            ``plot_figure`` that is not a bool.
    """
    plot_figure = check_flag(plot_figure, "plot_figure", "build_report")
    n_suspicious = check_int(n_suspicious, "build_report: n_suspicious")
    if n_suspicious < 0:
        raise InvalidArgumentError(
            f"build_report: n_suspicious must be 0 or more (how many of the most suspicious "
            f"training examples to show), got {n_suspicious}"
        )
    _check_text(title, "title")
    _check_text(subtitle, "subtitle", or_none=True)
    _check_text(self_influence_name, "self_influence_name")
    _check_text(proponents_title, "proponents_title")
    _check_text(opponents_title, "opponents_title")
    _check_text(ranking_note, "ranking_note", or_none=True)
    _check_text(examples_note, "examples_note", or_none=True)
    summary = _check_mapping(summary, "summary", "name -> fact")
    baselines = _check_mapping(baselines, "baselines", "name -> scores")
    label_names = _check_label_names(label_names)
    notes = _check_notes(notes)
    if render is not None and not callable(render):
        raise ArgumentTypeError(
            f"build_report: render must be a function render(*inputs) or None, got "
            f"{type(render).__name__}"
        )
    suspicion = (
        _float_array(self_influence, "self_influence").reshape(-1)
        if self_influence is not None
        else None
    )
    baseline_scores: dict[str, np.ndarray] = {}
    for name, values in (baselines or {}).items():
        if not isinstance(name, str):
            raise ArgumentTypeError(
                f"build_report: the names of baselines must be str, got {type(name).__name__} "
                f"{name!r}"
            )
        baseline_scores[name] = _float_array(values, f"baselines[{name!r}]").reshape(-1)

    pro = as_results(proponents, "proponents")
    con = as_results(opponents, "opponents") if opponents is not None else None
    n_shown = pro.indices.shape[0]
    if con is not None and con.indices.shape[0] != n_shown:
        raise InvalidArgumentError(
            f"opponents have {con.indices.shape[0]} rows but proponents have {n_shown}; both "
            "need one row per shown test example"
        )
    rows = (
        list(range(n_shown))
        if test_indices is None
        else _index_array(test_indices, "test_indices").reshape(-1).tolist()
    )
    if len(rows) != n_shown:
        raise InvalidArgumentError(
            f"test_indices has {_entries(len(rows))} but the results have {count(n_shown, 'row')}"
        )
    train_data = _dataset(train_dataset, "train_dataset")
    n_train = len(train_data)
    bad = (
        set(plot.bad_indices(mislabeled, n_train, "mislabeled").tolist())
        if mislabeled is not None
        else set()
    )
    train_pred = _prediction_array(train_predictions) if train_predictions is not None else None
    if train_pred is not None and (train_pred.ndim == 0 or train_pred.shape[0] != n_train):
        size = 1 if train_pred.ndim == 0 else train_pred.shape[0]
        raise InvalidArgumentError(
            f"train_predictions has {_entries(size)} but train_dataset has {n_train}; "
            "give the predicted label of every training example"
        )
    unnamed: set[int] = set()
    train = _Examples(train_data, "train_dataset", render, label_names, train_pred, bad, unnamed)
    test = _Examples(test_dataset, "test_dataset", render, label_names, None, set(), unnamed)
    outside_test = [i for i in rows if not 0 <= i < len(test)]
    if outside_test:
        raise InvalidArgumentError(
            f"test_indices {outside_test[:10]} are outside the {len(test)} test examples"
        )
    test_pred = _shown_predictions(
        test_predictions, test_predictions_for, rows, test_indices is None, len(test)
    )
    for what, res in (("proponents", pro), ("opponents", con)):
        outside = plot.out_of_range(res.indices, len(train)) if res is not None else []
        if outside:
            raise InvalidArgumentError(
                f"{what} refer to training index {outside[0]} but train_dataset has "
                f"{len(train)} examples (valid: 0 to {len(train) - 1}); the results must "
                "come from this training set"
            )

    parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="sub">{html.escape(subtitle)}</p>')
    if summary:
        parts.append(_kv_table(summary))
    parts.extend(f'<p class="note">{html.escape(note)}</p>' for note in notes)

    figures: dict[str, Any] = {}
    figure_png: bytes | None = None
    figure_name = "mislabel_curve.png"
    if suspicion is not None:
        scores = suspicion
        if scores.size != len(train):
            raise InvalidArgumentError(
                f"self_influence has {_entries(scores.size)} but train_dataset has {len(train)}"
            )
        rankings: dict[str, Any] = {self_influence_name: scores}
        for name, baseline in baseline_scores.items():
            if baseline.size != len(train):
                raise InvalidArgumentError(
                    f"baseline {name!r} has {_entries(baseline.size)} but train_dataset "
                    f"has {len(train)}"
                )
            rankings[name] = baseline
        parts.append("<h2>Most suspicious training examples</h2>")
        explain = f"Training examples ranked by {self_influence_name}, highest first. " + (
            TRACIN_RANKING_NOTE if ranking_note is None else ranking_note
        )
        if bad:
            if len(bad) == 1:
                explain += (
                    " 1 label is known to be wrong (red border); the curve shows where each "
                    "ranking finds it as one reads down it."
                )
            else:
                explain += (
                    f" {len(bad)} labels are known to be wrong (red border); the curve shows "
                    "how many of them each ranking finds as one reads down it."
                )
        parts.append(f'<p class="note">{html.escape(explain)}</p>')
        non_finite = _non_finite_note(scores, self_influence_name)
        if non_finite:
            parts.append(f'<p class="note">{html.escape(non_finite)}</p>')
        top = ['<div class="top">']
        if bad:
            table = plot.detection_table(rankings, sorted(bad), n=len(train))
            figures["detection"] = table
            top.append(_detection_html(table))
            if plot_figure:
                figure_png = plot.detection_figure_png(rankings, sorted(bad))
        elif plot_figure:
            figure_png = plot.score_figure_png(scores, f"{self_influence_name}, sorted")
            figure_name = "self_influence.png"
        if figure_png is not None:
            top.append(
                f'<figure><img class="plot" src="{data_uri(figure_png)}" '
                f'alt="{html.escape(figure_name)}" width="640" height="420"></figure>'
            )
        top.append("</div>")
        parts.append("".join(top))
        order = plot.ranking(scores)[: min(n_suspicious, len(train))]
        figures["most_suspicious"] = [int(i) for i in order]
        cards = "".join(train.card(int(i), scores[i]).html() for i in order)
        parts.append(f'<h3>The {len(order)} most suspicious</h3><div class="cards">{cards}</div>')

    if n_shown:
        parts.append("<h2>Test examples, their proponents and opponents</h2>")
        note = TRACIN_EXAMPLES_NOTE if examples_note is None else examples_note
        parts.append(f'<p class="note">{html.escape(note)}</p>')
        for r, index in enumerate(rows):
            prediction = test_pred[r] if test_pred is not None else None
            test_card = test.card(index, test=True, prediction=prediction).html()
            strips = [f"<h3>{html.escape(proponents_title)}</h3>", '<div class="cards">']
            strips.extend(
                train.card(int(i), s).html()
                for i, s in zip(pro.indices[r], pro.scores[r], strict=True)
            )
            strips.append("</div>")
            if con is not None:
                strips.append(f'<h3>{html.escape(opponents_title)}</h3><div class="cards">')
                strips.extend(
                    train.card(int(i), s).html()
                    for i, s in zip(con.indices[r], con.scores[r], strict=True)
                )
                strips.append("</div>")
            parts.append(
                f'<div class="row">{test_card}<div class="strips">{"".join(strips)}</div></div>'
            )

    if unnamed and label_names is not None:
        shown = ", ".join(map(str, sorted(unnamed)[:10])) + (", …" if len(unnamed) > 10 else "")
        warn(
            f"label_names has no name for label(s) {shown} "
            f"({count(len(label_names), 'name')} given); they are shown as numbers. Give a "
            "name for every label (index i names label i)"
        )

    from proponents import __version__

    parts.append(f"<footer>Made by proponents {html.escape(__version__)}.</footer>")
    fragment = f'<style>{_STYLE}</style><div class="prp-report">{"".join(parts)}</div>'
    return InfluenceReport(title, fragment, figure_png, figure_name, figures)
