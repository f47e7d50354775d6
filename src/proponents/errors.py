"""Typed exceptions raised by proponents.

Every error subclasses the built-in exception a caller would naturally catch
(``ValueError``, ``TypeError``, ``FileNotFoundError``, ``RuntimeError``), so code
that handles the standard exceptions keeps working, while code that wants to
tell our errors apart can catch :class:`ProponentsError`. :func:`article` and
:func:`count` keep their messages grammatical ("an int", "1 entry").
"""

from __future__ import annotations


class ProponentsError(Exception):
    """Base class of every exception raised on purpose by proponents."""


class InvalidArgumentError(ProponentsError, ValueError):
    """An argument has the right type but a value that cannot be used."""


class ArgumentTypeError(ProponentsError, TypeError):
    """An argument has a type that cannot be used."""


class CheckpointNotFoundError(ProponentsError, FileNotFoundError):
    """A checkpoint source (directory, file or iterator) holds no usable checkpoint."""


class CheckpointLoadError(ProponentsError, RuntimeError):
    """A checkpoint exists but cannot be read or does not fit the model."""


class BatchFormatError(ProponentsError, ValueError):
    """A batch does not follow the ``(*model_inputs, label)`` convention."""


class StoreError(ProponentsError, RuntimeError):
    """An on-disk store cannot be written or read."""


class IndexMismatchError(ProponentsError, ValueError):
    """A saved index does not match the model, checkpoints or dataset it is loaded for."""


class IndexNotFoundError(ProponentsError, FileNotFoundError):
    """No saved index exists at the given path."""


class CheckpointChangedError(ProponentsError, RuntimeError):
    """A checkpoint no longer holds the content that something was computed from."""


class RenderError(ProponentsError, RuntimeError):
    """A ``render`` function given for a report failed on an example."""


def article(phrase: str) -> str:
    """``phrase`` after "a" or "an", chosen by its first letter: "an int", "a list"."""
    return f"{'an' if phrase[:1].lower() in tuple('aeiou') else 'a'} {phrase}"


def count(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and ``noun``, in the plural (``nouns``, else ``noun + "s"``) unless ``n`` is 1:
    "1 entry", "3 entries"."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def first_names(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, comma-separated, and how many more there are:
    "a, b, c, d, e and 3 more"."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")
