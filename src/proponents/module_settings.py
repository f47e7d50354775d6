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

from torch import nn

#: Attributes every ``nn.Module`` has (torch's own bookkeeping, and ``training``: gradients
#: and activations are taken in eval mode whatever the mode at the call).
MODULE_BASICS = frozenset(nn.Module().__dict__) | {"training"}
#: Longest sequence attribute written out item by item; a longer one counts by a digest.
_MAX_ITEMS = 64
#: Longest text kept as it is; a longer one is replaced by a digest.
_MAX_TEXT = 200
_SCALARS = (bool, int, float, complex, str, bytes)


def callable_name(fn: Any) -> str:
    """Module and qualified name of a function, or of the class of a callable object
    (a bound method by its function; ``functools.partial`` by what it wraps)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # bound method
    named = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(named, '__module__', '')}.{named.__qualname__}"


def plain_text(value: Any, depth: int = 0) -> str | None:
    """A stable text for a value a ``forward`` may read as a setting (a number, a string,
    a flag, an enum member, a function, or a tuple or list of those), or ``None`` for
    anything else (tensors, submodules and containers are compared elsewhere; other
    objects have no stable text: theirs may name their address)."""
    if value is None or isinstance(value, _SCALARS):
        text = repr(value)
    elif isinstance(value, enum.Enum):
        text = f"{type(value).__module__}.{type(value).__qualname__}.{value.name}"
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, functools.partial)):
        text = f"<{callable_name(value)}>"
    elif isinstance(value, (tuple, list)) and len(value) > _MAX_ITEMS:
        # a vocabulary, say: scalars only, counted by a digest of their text
        if not all(v is None or isinstance(v, _SCALARS) for v in value):
            return None
        text = repr(value)
    elif isinstance(value, (tuple, list)) and depth < 2:
        items = [plain_text(v, depth + 1) for v in value]
        if any(item is None for item in items):
            return None
        text = f"{type(value).__name__}({','.join(items)})"  # type: ignore[arg-type]
    else:
        return None
    if len(text) > _MAX_TEXT:
        text = f"{type(value).__name__}#{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    return text


def plain_attributes(module: nn.Module) -> dict[str, str]:
    """``{name: text}`` of each plain-valued attribute (:func:`plain_text`) the module
    instance holds beyond every module's own, in name order."""
    out = {}
    for name, value in sorted(vars(module).items()):
        if name not in MODULE_BASICS:
            text = plain_text(value)
            if text is not None:
                out[name] = text
    return out
