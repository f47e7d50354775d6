"""Finding checkpoints, loading them safely, and telling them apart.

TracIn sums influence over a sequence of training checkpoints. This module turns
what the user passes as ``checkpoints`` into a list (:func:`resolve_checkpoints`),
loads one checkpoint into a model and reports its learning rate
(:func:`load_flexible_state_dict`, the default ``checkpoints_load_func``), and
gives each checkpoint a readable label (:func:`checkpoint_label`) and a content
digest (:func:`checkpoint_fingerprint`).

Loading never unpickles arbitrary objects: PyTorch files are read with
``torch.load(..., weights_only=True)``, so a file that would run code when
unpickled is refused instead of executed.
"""

from __future__ import annotations

import glob
import hashlib
import math
import mmap
import numbers
import os
import pickle
import re
import struct
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from proponents.errors import (
    ArgumentTypeError,
    CheckpointChangedError,
    CheckpointLoadError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    article,
)
from proponents.fingerprints import tensor_bytes
from proponents.model_guard import loads_by_reference
from proponents.store import file_signature
from proponents.user_warnings import warn

__all__ = [
    "CHECKPOINT_EXTENSIONS",
    "CheckpointWatch",
    "checkpoint_fingerprint",
    "checkpoint_signature",
    "checkpoint_label",
    "load_flexible_state_dict",
    "resolve_checkpoints",
]

PathLike = Union[str, "os.PathLike[str]"]

#: File extensions recognised as checkpoints when a directory is given.
CHECKPOINT_EXTENSIONS: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")

# Keys under which training scripts commonly nest the model's state dict, by priority.
_NESTED_KEYS: tuple[str, ...] = ("model_state_dict", "state_dict", "model")
# Keys under which training scripts commonly store the learning rate, by priority.
_LR_KEYS: tuple[str, ...] = ("learning_rate", "lr")
# Key prefixes added by wrappers: DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
# How many key names an error message shows per list before summarising the rest.
_MAX_KEYS_SHOWN = 10
# How deep the loader looks through nested containers for the state dict.
_MAX_NESTING = 4
_CHUNK_BYTES = 1 << 20
_HOW_TO_SAVE = (
    "Save checkpoints as plain data, e.g. torch.save({'model_state_dict': model.state_dict(), "
    "'learning_rate': 0.01}, path), or as a .safetensors file; or pass a "
    "checkpoints_load_func of your own if you trust the file."
)


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def _is_path(obj: Any) -> bool:
    return isinstance(obj, (str, os.PathLike))


def _natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key for the natural order of file names.

    The name is cut into runs of digits and runs of other characters, and names are
    compared run by run from the left: two digit runs by their value (``ckpt-2`` before
    ``ckpt-10``), two text runs as whole strings without regard to case (so a run that is
    the beginning of the other comes first: ``ckpt-10`` before ``ckpt-final``), and a text
    run before a digit run (``last.pt`` before ``1.pt``). Names that tie (``1.pt`` and
    ``01.pt``, ``A.pt`` and ``a.pt``) are ordered by their exact text.
    """
    parts = re.split(r"(\d+)", name)
    key = []
    for part in parts:
        if part.isdecimal():  # what ``\d`` matched; not ``isdigit``, which takes '²' too
            key.append((1, int(part), part))
        elif part:
            key.append((0, 0, part.casefold()))
    # Fall back on the raw name so that names equal under the key still sort stably.
    return (*key, (2, 0, name))


def _has_checkpoint_suffix(path: Path) -> bool:
    return path.suffix.lower() in CHECKPOINT_EXTENSIONS


#: Endings of files that may hold a ``torch.save`` checkpoint though a directory's
#: checkpoints are not read from them (see :func:`_resolve_path`).
_OTHER_SAVE_ENDINGS = (".tar", ".pkl", ".pickle")


def _may_be_a_checkpoint(path: Path) -> bool:
    """A visible file a directory's checkpoints are not read from whose name suggests it
    may be one: one of :data:`_OTHER_SAVE_ENDINGS` (``checkpoint.pth.tar``, a pickle), not
    a README, a licence or a tokenizer's ``.model``."""
    name = path.name
    if _is_hidden(name) or _has_checkpoint_suffix(path) or not path.is_file():
        return False
    return name.lower().endswith(_OTHER_SAVE_ENDINGS)


def _is_hidden(name: str) -> bool:
    """Names starting with ``.``: dotfiles, and the ``._name`` AppleDouble files macOS
    writes beside every file copied to a volume without extended attributes."""
    return name.startswith(".")


def _discovered_file(path: Path, source_text: str) -> bool:
    """Whether an entry found in a directory or by a pattern is a checkpoint file to use.

    Regular files (or links to them) are; directories are not (skipped). An entry that is
    neither once links are followed cannot be read: a link whose target is missing (an
    unmounted volume, a moved file) or that loops, or a FIFO, socket or device. Skipping
    it would leave the scores summed over fewer checkpoints than the user has, so it is
    an error naming the entry.

    Raises:
        CheckpointNotFoundError: for a link that does not lead to an existing file.
        CheckpointLoadError: for an entry that is not a regular file or directory.
    """
    if path.is_file():
        return True
    if path.is_dir():
        return False
    if path.is_symlink():
        try:
            target = f" to '{os.readlink(path)}'"
        except OSError:
            target = ""
        raise CheckpointNotFoundError(
            f"checkpoint '{path.name}' in {source_text} is a broken symbolic link{target}: "
            "its target does not exist or the link loops, so it cannot be read. Restore the "
            "target (mount its volume, say), or remove the link so that only the "
            "checkpoints to use are left, or pass the checkpoint files as a list"
        )
    raise CheckpointLoadError(
        f"checkpoint '{path.name}' in {source_text} is not a regular file (a FIFO, socket "
        "or device), so it cannot be read as a checkpoint. Remove it, or pass the "
        "checkpoint files as a list"
    )


def _extensions_text() -> str:
    return ", ".join(f"*{ext}" for ext in CHECKPOINT_EXTENSIONS)


def _check_item_exists(item: Any, position: int, source_text: str) -> None:
    if _is_path(item) and not os.path.exists(item):
        raise CheckpointNotFoundError(
            f"checkpoint #{position} of {source_text} does not exist: '{os.fspath(item)}'"
        )


def resolve_checkpoints(source: Any) -> list[Any]:
    """Turn a ``checkpoints`` argument into a list of checkpoints.

    Accepted forms:

    * a directory (``str`` or path-like): the files in it whose extension is one of
      :data:`CHECKPOINT_EXTENSIONS` (compared case-insensitively), in natural order (see
      below). Other files, subdirectories and names starting with ``.`` (dotfiles, macOS
      ``._*`` files) are ignored. An entry with such an extension that cannot be read (a
      broken symbolic link) is an error, not skipped. Returned as ``str`` paths.
    * a single file path: ``[source]``, whatever its name.
    * a glob pattern (a ``str`` that is not an existing path and contains ``*``, ``?`` or
      ``[``): the matching files in natural order (by folder, then by name); matches
      whose name starts with ``.`` and matching directories are ignored, and a match that
      cannot be read (a broken link) is an error.
    * a list or tuple: kept in the given order, hidden names included; every path in it
      must exist.
    * a mapping (one already-loaded checkpoint): ``[source]``.
    * any other iterable or iterator (of paths or of already-loaded checkpoints): read
      once into a list; paths in it must exist.

    Natural order cuts each name into runs of digits and runs of other characters and
    compares names run by run from the left: digit runs by value (``ckpt-2`` before
    ``ckpt-10``), text runs as whole strings ignoring case (``ckpt-10`` before
    ``ckpt-final``, since ``ckpt-`` begins ``ckpt-final``), and a text run before a digit
    run (``last.pt`` before ``1.pt``); ties go by the exact name. Pass a list when the
    names do not share one numbering pattern.

    Args:
        source: the checkpoints, in one of the forms above.

    Returns:
        The checkpoints, each a path or an already-loaded object, in the order in which
        they are to be used.

    Raises:
        CheckpointNotFoundError: when a path does not exist, the source yields no
            checkpoint, or a checkpoint found in a directory or by a pattern is a broken
            symbolic link.
        CheckpointLoadError: when a checkpoint found in a directory or by a pattern is
            not a regular file (a FIFO, socket or device).
        ArgumentTypeError: when ``source`` has none of the accepted types.
    """
    if _is_path(source):
        return _resolve_path(source)
    if isinstance(source, (bytes, bytearray, torch.Tensor, nn.Module)) or not isinstance(
        source, (Iterable, Mapping)
    ):
        raise ArgumentTypeError(
            "checkpoints must be a directory, a checkpoint file, a list of paths, or an "
            f"iterable of paths or loaded checkpoints; got {type(source).__name__}: "
            f"{_short_repr(source)}"
        )
    if isinstance(source, Mapping):
        return [source]
    if isinstance(source, (list, tuple)):
        items = list(source)
        what = f"the {type(source).__name__} of checkpoints"
    else:
        items = list(source)
        what = f"the checkpoints iterable ({type(source).__name__})"
    if not items:
        raise CheckpointNotFoundError(f"{what} is empty: there is no checkpoint to use")
    for position, item in enumerate(items):
        _check_item_exists(item, position, what)
    return items


def _resolve_path(source: PathLike) -> list[Any]:
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        where = f"directory '{text}'"
        entries = list(path.iterdir())
        named = [p for p in entries if _has_checkpoint_suffix(p)]
        hidden = [p for p in named if _is_hidden(p.name)]
        found = [p for p in named if not _is_hidden(p.name) and _discovered_file(p, where)]
        # files torch.save may well have written under a name this reader does not take
        # (the ImageNet example's checkpoint.pth.tar, a .pkl): said, never dropped quietly
        passed_over = sorted(p.name for p in entries if _may_be_a_checkpoint(p))
        if not found:
            note = (
                f"; names starting with '.' ({_short_repr(sorted(p.name for p in hidden))}) "
                "are ignored, pass such files as a list to use them"
                if hidden
                else ""
            )
            if passed_over:
                ending = Path(passed_over[0]).suffix
                pattern = f" or a pattern such as '{glob.escape(text)}{os.sep}*{ending}'"
                note += (
                    f"; it holds {_short_repr(passed_over)}, not read for their names: pass "
                    f"them as a list{pattern} to use them"
                )
            raise CheckpointNotFoundError(
                f"{where} holds no checkpoint files ({_extensions_text()}){note}"
            )
        if passed_over:
            warn(
                f"{where}: using {len(found)} checkpoint file(s) ({_extensions_text()}) and "
                f"not {_short_repr(passed_over)}, which may be checkpoints too; pass the "
                "checkpoints as a list to choose them"
            )
        found.sort(key=lambda p: _natural_key(p.name))
        return [str(p) for p in found]
    if path.exists():
        return [source]
    if isinstance(source, str) and any(char in source for char in "*?["):
        where = f"the matches of the pattern '{text}'"
        visible = [m for m in glob.glob(source) if not _is_hidden(Path(m).name)]
        matches = [m for m in visible if _discovered_file(Path(m), where)]
        if not matches:
            raise CheckpointNotFoundError(
                f"no checkpoint file matches the pattern '{text}' (matching directories "
                "and names starting with '.' are ignored)"
            )
        matches.sort(key=lambda m: (_natural_key(os.path.dirname(m)), _natural_key(Path(m).name)))
        return matches
    raise CheckpointNotFoundError(
        f"checkpoint path '{text}' does not exist; pass a directory of checkpoint files "
        f"({_extensions_text()}), a checkpoint file, or a list of them"
    )


# --------------------------------------------------------------------------------------------
# Labels and fingerprints
# --------------------------------------------------------------------------------------------


def checkpoint_label(ckpt: Any, index: int) -> str:
    """A short human-readable name for a checkpoint, for progress bars and messages.

    Args:
        ckpt: a checkpoint path or an already-loaded checkpoint object.
        index: the checkpoint's position in the resolved list (shown as given).

    Returns:
        The file name for a path (the whole path when it has no final component), else
        ``"checkpoint object #<index>"``.
    """
    if _is_path(ckpt):
        text = os.fspath(ckpt)
        return Path(text).name or text
    return f"checkpoint object #{index}"


def checkpoint_fingerprint(ckpt: Any) -> str:
    """A stable hex digest that identifies a checkpoint's content.

    For a file, the SHA-256 of its bytes (read in chunks). For a directory, a SHA-256 over
    the relative names and bytes of every file under it. For a loaded object, a SHA-256
    over its structure: mapping keys in sorted order, and for every tensor its dtype, shape
    and bytes; plain numbers and strings by value. Objects of other types are hashed through
    their ``state_dict()`` when they have one, else through their type name and ``repr``.

    Args:
        ckpt: a checkpoint path or an already-loaded checkpoint object.

    Returns:
        A 64-character lowercase hex string.

    Raises:
        CheckpointNotFoundError: when ``ckpt`` is a path that does not exist.
    """
    digest = hashlib.sha256()
    if _is_path(ckpt):
        path = Path(os.fspath(ckpt))
        if path.is_dir():
            digest.update(b"dir\0")
            files = sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
                digest.update(_file_digest(file))
            return digest.hexdigest()
        if not path.exists():
            raise CheckpointNotFoundError(f"checkpoint file '{path}' does not exist")
        return _file_digest(path).hex()
    _hash_object(ckpt, digest.update)
    return digest.hexdigest()


def checkpoint_kind(ckpt: Any) -> str:
    """``"directory"``, ``"file"`` or ``"object"`` (a loaded checkpoint): fingerprints of
    different kinds are not comparable (file bytes against the loaded tensors)."""
    if not _is_path(ckpt):
        return "object"
    return "directory" if Path(os.fspath(ckpt)).is_dir() else "file"


def loaded_fingerprint(path: PathLike) -> str:
    """:func:`checkpoint_fingerprint` of the object a checkpoint file loads as (read as
    the default loader reads it, on the CPU): what the file's content is compared by
    with a checkpoint that was given as a loaded object."""
    content, _ = _read_file(path, torch.device("cpu"))
    return checkpoint_fingerprint(content)


def checkpoint_signature(ckpt: Any) -> tuple | None:
    """What the file system says about a checkpoint: device, inode, size, modification and
    status-change times of its file (or of every file under its directory, with their names), from
    ``stat`` calls alone; ``("missing",)`` when the path is gone. ``None`` for a loaded
    object, which has no such record."""
    if not _is_path(ckpt):
        return None
    path = Path(os.fspath(ckpt))
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return tuple((f.relative_to(path).as_posix(), file_signature(f.stat())) for f in files)
        return file_signature(path.stat())
    except OSError:
        return ("missing",)


class CheckpointWatch:
    """The checkpoints something was computed from, as they were then.

    Records each checkpoint's :func:`checkpoint_signature` and
    :func:`checkpoint_fingerprint` when created; :meth:`verify` then says whether they
    still hold that content. A file whose signature is unchanged is taken as unchanged
    (no read); one whose signature changed, or was taken within :attr:`RACY_NS` of the
    file's modification, is hashed again, so a file that was only touched or copied
    passes, and one with other bytes fails.

    Args:
        checkpoints: the resolved checkpoints (paths or loaded objects).
    """

    #: A signature taken less than this long after the file's modification time is not
    #: trusted (the next check hashes the file): a same-size rewrite within the file
    #: system's timestamp granularity would leave it unchanged.
    RACY_NS = 2_000_000_000

    def __init__(self, checkpoints: Sequence[Any]):
        self.checkpoints = list(checkpoints)
        self.signatures = [self._trusted(c) for c in self.checkpoints]
        self.fingerprints = [checkpoint_fingerprint(c) for c in self.checkpoints]

    def _trusted(self, ckpt: Any) -> tuple | None:
        """The signature, or ``("racy",)`` when a file was modified too recently."""
        now = time.time_ns()
        signature = checkpoint_signature(ckpt)
        if signature is None or signature == ("missing",):
            return signature
        stats = [signature] if isinstance(signature[0], int) else [s for _, s in signature]
        if any(now - stat[3] < self.RACY_NS for stat in stats):
            return ("racy",)
        return signature

    def verify(self, owner: str, what: str, objects: bool = False) -> None:
        """Raise :class:`CheckpointChangedError` when a checkpoint no longer holds the
        recorded content.

        Args:
            owner: class name for the message.
            what: what was computed from the checkpoints (for the message).
            objects: also hash loaded checkpoint objects again (costly for large ones;
                otherwise only files and directories are checked).
        """
        for index, ckpt in enumerate(self.checkpoints):
            signature = self._trusted(ckpt)
            if signature is None and not objects:
                continue
            if signature is not None and signature == self.signatures[index] != ("racy",):
                continue
            label = checkpoint_label(ckpt, index)
            if signature == ("missing",):
                raise CheckpointChangedError(
                    f"{owner}: {label} is gone; {what} was computed from it. Restore the "
                    "file, or build again from the checkpoints you have now"
                )
            if checkpoint_fingerprint(ckpt) != self.fingerprints[index]:
                raise CheckpointChangedError(
                    f"{owner}: {label} holds other content than when {what} was computed "
                    "from it, so the two no longer match. Restore the checkpoint, or build "
                    "again from the checkpoints as they are now"
                )
            self.signatures[index] = signature  # same bytes (touched, copied or racy)


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.digest()


def _hash_object(obj: Any, update: Callable[[Any], Any]) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` into ``update``."""

    def tag(name: str, payload: bytes = b"") -> None:
        update(f"<{name}:{len(payload)}>".encode())
        update(payload)

    if isinstance(obj, torch.Tensor):
        tag("tensor", f"{obj.dtype}|{tuple(obj.shape)}".encode())
        data = tensor_bytes(obj)
        update(f"<data:{data.nbytes}>".encode())
        update(data)
    elif isinstance(obj, Mapping):
        tag("map", str(len(obj)).encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _hash_object(key, update)
            _hash_object(obj[key], update)
    elif isinstance(obj, (list, tuple)):
        tag(type(obj).__name__, str(len(obj)).encode())
        for item in obj:
            _hash_object(item, update)
    elif isinstance(obj, str):
        tag("str", obj.encode("utf-8"))
    elif isinstance(obj, (bytes, bytearray)):
        tag("bytes", bytes(obj))
    elif obj is None or isinstance(obj, (bool, numbers.Number)):
        tag(type(obj).__name__, repr(obj).encode())
    elif callable(getattr(obj, "state_dict", None)):
        tag("state_dict_of", type(obj).__qualname__.encode())
        _hash_object(obj.state_dict(), update)
    else:
        tag("object", f"{type(obj).__module__}.{type(obj).__qualname__}|{obj!r}".encode())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter, else of its first buffer, else CPU."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _as_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device``, with a typed error naming the argument."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ArgumentTypeError(
            f"device must be a torch.device, a device name such as 'cpu' or 'cuda:0', or a "
            f"CUDA index, got {type(device).__name__}"
        )
    try:
        out = torch.device(device)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"device {device!r} is not a valid device: {exc}") from None
    if out.type == "cuda" and (
        not torch.cuda.is_available()
        or (out.index is not None and out.index >= torch.cuda.device_count())
    ):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise InvalidArgumentError(
            f"device {device!r}: this machine has {have} CUDA device(s) for PyTorch; give "
            "'cpu' or an existing device, or leave device=None for the model's own device"
        )
    return out


def _short_repr(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(path: Any) -> str:
    if _is_path(path):
        return f"checkpoint file '{os.fspath(path)}'"
    return f"checkpoint object ({type(path).__name__})"


def _refusal_detail(message: str) -> str:
    """Pick the object the safe unpickler refused out of torch's long error message."""
    found = re.search(r"GLOBAL\s+([\w.]+)", message)
    if found:
        return f" (it refers to {found.group(1)!r})"
    return ""


def _numpy_scalar_globals() -> list[Any]:
    """Globals that rebuild numpy scalars (e.g. a learning rate saved as ``np.float64``).

    Rebuilding a numpy scalar only interprets bytes under a dtype, so it runs no code of
    the file's choosing; numpy arrays and every other object stay refused.
    """
    try:
        import numpy as np
    except ImportError:  # numpy is optional for this purpose
        return []
    allowed: list[Any] = [np.dtype]
    # numpy >= 1.25 pickles a dtype through its class; allow the numeric ones only.
    for name in dir(getattr(np, "dtypes", None)):
        cls: Any = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            build: Any = cls
            try:
                numeric = build().kind in "biufc"
            except Exception:  # parametric dtype classes cannot be built without arguments
                numeric = False
            if numeric and cls not in allowed:
                allowed.append(cls)
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    scalar = getattr(getattr(core, "multiarray", None), "scalar", None)
    if scalar is not None:
        allowed.append((scalar, "numpy._core.multiarray.scalar"))
        allowed.append((scalar, "numpy.core.multiarray.scalar"))
    return allowed


@contextmanager
def _numpy_scalars_allowed() -> Iterator[None]:
    """Allow numpy scalars in ``weights_only`` loads, leaving torch's allowlist as found."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    get = getattr(torch.serialization, "get_safe_globals", None)
    remove = getattr(torch._weights_only_unpickler, "_remove_safe_globals", None)
    if add is None or get is None or remove is None:
        yield
        return
    present = get()
    extra = [item for item in _numpy_scalar_globals() if item not in present]
    try:
        add(extra)
    except Exception:  # an older torch that rejects an entry: load without the extras
        yield
        return
    try:
        yield
    finally:
        remove(extra)


def _read_file(path: PathLike, device: torch.device) -> tuple[Any, Any]:
    """Read a checkpoint file.

    Returns:
        ``(content, safetensors_lr)``: the loaded object, and for a safetensors file the
        raw learning-rate metadata value (``None`` when absent or for other formats).
    """
    text = os.fspath(path)
    where = _describe(path)
    if not os.path.exists(text):
        raise CheckpointNotFoundError(f"{where} does not exist")
    if os.path.isdir(text):
        raise CheckpointLoadError(
            f"{where} is a directory; the default checkpoints_load_func reads single files "
            f"({_extensions_text()}). Pass the files inside it, or a checkpoints_load_func "
            "that reads this directory."
        )
    if text.lower().endswith(".safetensors"):
        return _read_safetensors(text, device, where)
    try:
        if os.path.getsize(text) == 0:
            raise CheckpointLoadError(f"{where} is empty (0 bytes)")
        with _numpy_scalars_allowed():
            content = _torch_load(text, device)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        refused = "Weights only load failed" in message or "WeightsUnpickler" in message
        opcode = re.search(r"Unsupported operand \d+", message)
        if refused and opcode and not re.search(r"GLOBAL\s+[\w.]", message):
            # not a refused object but a byte no pickle has there: text, or damage
            raise CheckpointLoadError(
                f"{where} could not be read: it is not a PyTorch checkpoint, or it is "
                f"truncated or corrupted ({opcode.group(0)} in its pickle data)"
            ) from exc
        if refused:
            raise CheckpointLoadError(
                f"{where} holds pickled Python objects or code"
                f"{_refusal_detail(message)}, and proponents refuses to unpickle arbitrary "
                "objects because unpickling an untrusted file can run code. "
                f"{_HOW_TO_SAVE}"
            ) from exc
        raise CheckpointLoadError(
            f"{where} could not be read: it is not a PyTorch checkpoint ({message})"
        ) from exc
    except CheckpointLoadError:
        raise
    except Exception as exc:  # every read failure becomes a typed error
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointLoadError(
            f"{where} could not be read; it may be truncated, corrupted or not a PyTorch "
            f"checkpoint ({type(exc).__name__}: {reason or 'no details'})"
        ) from exc
    return content, None


def _torch_load(text: str, device: torch.device) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapping files in the zip format.

    Mapped, a tensor is read from the page cache by the copy that puts it into the model
    (or onto ``device``), instead of being read into freshly allocated memory first (five
    to seven times faster for a 92 MB checkpoint here), and entries the model does not
    use, such as optimizer state, are never read at all. A mapped load is kept only when
    every tensor's storage is exactly one record of the archive, which ``torch.load``
    checks for ordinary reads but not for mapped ones; anything else (the legacy format,
    a file system that cannot map, a record that does not fit) is read the ordinary way,
    which reports real damage. When the process asks ``torch.load`` for shared mappings
    (``torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)``), the file is read
    the ordinary way instead: through a shared mapping, a forward pass that edits a weight
    in place (``nn.Embedding(max_norm=...)``) would write into the user's checkpoint file.
    """
    if zipfile.is_zipfile(text) and _mappings_are_private():
        try:
            content = torch.load(text, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except (RuntimeError, OSError, ValueError, zipfile.BadZipFile):
            content = None
        if content is not None and _storages_are_records(content, text):
            return content
        del content
    return torch.load(text, map_location=device, weights_only=True)


def _mappings_are_private() -> bool:
    """Whether ``torch.load(mmap=True)`` would map files copy-on-write (its default)."""
    get_flags = getattr(torch.serialization, "get_default_mmap_options", None)
    private = getattr(mmap, "MAP_PRIVATE", None)
    if get_flags is None or private is None:  # no setting, or Windows: no shared maps
        return True
    return bool(get_flags() == private)


def _storages_are_records(content: Any, text: str) -> bool:
    """Whether the (mapped) storages of the tensors in ``content`` are exactly the data
    records of the zip archive ``text``: same count, same sizes, and the same positions
    relative to one another as in the file."""
    storages: dict[int, int] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_quantized:
                raise ValueError("a tensor without one plain storage")
            storage = obj.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, Mapping):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    try:
        walk(content)
        records = sorted(_data_records(text))
    except (OSError, zipfile.BadZipFile, struct.error, ValueError):
        return False
    mapped = sorted(storages.items())
    if len(mapped) != len(records):
        return False
    if not mapped:
        return True
    base = mapped[0][0] - records[0][0]
    return all(
        ptr - base == offset and nbytes == size
        for (ptr, nbytes), (offset, size) in zip(mapped, records)
    )


def _data_records(text: str) -> list[tuple[int, int]]:
    """``(offset of the data, size)`` of every non-empty ``<archive>/data/<key>`` record."""
    records = []
    with zipfile.ZipFile(text) as archive, open(text, "rb") as handle:
        for info in archive.infolist():
            folder, _, key = info.filename.rpartition("/")
            if not folder.endswith("data") or not key.isdigit() or not info.file_size:
                continue
            handle.seek(info.header_offset)
            header = handle.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise ValueError("bad local header")
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + name_length + extra_length
            records.append((offset, info.file_size))
    return records


def _read_safetensors(text: str, device: torch.device, where: str) -> tuple[Any, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(text, framework="pt") as handle:
            metadata = handle.metadata() or {}
        content = load_file(text, device=str(device))
    except Exception as exc:  # every read failure becomes a typed error
        raise CheckpointLoadError(
            f"{where} could not be read as safetensors; it may be truncated or corrupted "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    lr = next((metadata[key] for key in _LR_KEYS if key in metadata), None)
    return content, lr


def _as_learning_rate(value: Any, where: str, allow_text: bool = False) -> float:
    """Convert a stored learning rate to a finite Python float."""
    number: Any = value
    if isinstance(number, torch.Tensor):
        if number.numel() != 1:
            raise CheckpointLoadError(
                f"{where} stores a learning rate tensor of shape {tuple(number.shape)}; "
                "it must hold exactly one number"
            )
        number = number.item()
    if allow_text and isinstance(number, str):
        try:
            number = float(number.strip())
        except ValueError:
            raise CheckpointLoadError(
                f"{where} stores a learning rate that is not a number: {value!r}"
            ) from None
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise CheckpointLoadError(
            f"{where} stores a learning rate that is not a number: {_short_repr(value)} "
            f"({type(value).__name__}); store a float such as 0.01"
        )
    result = float(number)
    if not math.isfinite(result):
        raise CheckpointLoadError(
            f"{where} stores a learning rate that is not finite: {result}; "
            "influence scores would be meaningless"
        )
    return result


_LOAD_FUNC_RETURNS = (
    "it must return the learning rate as a real number (a float such as 0.01, a "
    "one-element tensor or a NumPy scalar), or None for a learning rate of 1"
)


def _is_bool_like(value: Any) -> bool:
    """A Python, NumPy or torch boolean (scalar, or array of booleans)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    return kind == "b"


def learning_rate_from_load_func(value: Any, label: str, owner: str) -> float:
    """The learning rate a ``checkpoints_load_func`` returned, as a finite Python float.

    ``None`` means 1.0. A real number is taken (a Python or NumPy number, a tensor or
    NumPy array of one element), but not text, booleans or complex numbers (also where
    they sit in a NumPy scalar or array): the default
    loader refuses a learning rate stored as ``"0.1"`` or ``True`` in a checkpoint, and
    the same value returned by a load function of the user's is refused alike instead of
    being read as ``0.1`` or ``1.0``.

    Args:
        value: what the load function returned.
        label: the checkpoint's label (:func:`checkpoint_label`), for messages.
        owner: the class name, for messages.

    Raises:
        CheckpointLoadError: when ``value`` is text, a boolean, complex, not
            convertible to a float, or not finite.
    """
    if value is None:
        return 1.0
    number = value
    if type(value).__module__ == "numpy" and getattr(value, "size", None) == 1:
        # a NumPy scalar or one-element array as the Python object it holds: NumPy 2
        # refuses float() of an array that is not 0-d, float() of a complex scalar drops
        # its imaginary part with a mere warning, and one of text parses the text
        number = value.item()
    if isinstance(number, (str, bytes, bytearray)):
        raise CheckpointLoadError(
            f"{owner}: checkpoints_load_func returned the text {_short_repr(value)} "
            f"({type(value).__name__}) for {label}, not a number; {_LOAD_FUNC_RETURNS}. "
            "Convert it with float() in the load function if it is meant as a number"
        )
    if _is_bool_like(number):
        raise CheckpointLoadError(
            f"{owner}: checkpoints_load_func returned the boolean {_short_repr(value)} "
            f"({type(value).__name__}) for {label}, not a learning rate; "
            f"{_LOAD_FUNC_RETURNS}"
        )
    try:
        result = float(number)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointLoadError(
            f"{owner}: checkpoints_load_func returned {_short_repr(value)} for {label}; "
            f"{_LOAD_FUNC_RETURNS}"
        ) from err
    if not math.isfinite(result):
        raise CheckpointLoadError(f"{owner}: {label} has a non-finite learning rate {result}")
    return result


def _unpack(content: Any, model_keys: set[str], where: str) -> tuple[OrderedDict[str, Any], Any]:
    """Find the state dict inside a loaded checkpoint, and the learning rate beside it.

    Returns:
        ``(state_dict, raw_learning_rate)``; the latter is ``None`` when none is stored.
    """
    if not isinstance(content, Mapping):
        raise CheckpointLoadError(
            f"{where} holds {article(type(content).__name__)}, not a state dict; expected a "
            "mapping "
            "of parameter names to tensors, possibly nested under "
            f"{' / '.join(repr(k) for k in _NESTED_KEYS)}"
        )
    lr: Any = None
    current: Mapping[str, Any] = content
    for _ in range(_MAX_NESTING):
        nested_key = next(
            (k for k in _NESTED_KEYS if isinstance(current.get(k), Mapping)),
            None,
        )
        if nested_key is None:
            break
        if lr is None:
            lr = next((current[k] for k in _LR_KEYS if current.get(k) is not None), None)
        current = current[nested_key]
    state = dict(current)
    # A flat checkpoint may carry its learning rate among the weights, unless the model
    # itself has a state entry of that name.
    for key in _LR_KEYS:
        if key in state and key not in model_keys:
            value = state.pop(key)
            if lr is None:
                lr = value
    metadata = getattr(current, "_metadata", None)
    result: OrderedDict[str, Any] = OrderedDict(state)
    if metadata is not None:
        result._metadata = metadata  # type: ignore[attr-defined]
    return result, lr


def _strip_wrappers(key: str) -> str:
    """Remove leading wrapper prefixes (``module.`` / ``_orig_mod.``) from a key."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
            elif key == prefix[:-1]:
                key = ""
                changed = True
    return key


def _rename_map(given: Iterable[str], wanted: Iterable[str]) -> dict[str, str]:
    """Map given keys onto wanted keys that differ from them only by wrapper prefixes.

    A given key that is already wanted keeps its name. Other keys are renamed only when
    their prefix-free form matches exactly one wanted key that is not supplied otherwise.
    """
    wanted = list(wanted)
    wanted_set = set(wanted)
    by_canon: dict[str, list[str]] = {}
    for key in wanted:
        by_canon.setdefault(_strip_wrappers(key), []).append(key)
    given = list(given)
    taken = {key for key in given if key in wanted_set}
    renames: dict[str, str] = {}
    for key in given:
        if key in wanted_set:
            continue
        targets = by_canon.get(_strip_wrappers(key), [])
        if len(targets) == 1 and targets[0] not in taken:
            renames[key] = targets[0]
            taken.add(targets[0])
    return renames


def _align_keys(
    state: OrderedDict[str, Any], model_state: Mapping[str, Any], model_metadata: Any
) -> OrderedDict[str, Any]:
    """Rename checkpoint keys whose only difference from the model's is a wrapper prefix."""
    renames = _rename_map(state.keys(), model_state.keys())
    if not renames:
        return state
    result: OrderedDict[str, Any] = OrderedDict(
        (renames.get(key, key), value) for key, value in state.items()
    )
    metadata = getattr(state, "_metadata", None)
    if metadata is not None and model_metadata is not None:
        meta_renames = _rename_map(metadata.keys(), model_metadata.keys())
        result._metadata = OrderedDict(  # type: ignore[attr-defined]
            (meta_renames.get(key, key), value) for key, value in metadata.items()
        )
    return result


def _fill_batch_counters(state: OrderedDict[str, Any], model: nn.Module) -> None:
    """Supply a norm layer's ``num_batches_tracked`` that the checkpoint lacks, as zero.

    Checkpoints written before PyTorch 0.4.1, or by code that filters the counter out,
    have none; ``load_state_dict`` accepts them (for state dicts without version
    metadata) by keeping the model's count. A fixed zero instead keeps each checkpoint's
    load independent of the one before. The counter only steers how training-mode
    forward passes update the running statistics, never an output, so no score depends
    on it.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            counter = module.num_batches_tracked
            if key not in state and isinstance(counter, torch.Tensor):
                state[key] = torch.zeros((), dtype=counter.dtype)


def _fill_tied(state: OrderedDict[str, Any], model_state: Mapping[str, Any]) -> None:
    """Supply model entries that share memory with an entry the checkpoint has.

    Formats that store shared tensors once (e.g. ``safetensors.torch.save_model``) drop the
    duplicate names of tied weights; loading the one stored copy fills them all.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, tensor in model_state.items():
        if (
            isinstance(tensor, torch.Tensor)
            and not nn.parameter.is_lazy(tensor)  # no memory yet: shares none
            and tensor.layout == torch.strided
            and tensor.numel() > 0
            and tensor.device.type != "meta"
        ):
            ident = (
                tensor.device,
                tensor.data_ptr(),
                tensor.dtype,
                tuple(tensor.shape),
                tuple(tensor.stride()),
            )
            groups.setdefault(ident, []).append(key)
    for keys in groups.values():
        if len(keys) < 2:
            continue
        present = [key for key in keys if key in state]
        if present:
            for key in keys:
                if key not in state:
                    state[key] = state[present[0]]


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_KEYS_SHOWN])
    if len(keys) > _MAX_KEYS_SHOWN:
        shown += f", ... and {len(keys) - _MAX_KEYS_SHOWN} more"
    return shown


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """Suggest a fix when the checkpoint keys carry an extra leading component."""
    if not unexpected or not missing:
        return ""
    heads = {key.split(".", 1)[0] for key in unexpected if "." in key}
    if len(heads) != 1 or not all("." in key for key in unexpected):
        return ""
    head = heads.pop()
    stripped = {key.split(".", 1)[1] for key in unexpected}
    if stripped & set(missing):
        return (
            f"\n  hint: the checkpoint's keys carry an extra '{head}.' prefix; pass a "
            "checkpoints_load_func that removes it, or save the inner module's state_dict()"
        )
    return ""


def _check_fit(
    state: Mapping[str, Any], model_state: Mapping[str, Any], model: nn.Module, where: str
) -> None:
    """Raise a readable error unless ``state`` has exactly the model's keys and shapes."""
    missing = [key for key in model_state if key not in state]
    unexpected = [key for key in state if key not in model_state]
    mismatched = []
    for key, value in state.items():
        target = model_state.get(key)
        if (
            isinstance(value, torch.Tensor)
            and isinstance(target, torch.Tensor)
            and not nn.parameter.is_lazy(target)
            and value.shape != target.shape
        ):
            mismatched.append(
                f"{key!r}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}"
            )
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{where} does not fit the model ({type(model).__name__}):"]
    if missing:
        lines.append(
            f"  missing keys ({len(missing)}, in the model but not the checkpoint): "
            + _list_keys(missing)
        )
    if unexpected:
        lines.append(
            f"  unexpected keys ({len(unexpected)}, in the checkpoint but not the model): "
            + _list_keys(unexpected)
        )
    if mismatched:
        shown = "; ".join(mismatched[:_MAX_KEYS_SHOWN])
        if len(mismatched) > _MAX_KEYS_SHOWN:
            shown += f"; ... and {len(mismatched) - _MAX_KEYS_SHOWN} more"
        lines.append(f"  shape mismatches ({len(mismatched)}): {shown}")
    hint = _prefix_hint(unexpected, missing)
    raise CheckpointLoadError("\n".join(lines) + hint)


def _place(
    state: Mapping[str, Any], model_state: Mapping[str, Any], device: torch.device
) -> OrderedDict[str, Any]:
    """Move tensors to ``device`` and cast floating tensors to the model's dtype."""
    placed: OrderedDict[str, Any] = OrderedDict()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            target = model_state.get(key)
            dtype = value.dtype
            if isinstance(target, torch.Tensor) and (
                (value.is_floating_point() and target.is_floating_point())
                or (value.is_complex() and target.is_complex())
            ):
                dtype = target.dtype
            value = value.to(device=device, dtype=dtype)
        placed[key] = value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        placed._metadata = metadata  # type: ignore[attr-defined]
    return placed


def load_flexible_state_dict(
    model: nn.Module,
    path: PathLike | Mapping[str, Any],
    device: torch.device | str | None = None,
) -> float:
    """Load a checkpoint into ``model`` and return the learning rate stored with it.

    This is the default ``checkpoints_load_func``. It reads:

    * ``.safetensors`` files (learning rate from the metadata key ``learning_rate`` or
      ``lr``), and any other file with ``torch.load(..., weights_only=True)``, which
      refuses pickled objects or code instead of running them;
    * an already-loaded checkpoint object (a mapping), as yielded by an iterator of
      checkpoints; it is not modified.

    The state dict may be the whole checkpoint or nested under ``model_state_dict``,
    ``state_dict`` or ``model``; a learning rate may sit beside it under ``learning_rate``
    or ``lr`` (a number or one-element tensor; 1.0 when absent). Key prefixes added by
    ``DataParallel``/``DistributedDataParallel`` (``module.``) and ``torch.compile``
    (``_orig_mod.``) are matched to the model's own keys. Tensors are moved to the model's
    device and floating tensors cast to the dtype of the model entry they fill. Tied
    weights stored once are loaded into every name that shares them. The keys and shapes
    are checked before anything is copied, so a checkpoint that does not fit leaves the
    model unchanged.

    Args:
        model: the model to load into (loaded with ``strict=True``).
        path: a checkpoint file path, or an already-loaded checkpoint mapping.
        device: where to place the loaded tensors before copying them into the model;
            defaults to the model's device (its first parameter, else first buffer, else
            CPU).

    Returns:
        The learning rate as a Python float.

    Raises:
        CheckpointNotFoundError: when ``path`` does not exist.
        CheckpointLoadError: when the file cannot be read safely, does not hold a state
            dict, does not fit the model (the message lists missing and unexpected keys
            and shape mismatches), or stores a learning rate that is not a finite number.
        ArgumentTypeError: when ``path`` is neither a path nor a mapping.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target_device = _as_device(device) if device is not None else _model_device(model)
    where = _describe(path)
    safetensors_lr: Any = None
    if _is_path(path):
        content, safetensors_lr = _read_file(path, target_device)  # type: ignore[arg-type]
    elif isinstance(path, Mapping):
        content = path
    else:
        raise ArgumentTypeError(
            "a checkpoint must be a file path or an already-loaded state dict (a mapping), "
            f"got {type(path).__name__}: {_short_repr(path)}"
        )

    model_full = model.state_dict(keep_vars=True)
    model_state: Mapping[str, Any] = model_full
    state, raw_lr = _unpack(content, set(model_state), where)
    state = _align_keys(state, model_state, getattr(model_full, "_metadata", None))
    _fill_tied(state, model_state)
    _fill_batch_counters(state, model)
    _check_fit(state, model_state, model, where)

    if safetensors_lr is not None:
        learning_rate = _as_learning_rate(safetensors_lr, where, allow_text=True)
    elif raw_lr is not None:
        learning_rate = _as_learning_rate(raw_lr, where)
    else:
        learning_rate = 1.0

    placed = _place(state, model_state, target_device)
    try:
        if loads_by_reference():
            if not _is_path(path):  # the caller's own tensors: the model gets copies
                placed = _unshared_with(placed, state)
            _load_by_reference(model, placed)
        else:
            model.load_state_dict(placed, strict=True)
    except Exception as exc:  # report every load failure with the file name
        raise CheckpointLoadError(f"{where} could not be loaded into the model: {exc}") from exc
    return learning_rate


def _unshared_with(
    state: OrderedDict[str, Any], theirs: Mapping[str, Any]
) -> OrderedDict[str, Any]:
    """``state`` with a copy of every tensor that still shares memory with a tensor of
    ``theirs`` (those that moving or casting did not copy already)."""
    pointers = {
        v.untyped_storage().data_ptr()
        for v in theirs.values()
        if isinstance(v, torch.Tensor) and v.layout == torch.strided
    }

    def shared(v: Any) -> bool:
        return (
            isinstance(v, torch.Tensor)
            and v.layout == torch.strided
            and v.untyped_storage().data_ptr() in pointers
        )

    out: OrderedDict[str, Any] = OrderedDict(
        (k, v.clone() if shared(v) else v) for k, v in state.items()
    )
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _load_by_reference(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Load ``state`` (strict) so that every parameter and buffer keeps its identity but
    holds the loaded tensor itself (a memory-mapped read, say) instead of a copy of it.

    ``load_state_dict(assign=True)`` runs every module's own loading code and puts the
    loaded tensors in new objects without writing into the old ones; each old object
    then takes the new one's data (in its own dtype, device and strides, see
    :func:`_in_layout_of`) and goes back in its place, so ties, aliases and references
    to the model's tensors stay intact.
    """
    slots: list[tuple[dict[str, Any], str, torch.Tensor]] = [
        (table, name, tensor)
        for module in model.modules()
        for table in (module._parameters, module._buffers)
        for name, tensor in list(table.items())
        if tensor is not None
    ]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    finally:
        with torch.no_grad():
            for table, name, old in slots:
                new = table.get(name)
                if new is not old:
                    if new is not None:
                        old.data = _in_layout_of(old, new.detach())
                    table[name] = old


def _in_layout_of(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` as the data of ``old``: itself when dtype, device and strides match, else a
    fresh tensor with ``old``'s dtype, device and strides holding its values (never
    ``old``'s own memory, which may be the user's)."""
    if new.dtype == old.dtype and new.device == old.device and new.stride() == old.stride():
        return new
    fresh = torch.empty_strided(old.shape, old.stride(), dtype=old.dtype, device=old.device)
    return fresh.copy_(new)
