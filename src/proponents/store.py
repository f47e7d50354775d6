"""On-disk arrays that are never served when they no longer match what produced them.

A :class:`ArrayStore` is a directory of *entries*. An entry is a set of named ``.npy``
arrays plus one small JSON manifest, ``<key>.json``, that says

* which arrays belong to the entry, their dtype, shape and file name;
* the ``meta`` the entry was built for (for layer activations: a fingerprint of the
  model weights, the layer name, the dataset length and a probe of its content);
* the store format version, and a checksum of the manifest itself.

Guarantees:

* **Atomic.** Array files are written under a temporary name, renamed to a name that
  carries a fresh random token, and only then is the manifest replaced with
  :func:`os.replace`. A reader sees the old entry or the new one, never half of one. A
  write that fails or is interrupted (an exception, ``KeyboardInterrupt``) removes its
  own files before the exception leaves it; a killed process leaves at most
  unreferenced files and write probes, which the next builder removes. Array files
  are never modified once they are referenced, so a reader that has opened one keeps a
  consistent view even while another process replaces the entry.
* **Validated.** :meth:`ArrayStore.load` returns an entry only when the manifest parses,
  its checksum matches, the format version and every ``meta`` field equal what the
  caller expects, and every array file exists with the header and the exact byte size
  the manifest announces (which catches truncated and zero-length files). Otherwise
  it says why, so the caller can rebuild with a warning.
* **Safe with concurrent builders.** :meth:`ArrayStore.lock` takes an exclusive
  advisory lock (``fcntl.flock``) on ``<directory>/.lock``, so two processes building
  the same entry take turns and the second can reuse what the first wrote. Where file
  locks are unavailable the lock is a no-op, and the atomic writes above still keep
  every reader safe.

Arrays are read through :class:`numpy.memmap`, one block at a time, so an entry need
not fit in memory. Nothing is ever unpickled. The store does not ``fsync``: after a
power failure an array file may come back short, which the size check detects.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import math
import mmap
import os
import re
import secrets
import stat
import tempfile
import weakref
import zlib
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import numpy as np
import torch

from proponents.errors import StoreError

try:  # POSIX advisory locks; absent on Windows.
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    _fcntl = None  # type: ignore[assignment]

#: Arrays up to this size stay mapped while their entry is open (StoredEntry.memmap).
KEEP_MAPPED_BYTES = 64 * 2**20
#: The largest manifest (or other small description file) read; no writer makes one this big.
MAX_MANIFEST_BYTES = 64 * 2**20
FORMAT_NAME = "proponents.array-store"
FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".json"
_SEP = "~"  # never produced by safe_name, so it splits file names unambiguously
_TMP = ".tmp" + _SEP
_LOCK_NAME = ".lock"
# The write probes of ensure_writable: ".tmp~probe" and a random suffix (16 hex digits;
# 8 characters from tempfile.mkstemp in earlier versions).
_PROBE = re.compile(r"\.tmp~probe[a-z0-9_]{8,16}")
_PLAIN = re.compile(r"[a-z0-9_][a-z0-9_.\-]{0,99}")
_ALLOWED = re.compile(r"[A-Za-z0-9_.\-]")


class StoreRebuildWarning(UserWarning):
    """A stored entry was stale, mismatched or damaged and is being rebuilt."""


# ----------------------------------------------------------------------------- names


def safe_name(name: str) -> str:
    """A file-name component that stands for ``name`` and cannot leave its directory.

    Plain lower-case names (``conv2``, ``features.0``) are kept as they are. Any other
    name is percent-escaped (``/`` becomes ``%2F``, so ``../x`` cannot climb out of the
    store) and gets a short hash suffix, so names that differ only in case stay apart
    on case-insensitive file systems and long names stay short.

    Args:
        name: any string, e.g. a model id or a layer name.

    Returns:
        A non-empty string of ``[A-Za-z0-9_.%-]`` that never starts with ``.``.
    """
    if not isinstance(name, str):
        raise TypeError(f"safe_name expects a str, got {type(name).__name__}")
    if _PLAIN.fullmatch(name):
        return name
    escaped = "".join(
        ch if _ALLOWED.fullmatch(ch) else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in name
    )
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]
    return f"{escaped[:80]}-{digest}"


# ------------------------------------------------------------------------ npy helpers


def _header_text(dtype: np.dtype, shape: tuple[int, ...]) -> str:
    descr = np.lib.format.dtype_to_descr(dtype)
    return f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"


def _header_reserve(dtype: np.dtype, row_shape: tuple[int, ...]) -> int:
    """Bytes to reserve for a version-1.0 header whatever the final row count."""
    widest = _header_text(dtype, (10**19, *row_shape))
    return 64 * math.ceil((10 + len(widest) + 1) / 64)


def _header_bytes(dtype: np.dtype, shape: tuple[int, ...], total: int) -> bytes:
    text = _header_text(dtype, shape)
    body_len = total - 10
    if len(text) + 1 > body_len or body_len > 0xFFFF:
        raise StoreError(f"array header for shape {shape} does not fit in {total} bytes")
    body = text + " " * (body_len - len(text) - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


def _read_header(fh: BinaryIO) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse an ``.npy`` header: ``(dtype, shape, data_offset)``."""
    fh.seek(0)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if fortran:
        raise ValueError("Fortran-ordered arrays are not used by the store")
    return dtype, tuple(int(s) for s in shape), fh.tell()


# ---------------------------------------------------------------------------- entries


class StoredEntry:
    """A validated entry; its array files stay open until :meth:`close`.

    Keeping the files open means a concurrent rebuild (which only ever writes new
    files and unlinks old ones) cannot pull the data away mid-read.

    Attributes:
        key: the entry's name inside the store.
        meta: the ``meta`` mapping it was built for.
        manifest: the full parsed manifest.
    """

    def __init__(
        self,
        key: str,
        manifest: dict[str, Any],
        files: dict[str, BinaryIO],
        layouts: dict[str, tuple[np.dtype, tuple[int, ...], int]],
        signature: tuple = (),
    ) -> None:
        self.key = key
        self.manifest = manifest
        self.meta: dict[str, Any] = manifest["meta"]
        self._files = files
        self._layout = layouts
        self._signature = signature
        self._maps: dict[str, np.ndarray] = {}

    @property
    def arrays(self) -> list[str]:
        """Names of the arrays in this entry."""
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of array ``name``."""
        return self._layout[name][1]

    def dtype(self, name: str) -> np.dtype:
        """Dtype of array ``name``."""
        return self._layout[name][0]

    def memmap(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of array ``name`` as a copy-on-write memory map.

        Writing to the result never touches the file. An array of up to
        :data:`KEEP_MAPPED_BYTES` is mapped once and stays mapped while the entry is
        open (its rows are views of that map); a larger one is mapped per call and
        unmapped when the result is dropped, so reading it block by block keeps the
        resident memory bounded.
        """
        dtype, shape, offset = self._layout[name]
        n = shape[0]
        stop = n if stop is None else min(stop, n)
        start = max(0, min(start, stop))
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        if stop == start or row == 0:
            return np.zeros((stop - start, *shape[1:]), dtype=dtype)
        if n * row <= KEEP_MAPPED_BYTES:
            whole = self._maps.get(name)
            if whole is None:
                whole = self._maps[name] = self._map_rows(name, 0, n)
            return whole[start:stop]
        return self._map_rows(name, start, stop)

    def _map_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        dtype, shape, offset = self._layout[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        array = np.memmap(
            self._files[name],
            dtype=dtype,
            mode="c",
            offset=offset + start * row,
            shape=(stop - start, *shape[1:]),
        )
        advise = getattr(getattr(array, "_mmap", None), "madvise", None)
        if advise is not None and hasattr(mmap, "MADV_WILLNEED"):
            with contextlib.suppress(OSError, ValueError):
                advise(mmap.MADV_WILLNEED)  # read ahead: the caller is about to scan it
        return array

    def read(self, name: str) -> np.ndarray:
        """The whole array ``name`` as an in-memory numpy array."""
        return np.array(self.memmap(name))

    def opened_from(self, manifest_path: Path) -> bool:
        """Whether this entry was opened from the manifest at ``manifest_path``."""
        return bool(self._signature) and self._signature[0][0] == manifest_path

    def unchanged(self) -> bool:
        """Whether the manifest and array files on disk are still the ones opened here.

        The manifest must hold the very bytes that were validated; each array path must
        still name the opened file with its size and modification time, so a replaced,
        rewritten or truncated file is noticed.
        """
        if not self._files or not self._signature:
            return False
        (manifest_path, text), *arrays = self._signature
        try:
            if manifest_path.read_bytes() != text:
                return False
            return all(file_signature(os.stat(path)) == seen for path, seen in arrays)
        except OSError:
            return False

    def close(self) -> None:
        """Close the array files."""
        self._maps = {}
        for fh in self._files.values():
            fh.close()
        self._files = {}

    def __enter__(self) -> StoredEntry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EntryWriter:
    """Writes one entry; nothing becomes visible before :meth:`commit`.

    Arrays are either streamed row block by row block with :meth:`append` (the first
    block fixes dtype and row shape) or written whole with :meth:`put`. Use it as a
    context manager: leaving the block without committing (e.g. on an exception)
    deletes every temporary file.
    """

    def __init__(self, store: ArrayStore, key: str, meta: Mapping[str, Any]) -> None:
        self._store = store
        self.key = key
        self.meta = _jsonable(meta, "meta")
        self.token = secrets.token_hex(8)
        # name -> (file, path, dtype, row shape, header bytes reserved, rows, CRC-32 of
        # the data bytes so far)
        self._open: dict[str, tuple[BinaryIO, Path, np.dtype, tuple[int, ...], int, int, int]] = {}
        self._done: dict[str, tuple[Path, np.dtype, tuple[int, ...], int]] = {}
        # Every temporary file this writer may have made. A path goes in before its file
        # is created and stays until commit() has renamed the file or it is deleted, so
        # abort() finds it whichever step failed or was interrupted.
        self._temporary: set[Path] = set()
        self._closed = False

    def _tmp_path(self, name: str) -> Path:
        return self._store.directory / f"{_TMP}{self.key}{_SEP}{self.token}{_SEP}{name}.npy"

    def append(self, name: str, rows: np.ndarray) -> None:
        """Append rows (``(b, *row_shape)``) to the streamed array ``name``."""
        self._check_open()
        if name in self._done:
            raise StoreError(f"array {name!r} of entry {self.key!r} was already written")
        rows = np.ascontiguousarray(rows)
        if rows.ndim == 0:
            raise StoreError(f"array {name!r}: append needs rows with a leading dimension")
        state = self._open.get(name)
        if state is None:
            dtype = rows.dtype
            row_shape = tuple(rows.shape[1:])
            reserve = _header_reserve(dtype, row_shape)
            path = self._tmp_path(name)
            self._temporary.add(path)
            fh = self._store._create(path)
            state = self._open[name] = (fh, path, dtype, row_shape, reserve, 0, 0)
            fh.write(b"\0" * reserve)
        fh, path, dtype, row_shape, reserve, count, crc = state
        if rows.dtype != dtype or tuple(rows.shape[1:]) != row_shape:
            raise StoreError(
                f"array {name!r} of entry {self.key!r}: rows of dtype {rows.dtype} and shape "
                f"{tuple(rows.shape[1:])} cannot follow rows of dtype {dtype} and shape {row_shape}"
            )
        data = rows.data.cast("B")
        try:
            fh.write(data)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        crc = zlib.crc32(data, crc)
        self._open[name] = (fh, path, dtype, row_shape, reserve, count + rows.shape[0], crc)

    def put(self, name: str, array: np.ndarray) -> None:
        """Write the whole array ``name`` at once."""
        array = np.ascontiguousarray(array)
        if array.ndim == 0:
            array = array.reshape(1)
        self.append(name, array)
        self._finish(name)

    def _finish(self, name: str) -> None:
        fh, path, dtype, row_shape, reserve, count, crc = self._open[name]
        shape = (count, *row_shape)
        try:
            fh.seek(0)
            fh.write(_header_bytes(dtype, shape, reserve))
            fh.close()
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc
        finally:
            # Closed whatever happened (closing twice is harmless). After a failure the
            # file is in neither _open nor _done, but still in _temporary for abort().
            with contextlib.suppress(OSError):
                fh.close()
            del self._open[name]
        self._done[name] = (path, dtype, shape, crc)

    def discard(self, name: str) -> None:
        """Drop array ``name`` (its temporary file is deleted); the entry commits without it."""
        self._check_open()
        if name in self._open:
            fh, path, *_ = self._open.pop(name)
            with contextlib.suppress(OSError):  # flushing may fail: the file goes anyway
                fh.close()
            _unlink(path)
            self._temporary.discard(path)
        elif name in self._done:
            path, *_ = self._done.pop(name)
            _unlink(path)
            self._temporary.discard(path)

    def rows(self, name: str) -> int:
        """Rows written so far to array ``name``."""
        if name in self._open:
            return self._open[name][5]
        if name in self._done:
            return self._done[name][2][0]
        return 0

    def commit(self) -> None:
        """Make the entry visible: rename the arrays, then replace the manifest."""
        self._check_open()
        if not self._open and not self._done:
            raise StoreError(f"entry {self.key!r} has no arrays to commit")
        directory = self._store.directory
        names = [*self._done, *self._open]
        finals = {name: f"{self.key}{_SEP}{self.token}{_SEP}{name}.npy" for name in names}
        try:
            for name in list(self._open):
                self._finish(name)
            arrays: dict[str, Any] = {}
            for name, (tmp, dtype, shape, crc) in self._done.items():
                try:
                    os.replace(tmp, directory / finals[name])
                except OSError as exc:
                    raise StoreError(f"cannot rename {tmp}: {exc.strerror or exc}") from exc
                arrays[name] = {
                    "file": finals[name],
                    "dtype": np.lib.format.dtype_to_descr(dtype),
                    "shape": list(shape),
                    "crc32": crc,
                }
            manifest = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "key": self.key,
                "token": self.token,
                "meta": self.meta,
                "arrays": arrays,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            manifest["checksum"] = _checksum(manifest)
            previous = self._store._manifest_token(self.key)
            self._store._write_manifest(self.key, manifest)
            self._store._cleanup(self.key, keep=self.token, displaced=previous)
        except BaseException:
            # Failed or interrupted. If our manifest made it into place, the entry is
            # committed and only the files of the entry it displaced are left to remove.
            # Otherwise no entry refers to the arrays renamed so far: they go with the
            # temporary files.
            if self._store._manifest_token(self.key) == self.token:
                self._store._cleanup(self.key, keep=self.token, displaced=previous)
            else:
                for final in finals.values():
                    _unlink(directory / final)
                self.abort()
            self._closed = True
            raise
        self._done, self._temporary = {}, set()
        self._closed = True

    def abort(self) -> None:
        """Delete every temporary file of this writer."""
        for fh, *_ in self._open.values():
            with contextlib.suppress(OSError):  # flushing may fail again, e.g. on a full disk
                fh.close()
        for path in self._temporary:
            _unlink(path)
        self._open, self._done, self._temporary = {}, {}, set()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of entry {self.key!r} is already closed")

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if not self._closed:
            self.abort()


class ArrayStore:
    """A directory of validated, atomically written array entries.

    Args:
        directory: where the entries live; created on first write.

    Example:
        >>> store = ArrayStore("/tmp/acts/src")                          # doctest: +SKIP
        >>> with store.lock(), store.writer("conv2", {"model": fp}) as w:  # doctest: +SKIP
        ...     w.append("activations", block)
        ...     w.commit()
        >>> entry, why = store.load("conv2", {"model": fp})               # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._locked = False

    # -- writing ------------------------------------------------------------------
    def ensure_writable(self) -> None:
        """Create the directory and check a file can be written there.

        Raises:
            StoreError: naming the directory and the reason.
        """
        # The probe is named before it is created, so the finally clause removes it
        # whatever interrupts us (mkstemp would hand its name back only after creating it).
        # os.unlink is called inline, on a str: entering Python code first (_unlink, or a
        # Path's __fspath__) would give a pending KeyboardInterrupt a chance to skip it.
        probe = os.path.join(self.directory, f"{_TMP}probe{secrets.token_hex(8)}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            finally:
                try:
                    os.unlink(probe)
                except OSError:
                    pass  # never created, or already removed by another builder's sweep
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise StoreError(
                f"cannot write to the directory {str(self.directory)!r} ({reason}); pass a "
                "directory you can create and write files in"
            ) from exc
        self._remove_stale_probes()

    def _remove_stale_probes(self) -> None:
        """Delete probe files left by a process killed in the middle of ensure_writable.

        Only names of our probes (``.tmp~probe`` and a random suffix) are touched. A
        probe of another process running now may go too; that does it no harm, as its
        own removal tolerates a missing file.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for fname in names:
            if _PROBE.fullmatch(fname):
                _unlink(self.directory / fname)

    def writer(self, key: str, meta: Mapping[str, Any]) -> EntryWriter:
        """A writer for entry ``key`` built for ``meta`` (a JSON-compatible mapping)."""
        _check_key(key)
        self.ensure_writable()
        return EntryWriter(self, key, meta)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive advisory lock of the directory, for the duration of a build."""
        self.ensure_writable()
        if _fcntl is None:  # pragma: no cover - Windows
            yield
            return
        path = self.directory / _LOCK_NAME
        try:
            # Never through a link: one planted as .lock would make us create its target.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise StoreError(
                f"cannot open the lock file {str(path)!r}: {reason}; remove it, the store "
                "makes its own"
            ) from exc
        try:
            try:
                _fcntl.flock(fd, _fcntl.LOCK_EX)
                self._locked = True
            except OSError:  # e.g. a file system without locks: fall back to no lock
                pass
            yield
        finally:
            self._locked = False
            with contextlib.suppress(OSError):
                _fcntl.flock(fd, _fcntl.LOCK_UN)
            os.close(fd)

    def remove(self, key: str) -> None:
        """Delete entry ``key`` (manifest first, then its arrays)."""
        _check_key(key)
        _unlink(self._manifest_path(key))
        self._cleanup(key, keep=None, displaced=None)

    # -- reading ------------------------------------------------------------------
    def load(
        self,
        key: str,
        meta: Mapping[str, Any],
        *,
        ignore: Collection[str] = (),
        reuse: StoredEntry | None = None,
        required: Collection[str] = (),
        verify_data: bool = True,
    ) -> tuple[StoredEntry | None, str | None]:
        """Open entry ``key`` if it is intact and was built for ``meta``.

        Args:
            key: the entry name.
            meta: what the entry must have been built for; every field is compared.
            ignore: ``meta`` fields not to compare.
            required: arrays the entry must hold (one without them is damaged).
            verify_data: compare each array's data with the CRC-32 its manifest records
                (one read of every file). ``False`` only for an entry this process has
                just committed under :meth:`lock`, whose bytes it wrote itself; headers,
                shapes and sizes are checked either way.
            reuse: an entry opened earlier by this method. It is returned as it is
                (no manifest parsing, no file opening) when it is still open, is this
                key's entry of this store, matches ``meta``, and its files on disk are
                unchanged (:meth:`StoredEntry.unchanged`).

        Returns:
            ``(entry, None)`` when valid (close the entry after use); ``(None, None)``
            when there is no such entry; ``(None, reason)`` when one exists but is
            stale, mismatched or damaged (``reason`` says which).
        """
        _check_key(key)
        expected = _jsonable(meta, "meta")
        if (
            reuse is not None
            and reuse.opened_from(self._manifest_path(key))
            and _compare_meta(reuse.meta, expected, ignore) is None
            and reuse.unchanged()
        ):
            return reuse, None
        reason: str | None = None
        for _attempt in range(3):  # the entry may be replaced while we open it
            manifest, reason, text = self._read_manifest_file(key)
            if manifest is None:
                return None, reason
            reason = _compare_meta(manifest["meta"], expected, ignore)
            if reason is not None:
                return None, reason
            lacking = sorted(set(required) - set(manifest["arrays"]))
            if lacking:
                return None, f"it lacks the array(s) {lacking} (damaged)"
            opened, reason, missing = self._open_arrays(manifest, verify_data)
            if opened is not None:
                files, layouts = opened
                signature = ((self._manifest_path(key), text),) + tuple(
                    (
                        self.directory / manifest["arrays"][name]["file"],
                        file_signature(os.fstat(fh.fileno())),
                    )
                    for name, fh in files.items()
                )
                return StoredEntry(key, manifest, files, layouts, signature), None
            if not missing:
                return None, reason
        return None, reason

    def _manifest_path(self, key: str) -> Path:
        return self.directory / f"{key}{MANIFEST_SUFFIX}"

    def _read_manifest(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        manifest, reason, _ = self._read_manifest_file(key)
        return manifest, reason

    def _read_manifest_file(self, key: str) -> tuple[dict[str, Any] | None, str | None, bytes]:
        """``(manifest, reason, text)``: the parsed manifest or why not, and its bytes."""
        path = self._manifest_path(key)
        try:
            text = read_small_file(path)
        except FileNotFoundError:
            return None, None, b""
        except OSError as exc:
            return None, f"its manifest {path.name} cannot be read ({exc.strerror})", b""
        manifest, reason = _parse_manifest(key, path, text)
        return manifest, reason, text

    def _open_arrays(
        self, manifest: dict[str, Any], verify_data: bool = True
    ) -> tuple[tuple[dict[str, BinaryIO], dict[str, Any]] | None, str | None, bool]:
        """Open and check the entry's array files: ``(opened, reason, missing)``."""
        files: dict[str, BinaryIO] = {}
        layouts: dict[str, Any] = {}
        try:
            for name, info in manifest["arrays"].items():
                fname = info.get("file") if isinstance(info, dict) else None
                if (
                    not isinstance(fname, str)
                    or "/" in fname
                    or "\\" in fname
                    or "\0" in fname
                    or fname[:1] in "."
                ):
                    return None, f"array {name!r} has an invalid file name (damaged)", False
                path = self.directory / fname
                try:
                    fh = open_regular(path)
                except FileNotFoundError:
                    return None, f"its array file {fname} is missing", True
                except OSError as exc:
                    return None, f"its array file {fname} cannot be read ({exc.strerror})", False
                files[name] = fh
                layout, problem = _check_array_file(fh, info, verify_data)
                if layout is None:
                    return None, f"its array file {fname} {problem} (damaged)", False
                layouts[name] = layout
            result, files = files, {}
            return (result, layouts), None, False
        except OSError as exc:
            return None, f"its array files cannot be read ({exc.strerror})", False
        finally:
            for left_open in files.values():
                left_open.close()

    # -- housekeeping -------------------------------------------------------------
    def _create(self, path: Path) -> BinaryIO:
        try:
            return open(path, "xb")  # noqa: SIM115 - closed by EntryWriter
        except OSError as exc:
            raise StoreError(
                f"cannot create {str(path)!r} ({exc.strerror}); check that the directory "
                "is writable"
            ) from exc

    def _manifest_token(self, key: str) -> str | None:
        manifest, _ = self._read_manifest(key)
        return None if manifest is None else manifest.get("token")

    def _write_manifest(self, key: str, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        tmp = self.directory / f"{_TMP}{key}{_SEP}{manifest['token']}.json"
        try:
            with open(tmp, "wb") as fh:
                fh.write(text)
            os.replace(tmp, self._manifest_path(key))
        except OSError as exc:
            _unlink(tmp)
            raise StoreError(
                f"cannot write the manifest of {key!r} in {str(self.directory)!r}: "
                f"{exc.strerror or exc}"
            ) from exc
        except BaseException:  # e.g. KeyboardInterrupt: the temporary manifest goes too
            _unlink(tmp)
            raise

    def _cleanup(self, key: str, keep: str | None, displaced: str | None) -> None:
        """Remove array files of ``key`` no manifest refers to.

        While this store holds :meth:`lock` (and locks work here), no other builder is
        mid-write, so every unreferenced file (including leftovers of crashed builds)
        can go. Otherwise only the files of the entry just displaced are removed.

        Only names a writer of ``key`` makes are considered (``<key>~<token>~<array>.npy``,
        and ``.tmp~`` before it or ``.tmp~<key>~<token>.json``), so a file of the user's
        that merely starts with the key stays.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        ours = re.compile(
            rf"{re.escape(key)}{_SEP}([0-9a-f]{{8,32}})(?:{_SEP}[^{_SEP}]+\.npy|(\.json))"
        )
        for fname in names:
            temporary = fname.startswith(_TMP)
            match = ours.fullmatch(fname[len(_TMP) :] if temporary else fname)
            if match is None or (match.group(2) and not temporary):
                continue
            token = match.group(1)
            if token == keep:
                continue
            if not self._locked and token != displaced:
                continue
            _unlink(self.directory / fname)


# ---------------------------------------------------------------------------- helpers


_KEY = re.compile(r"[A-Za-z0-9_%\-][A-Za-z0-9_.%\-]{0,199}")


# how every manifest's text begins (its keys are sorted and "arrays" comes first)
_MANIFEST_START = '{\n "arrays": {'


def _refuse_foreign(key: str, path: Path, holds: str) -> NoReturn:
    """Refuse to rebuild entry ``key`` over ``path``, a file this store did not write."""
    raise StoreError(
        f"{str(path)!r} holds {holds}, and rebuilding the entry {key!r} would overwrite "
        "it; move the file away, or give another directory (activation_dir, model_id) "
        "for the stored arrays"
    )


def _parse_manifest(key: str, path: Path, text: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of entry ``key`` parsed from ``text`` and checked, or why it is unusable."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"its manifest {path.name} is not valid JSON (damaged)"
    try:
        manifest = json.loads(decoded)
    except json.JSONDecodeError:
        start = decoded[: len(_MANIFEST_START)]
        if FORMAT_NAME in decoded or _MANIFEST_START.startswith(start) or "\0" in decoded:
            # a cut-off manifest of ours (they all begin alike), or bytes no text file holds
            return None, f"its manifest {path.name} is not valid JSON (damaged)"
        _refuse_foreign(key, path, "text that is not a manifest of this store")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        # every manifest this store writes is a JSON object with its format name: anything
        # else is someone's file where an entry's manifest would go, not a damaged one
        _refuse_foreign(key, path, "JSON that is not a manifest of this store")
    if manifest.get("checksum") != _checksum(manifest):
        return None, f"its manifest {path.name} fails its checksum (damaged)"
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        return None, (
            f"it was written in store format version {version}, this library "
            f"reads version {FORMAT_VERSION}"
        )
    if (
        manifest.get("key") != key
        or not isinstance(manifest.get("meta"), dict)
        or not isinstance(manifest.get("arrays"), dict)
        or not manifest["arrays"]
    ):
        return None, f"its manifest {path.name} is incomplete (damaged)"
    return manifest, None


def file_signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies one version of a file: device, inode, size, modification time and
    status-change time. The last cannot be set back (``os.utime`` sets the modification
    time and moves the status-change time to now), so a same-size rewrite whose
    modification time was restored is still seen; a chmod or a new hard link only makes
    the caller look again."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise StoreError(f"invalid store key {key!r}: pass a name made by safe_name()")


def _jsonable(meta: Mapping[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(meta), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} must be JSON-serialisable: {exc}") from exc


def _checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _describe(value: Any, other: Any = None) -> str:
    """A short text for a meta value in a message; for a string that differs from the
    string ``other`` only after a long common start (two probes of one kind), the part
    from just before the first difference, so that the two texts shown differ."""
    text = repr(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    if isinstance(value, str) and isinstance(other, str) and len(text) > 60:
        start = next(
            (i for i, (a, b) in enumerate(zip(value, other)) if a != b), min(len(value), len(other))
        )
        if start > 40:
            text = "…" + repr(value[start - 8 :])[1:]
    return text if len(text) <= 60 else text[:57] + "..."


def _compare_meta(
    stored: dict[str, Any], expected: dict[str, Any], ignore: Collection[str]
) -> str | None:
    diffs = []
    for field in sorted(set(stored) | set(expected)):
        if field in ignore:
            continue
        if stored.get(field) != expected.get(field):
            diffs.append(
                f"{field} was {_describe(stored.get(field), expected.get(field))}, now "
                f"{_describe(expected.get(field), stored.get(field))}"
            )
    if diffs:
        return "it was built for something else: " + "; ".join(diffs)
    return None


def _check_array_file(
    fh: BinaryIO, info: Mapping[str, Any], verify_data: bool = True
) -> tuple[tuple[np.dtype, tuple[int, ...], int] | None, str | None]:
    """``((dtype, shape, data_offset), None)`` for a sound file, else ``(None, problem)``."""
    try:
        dtype, shape, offset = _read_header(fh)
    except (ValueError, SyntaxError, EOFError, OSError, TypeError, KeyError):
        return None, "has no valid .npy header"
    try:
        want_dtype = np.lib.format.descr_to_dtype(info["dtype"])
        want_shape = tuple(int(s) for s in info["shape"])
    except (KeyError, TypeError, ValueError):
        return None, "is described inconsistently in the manifest"
    if dtype != want_dtype or shape != want_shape:
        return None, f"holds {dtype} {shape}, the manifest says {want_dtype} {want_shape}"
    if dtype.hasobject:  # its bytes would be read as object pointers: never map such a file
        return None, f"holds Python objects ({dtype}), which the store never reads"
    if any(s < 0 for s in shape):
        return None, f"claims the negative shape {shape}"
    # Python integers: an int64 product could wrap round to the size of a small file
    expected = offset + math.prod(shape) * dtype.itemsize
    size = os.fstat(fh.fileno()).st_size
    if size != expected:
        return None, f"has {size} bytes instead of {expected} (truncated or overwritten)"
    if not shape:
        return None, "holds a 0-d array, the store writes arrays with rows"
    if verify_data and "crc32" in info:  # entries written before CRCs were recorded lack it
        try:
            crc = _data_crc32(fh, offset)
        except OSError as exc:
            return None, f"cannot be read ({exc.strerror or exc})"
        if crc != info["crc32"]:
            return None, "holds other bytes than were written (its checksum differs)"
    return (dtype, shape, offset), None


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``open(path, "rb")`` for a regular file (or a link to one), refusing anything else.

    Opened without blocking and checked before a byte is read, so a FIFO named like a
    store file cannot stall the reader, nor a link to a device (``/dev/zero``) feed it
    without end.

    Raises:
        FileNotFoundError: when there is no such file.
        OSError: with the reason as ``strerror``, for anything but a regular file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "it is not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_small_file(path: str | os.PathLike[str], limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), at most ``limit``.

    Raises:
        FileNotFoundError: when there is no such file.
        OSError: for anything but a regular file, or one of more than ``limit`` bytes.
    """
    with open_regular(path) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"it has more than {limit} bytes")
    return data


def file_crc32(path: str | os.PathLike[str]) -> int:
    """CRC-32 of a whole file's bytes (read in chunks, never whole into memory)."""
    with open(path, "rb") as fh:
        return _data_crc32(fh, 0)


def _data_crc32(fh: BinaryIO, offset: int, chunk: int = 16 * 2**20) -> int:
    """CRC-32 of the file's bytes from ``offset`` to its end, read in chunks."""
    fh.seek(offset)
    crc = 0
    while block := fh.read(chunk):
        crc = zlib.crc32(block, crc)
    return crc


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


__all__ = [
    "FORMAT_VERSION",
    "ArrayStore",
    "EntryWriter",
    "StoreRebuildWarning",
    "StoredEntry",
    "open_regular",
    "read_small_file",
    "safe_name",
]


# ------------------------------------------------------------ scratch matrices on disk

#: Mapped matrices whose pages :func:`release_rows` may drop, by the address of their data.
_MAPPED: dict[int, tuple[Any, int, int]] = {}


class DiskMatrix:
    """A 2-D ``.npy`` file in a scratch directory, filled block by block, then mapped.

    The file is created at its full size up front. :meth:`write` places a block of rows
    and columns through a short-lived memory map of just those rows, so filling the file
    never keeps more than one block resident. :meth:`open` maps the whole file read-only
    and unlinks it (POSIX keeps a mapped file alive until it is unmapped), so nothing is
    left behind when the mapping is dropped.

    Args:
        shape: ``(rows, columns)``.
        dtype: element type.
        directory: where to put the file; default :func:`tempfile.gettempdir`.
    """

    def __init__(
        self, shape: tuple[int, int], dtype: Any, directory: str | os.PathLike[str] | None = None
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = (int(shape[0]), int(shape[1]))
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        self.offset = _header_reserve(self.dtype, (self.shape[1],))
        fd, name = tempfile.mkstemp(prefix="proponents-", suffix=".npy", dir=directory)
        self.path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_header_bytes(self.dtype, self.shape, self.offset))
                fh.truncate(self.offset + self.shape[0] * self._row_bytes)
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            raise StoreError(f"cannot create {self.path}: {exc.strerror or exc}") from exc

    def write(self, row: int, column: int, block: np.ndarray) -> None:
        """Store ``block`` at rows ``row:row + b`` and columns ``column:column + d``."""
        b = int(block.shape[0])
        if b == 0:
            return
        window = np.memmap(
            self.path,
            dtype=self.dtype,
            mode="r+",
            offset=self.offset + row * self._row_bytes,
            shape=(b, self.shape[1]),
        )
        window[:, column : column + block.shape[1]] = block
        window.flush()
        del window  # unmapped: the written pages leave this process's resident set

    def open(self) -> np.memmap:
        """The whole matrix, mapped read-only; the file itself is unlinked."""
        array = np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape
        )
        with contextlib.suppress(OSError):  # Windows: cannot unlink a mapped file
            self.path.unlink()
        register_mapped(array)
        return array

    def discard(self) -> None:
        """Remove the file (after a failure, before :meth:`open`)."""
        with contextlib.suppress(OSError):
            self.path.unlink()


def register_mapped(array: np.memmap) -> None:
    """Let :func:`release_rows` drop the resident pages of the 2-D memory map ``array``."""
    mm = getattr(array, "_mmap", None)
    if mm is None or array.ndim != 2 or array.size == 0:
        return
    # numpy maps from ``offset`` rounded down to the allocation granularity.
    start = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    key = int(array.ctypes.data)
    _MAPPED[key] = (mm, array.offset - start, array.shape[1] * array.itemsize)
    weakref.finalize(array, _MAPPED.pop, key, None)


def is_mapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` starts at the data of a matrix given to :func:`register_mapped`."""
    return bool(_MAPPED) and tensor.device.type == "cpu" and int(tensor.data_ptr()) in _MAPPED


def release_rows(tensor: torch.Tensor, start: int, stop: int) -> None:
    """Drop rows ``start:stop`` of a mapped matrix from the resident set (no-op otherwise).

    ``tensor`` is the whole matrix (or any view sharing its first row) made by
    :func:`torch.from_numpy` from an array given to :func:`register_mapped`. The data
    stays in the page cache and is read back on the next access; only this process's
    resident memory shrinks, so scanning a mapped matrix block by block keeps the peak
    bounded by a block rather than growing to the whole file.
    """
    if not _MAPPED or tensor.device.type != "cpu":
        return
    entry = _MAPPED.get(int(tensor.data_ptr()))
    if entry is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mm, base, row_bytes = entry
    first = base + start * row_bytes
    last = base + stop * row_bytes
    page = mmap.PAGESIZE
    first -= first % page
    last = min(len(mm), last + (-last) % page)
    if last > first:
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)
