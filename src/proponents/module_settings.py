"""The plain-valued attributes of a module: settings its ``forward`` may read.

``extra_repr()`` prints some of a module's settings; others it keeps as plain attributes
that nothing prints (``nn.TransformerEncoderLayer.norm_first`` and its activation
function, a user's own temperature or mode string). Fingerprints count them
(:mod:`proponents.fingerprints`); the model guard puts back those a ``forward`` changes
(:mod:`proponents.model_guard`), which are state rather than settings.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import types
from typing import Any

import numpy as np
from torch import nn

#: Attributes every ``nn.Module`` has (torch's own bookkeeping, and ``training``: gradients
#: and activations are taken in eval mode whatever the mode at the call).
MODULE_BASICS = frozenset(nn.Module().__dict__) | {"training"}
#: Longest sequence attribute written out item by item; a longer one counts by a digest.
_MAX_ITEMS = 64
#: Longest text kept as it is; a longer one is replaced by a digest.
_MAX_TEXT = 200
_SCALARS = (bool, int, float, complex, str, bytes)
#: The version of :func:`plain_text` a saved index records; one without it holds the
#: ``legacy`` texts.
ATTRIBUTE_TEXTS = 2
#: How deep containers (and the arguments of functions) are written out.
_MAX_DEPTH = 2


def callable_name(fn: Any) -> str:
    """Module and qualified name of a function, or of the class of a callable object
    (a bound method by its function; ``functools.partial`` by what it wraps)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound method
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(named, '__module__', '')}.{named.__qualname__}"


def _function_text(fn: Any, depth: int) -> str:
    """A function by its name; a ``functools.partial`` also by its arguments, and a
    function a factory made (``<locals>`` in its name: a lambda with a temperature its
    closure holds, say) also by its defaults and closure, which set what it does."""
    if isinstance(fn, functools.partial):
        parts = [_part(v, depth) for v in fn.args]
        parts += [f"{k}={_part(v, depth)}" for k, v in sorted(fn.keywords.items())]
        return f"{_function_text(fn.func, depth)}({','.join(parts)})"
    text = f"<{callable_name(fn)}>"
    if "<locals>" in getattr(fn, "__qualname__", "") and depth < _MAX_DEPTH:
        cells = closure_values(fn)
        bound = [*(fn.__defaults__ or ()), *sorted((fn.__kwdefaults__ or {}).items())]
        if cells or bound:
            text += "[" + ",".join(_part(v, depth) for v in (*bound, *cells)) + "]"
    return text


def _part(value: Any, depth: int) -> str:
    """:func:`plain_text` of a part of a value, or its type's name where it has none."""
    text = plain_text(value, depth + 1)
    return text if text is not None else f"?{type(value).__qualname__}"


def closure_values(fn: Any) -> list[Any]:
    """What the closure cells of function ``fn`` hold (empty cells left out)."""
    values = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # a cell whose variable is not assigned yet
            continue
    return values


def plain_text(value: Any, depth: int = 0, legacy: bool = False) -> str | None:
    """A stable text for a value a ``forward`` may read as a setting (a number, a string,
    a flag, a NumPy scalar, an enum member, a function, or a tuple, list, set or dict of
    those), or ``None`` for anything else (tensors, submodules and containers are
    compared elsewhere; other objects have no stable text: theirs may name their
    address).

    ``legacy``: the text of indexes saved before NumPy scalars, sets, dicts, a partial's
    arguments and a closure's values counted (:data:`ATTRIBUTE_TEXTS`): those are
    ``None``, or a function's name alone."""
    if legacy and (
        isinstance(value, (set, frozenset, dict))
        or (isinstance(value, np.generic) and not isinstance(value, _SCALARS))
    ):
        return None  # (np.float64 and np.str_, subclasses of float and str, were written)
    if value is None or isinstance(value, _SCALARS):
        text = repr(value)
    elif isinstance(value, np.generic) and value.dtype.kind in "biufcSU":
        text = f"{type(value).__name__}({value.item()!r})"
    elif isinstance(value, enum.Enum):
        text = f"{type(value).__module__}.{type(value).__qualname__}.{value.name}"
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        text = f"<{callable_name(value)}>" if legacy else _function_text(value, depth)
    elif isinstance(value, (tuple, list, set, frozenset, dict)) and len(value) > _MAX_ITEMS:
        # a vocabulary, say: scalars only, counted by a digest of their text
        flat = [*value, *value.values()] if isinstance(value, dict) else value
        if not all(v is None or isinstance(v, _SCALARS) for v in flat):
            return None
        if isinstance(value, (tuple, list)):
            text = repr(value)
        else:  # in an order of their own: sets have none, dicts in the order keys came
            text = repr(sorted(value.items() if isinstance(value, dict) else value, key=repr))
    elif isinstance(value, (tuple, list, set, frozenset)) and depth < _MAX_DEPTH:
        items = [plain_text(v, depth + 1, legacy) for v in value]
        if any(item is None for item in items):
            return None
        if isinstance(value, (set, frozenset)):
            items.sort()  # type: ignore[call-arg]
        text = f"{type(value).__name__}({','.join(items)})"  # type: ignore[arg-type]
    elif isinstance(value, dict) and depth < _MAX_DEPTH:
        pairs = [(plain_text(k, depth + 1), plain_text(v, depth + 1)) for k, v in value.items()]
        if any(k is None or v is None for k, v in pairs):
            return None
        text = f"{type(value).__name__}({','.join(sorted(f'{k}:{v}' for k, v in pairs))})"
    else:
        return None
    if len(text) > _MAX_TEXT:
        text = f"{type(value).__name__}#{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    return text


def plain_attributes(module: nn.Module, legacy: bool = False) -> dict[str, str]:
    """``{name: text}`` of each plain-valued attribute (:func:`plain_text`, with
    ``legacy``) the module instance holds beyond every module's own, in name order."""
    out = {}
    for name, value in sorted(vars(module).items()):
        if name not in MODULE_BASICS:
            text = plain_text(value, legacy=legacy)
            if text is not None:
                out[name] = text
    return out
