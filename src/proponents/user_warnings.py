"""Warnings that point at the user's line.

A warning raised deep inside a call (in the engine, under a progress loop, from a
callback of the user's loss) would carry a fixed ``stacklevel`` that is right for one
call path and names a library file on the others; Python's default filter then shows it
once per library line, hiding the same warning from the user's later calls.
:func:`warn` attributes every warning to the user's line that led to it.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import warnings
from types import FrameType

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Python's own library: its frames (threading, importlib, runpy) are never the user's.
_STDLIB = tuple(
    {os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib")}
)
#: Installed packages: inside the standard library's folder in a venv, pyenv or conda
#: Python (``lib/python3.X/site-packages``), but code a user may have written.
_SITE = tuple(
    {os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("purelib", "platlib")}
)


def _inside(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE)


def _library(filename: str) -> bool:
    """Whether a frame of ``filename`` is code the user did not write: this package,
    torch (whose ``vmap`` runs our callbacks), or Python's standard library."""
    if filename.startswith("<frozen") or _inside(filename):
        return True
    path = os.path.abspath(filename)
    torch = sys.modules.get("torch")
    torch_file = getattr(torch, "__file__", None)
    if torch_file and path.startswith(os.path.dirname(os.path.abspath(torch_file)) + os.sep):
        return True
    return path.startswith(_STDLIB) and not path.startswith(_SITE)


def _target(frame: FrameType) -> FrameType:
    """The innermost frame, from ``frame`` outwards, that is not library code (a task
    file the command line runs, a test, a script); else the first one outside this
    package (a thread's ``run``), else ``frame`` itself."""
    first_outside: FrameType | None = None
    current: FrameType | None = frame
    while current is not None:
        name = current.f_code.co_filename
        if first_outside is None and not _inside(name):
            first_outside = current
        if not _library(name):
            return current
        current = current.f_back
    return first_outside or frame


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line.

    The frame is found by walking out of this package, torch and the standard library
    (:func:`_target`); the warning is then issued for that frame's file and line, with
    its module's registry, so filters and "once per location" work as for a warning
    raised on that line.
    """
    frame = _target(sys._getframe(1))
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<unknown>"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )
