"""Small argument checks shared by the public classes.

Each check raises a typed error from :mod:`proponents.errors` whose message names
the argument, so a wrong value fails at the call that received it rather than deep
inside a computation (or, worse, is silently read as truthy).
"""

from __future__ import annotations

import operator
import os
from typing import Any

import numpy as np
from torch import nn

from proponents.errors import ArgumentTypeError


def check_flag(value: Any, argument: str, owner: str | None = None) -> bool:
    """Return ``value`` as a ``bool`` if it is one (a NumPy boolean too), else raise
    naming ``argument``.

    Args:
        value: the value given for a ``True``/``False`` option.
        argument: the parameter name shown in the message.
        owner: the class or method name prefixed to the message, if any.

    Raises:
        ArgumentTypeError: when ``value`` is not a ``bool`` (``1``, ``"yes"`` and
            ``None`` included: a string such as ``"no"`` would otherwise count as true).
    """
    if isinstance(value, np.bool_):
        return bool(value)
    if not isinstance(value, bool):
        prefix = f"{owner}: " if owner else ""
        raise ArgumentTypeError(
            f"{prefix}{argument} must be True or False, got {type(value).__name__} {value!r}"
        )
    return value


def check_model(value: Any, argument: str, owner: str) -> nn.Module:
    """Return ``value`` if it is a plain ``nn.Module``, else raise naming ``argument``.

    ``nn.DataParallel`` and ``DistributedDataParallel`` wrappers are refused with the
    fix: proponents runs the wrapped model itself (``model.module``), one device per
    process, since a wrapper scatters each batch over replicas that neither
    ``torch.func`` nor layer hooks can follow. To spread the work over several GPUs,
    see ``distributed=`` (``docs/distributed.md``).

    Raises:
        ArgumentTypeError: for anything else, or for such a wrapper.
    """
    if not isinstance(value, nn.Module):
        raise ArgumentTypeError(
            f"{owner}: {argument} must be a torch.nn.Module, got {type(value).__name__}"
        )
    if isinstance(value, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ArgumentTypeError(
            f"{owner}: {argument} is wrapped in {type(value).__name__}; pass the model it "
            f"wraps, {argument}.module (layer names then lose their 'module.' prefix; "
            "checkpoints saved from the wrapper still load). To use several GPUs, run one "
            "process per GPU with distributed=True (see docs/distributed.md)"
        )
    return value


def check_path(value: Any, argument: str, owner: str | None = None) -> None:
    """Raise naming ``argument`` unless ``value`` is a ``str`` or ``os.PathLike``.

    Raises:
        ArgumentTypeError: for any other type.
    """
    if not isinstance(value, (str, os.PathLike)):
        prefix = f"{owner}: " if owner else ""
        raise ArgumentTypeError(
            f"{prefix}{argument} must be a directory path (str or os.PathLike), got "
            f"{type(value).__name__}"
        )


def check_int(value: Any, argument: str, or_none: bool = False) -> int:
    """Return ``value`` as an ``int`` (numpy integers included), else raise naming ``argument``.

    Args:
        value: the value to check.
        argument: the parameter name shown in the message.
        or_none: the caller also accepts ``None`` (checked by the caller); only the
            message says so.

    Raises:
        ArgumentTypeError: for a ``bool`` or any non-integer type.
    """
    wanted = "an int or None" if or_none else "an int"
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{argument} must be {wanted}; got bool ({value})")
    try:
        return operator.index(value)
    except TypeError:
        raise ArgumentTypeError(
            f"{argument} must be {wanted}; got {type(value).__name__} ({value!r})"
        ) from None
