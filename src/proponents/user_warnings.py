"""Warnings that point at the user's line.

A warning raised deep inside a call (in the engine, under a progress loop, from a
callback of the user's loss) would carry a fixed ``stacklevel`` that is right for one
call path and names a library file on the others; Python's default filter then shows it
once per library line, hiding the same warning from the user's later calls.
:func:`warn` attributes every warning to the frame that called into this package.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import FrameType

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_PACKAGE)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's call.

    The stack is walked from here to its root; the warning names the frame just outside
    the outermost frame of this package (the line that called the public method), or
    the direct caller when no frame outside it is found.
    """
    frame: FrameType | None = sys._getframe(1)
    level, outermost = 2, 2
    while frame is not None:
        if _inside(frame.f_code.co_filename):
            outermost = level
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=outermost + 1)
