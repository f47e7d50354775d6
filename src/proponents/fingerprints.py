"""Content fingerprints of models, tensors and dataset items.

A fingerprint is a SHA-256 hex digest over a canonical description of its subject: a
store entry or a saved index records the fingerprints of what produced it and is served
only while they match. :class:`ModelFingerprints` keeps a model's fingerprint between
calls and recomputes it only when a cheap digest, taken on the model's own device, says
the weights or buffers may have changed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import sys
import types
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from proponents.model_guard import GlobalRandomState, written_by_forward
from proponents.module_settings import (
    callable_name,
    closure_values,
    plain_attributes,
    plain_text,
)

#: Width of the matrix a tensor's 32-bit words are laid out in for the cheap digest.
_DIGEST_COLUMNS = 1024


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor's values in row-major order (empty for meta tensors).

    Any dtype and device; sparse tensors are densified, quantized ones dequantized and
    lazily conjugated or negated views resolved, so equal values give equal bytes.
    """
    tensor = tensor.detach()
    if tensor.is_sparse:
        tensor = tensor.to_dense()
    if tensor.is_quantized:
        tensor = tensor.dequantize()
    tensor = tensor.resolve_conj().resolve_neg()
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.cpu().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().data


def _model_tensors(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """Parameters, buffers and the tensors modules keep as plain attributes (a scale a
    ``forward`` reads), by dotted name; not those a forward was seen to assign (a kept
    activation, the weight ``spectral_norm`` recomputes: state, see
    :func:`~proponents.model_guard.written_by_forward`)."""
    plain = [
        (f"{prefix}.{key}" if prefix else key, value)
        for prefix, module in model.named_modules(remove_duplicate=False)
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor) and key not in written_by_forward(module)
    ]
    return [
        (kind, name, tensor)
        for kind, items in (
            ("param", model.named_parameters(remove_duplicate=False)),
            ("buffer", model.named_buffers(remove_duplicate=False)),
            ("attribute", plain),
        )
        for name, tensor in items
        if tensor is not None
    ]


def _hook_lines(module: nn.Module) -> str:
    """The forward (pre-)hooks registered on ``module``, by kind and callable name."""
    parts: list[str] = []
    for kind in ("_forward_pre_hooks", "_forward_hooks"):
        hooks = getattr(module, kind, None) or {}
        parts.extend(f"{kind[1:]}={callable_name(h)}" for h in hooks.values())
    return ";".join(parts)


def _attribute_settings(module: nn.Module, legacy: bool = False) -> list[tuple[str, str]]:
    """``(name, text)`` of the module's plain-valued attributes (settings), leaving out
    those its forward was seen to change (state, put back by the model guard)."""
    written = written_by_forward(module)
    return [(k, v) for k, v in plain_attributes(module, legacy).items() if k not in written]


def module_attributes(module: nn.Module) -> str:
    """The plain-valued attributes a module instance holds beyond every module's own, as
    ``name=value`` pairs in name order: settings that ``extra_repr()`` may not print
    (``nn.TransformerEncoderLayer.norm_first`` and its activation function, say) and a
    user's own (a temperature, a mode string) that its ``forward`` may read."""
    return ",".join(f"{name}={text}" for name, text in _attribute_settings(module))


def attribute_lines(model: nn.Module, legacy: bool = False) -> list[str]:
    """One ``"module.attribute=value"`` line per plain-valued attribute of every submodule
    (:func:`module_attributes`; ``(model).`` for the model's own, shared submodules under
    every name they have): what a saved index compares besides :func:`architecture`.
    ``legacy``: as indexes saved before ``ATTRIBUTE_TEXTS`` was recorded wrote them
    (:func:`~proponents.module_settings.plain_text`)."""
    return [
        f"{name or '(model)'}.{attribute}={text}"
        for name, module in model.named_modules(remove_duplicate=False)
        for attribute, text in _attribute_settings(module, legacy)
    ]


def _class_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def loss_fingerprint(loss_fn: Any) -> dict[str, str]:
    """What defines a loss function, for comparing the loss of a saved index with the
    one it is loaded with.

    Returns:
        ``{"class": ..., "digest": ...}``: the class (module and qualified name) of a
        loss object, or the qualified name of a plain function; the digest of a loss
        module covers its state dict (a class-weight buffer) and its plain settings
        (``reduction``, ``ignore_index``, ``label_smoothing``, ``delta``, ...). For a
        Python function (a lambda, say, or what a ``functools.partial`` wraps) also
        ``"code"``: a digest of its compiled code, constants, names, defaults, the
        partial's arguments and what its closure holds, with ``"python"``, the
        interpreter version that compiled it (bytecode differs between versions, so
        codes are compared only under the same one: see :func:`losses_differ`).
    """
    digest = hashlib.sha256()
    if loss_fn is None:
        name = "None"
    elif isinstance(loss_fn, nn.Module):
        name = _class_name(loss_fn)
        settings = {
            key: value
            for key, value in sorted(vars(loss_fn).items())
            if not key.startswith("_")
            and key != "training"
            and (value is None or isinstance(value, (bool, int, float, str)))
        }
        hash_object(settings, digest)
        hash_object(dict(loss_fn.state_dict()), digest)
    else:
        name = getattr(loss_fn, "__module__", "") or ""
        name += "." + getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    digest.update(name.encode())
    out = {"class": name, "digest": digest.hexdigest()[:16]}
    code = _function_code_digest(loss_fn)
    if code is not None:
        out.update(code=code, python="{}.{}".format(*sys.version_info[:2]))
    return out


def losses_differ(was: dict[str, str], now: dict[str, str]) -> bool:
    """Whether two :func:`loss_fingerprint` values name different losses. The code digest
    counts only when both have one, made by the same Python version (a fingerprint saved
    before codes were recorded, or under another interpreter, is compared by name)."""
    if (was.get("class"), was.get("digest")) != (now.get("class"), now.get("digest")):
        return True
    both = "code" in was and "code" in now and was.get("python") == now.get("python")
    return both and was["code"] != now["code"]


def _function_code_digest(fn: Any) -> str | None:
    """A digest of what a plain Python function computes (see :func:`loss_fingerprint`),
    or ``None`` for anything else (a module, a builtin, a callable object)."""
    digest = hashlib.sha256()
    partial_args: Any = None
    if isinstance(fn, functools.partial):
        partial_args = (fn.args, sorted(fn.keywords.items()))
        fn = fn.func
    fn = getattr(fn, "__func__", fn)  # a bound method by its function
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        return None
    _hash_code(code, digest)
    cells = closure_values(fn)
    for part in (fn.__defaults__, fn.__kwdefaults__, partial_args, cells):
        # a part only known by its type (another function, say) counts by that
        hash_object(part, digest)
    return digest.hexdigest()[:16]


def callable_fingerprint(fn: Any) -> str:
    """``"module.qualname:digest"`` of a callable, for telling what it computes apart
    without calling it (a DataLoader's ``collate_fn``, say).

    The digest covers the code of a Python function (a lambda, what a
    ``functools.partial`` wraps, a bound method's function) with its constants, names,
    defaults, the partial's arguments and what its closure holds (as
    :func:`loss_fingerprint` does), else the code of the class's ``__call__``; and the
    object whose settings it may read, by :func:`hash_object`: a bound method's
    instance, a callable object itself. Bytecode differs between Python versions, so
    the interpreter's counts too. Functions it calls or holds (in its closure, a
    partial's arguments) count by their names only, not by their code.
    """
    inner = fn.func if isinstance(fn, functools.partial) else fn
    code = _function_code_digest(fn)
    if code is None:  # a callable object: what its class's __call__ does
        code = _function_code_digest(type(inner).__call__)
    digest = hashlib.sha256(f"{code}|{sys.version_info[:2]}".encode())
    # functions among a partial's arguments or closure values, by name (hash_object
    # knows them only by their type)
    digest.update(str(plain_text(fn)).encode())
    hash_object(getattr(inner, "__self__", inner), digest)
    return f"{callable_name(fn)}:{digest.hexdigest()[:16]}"


def _hash_code(code: types.CodeType, digest: Any) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # a nested function or comprehension
            _hash_code(const, digest)
        else:
            digest.update(repr(const).encode())


def module_structure(model: nn.Module) -> str:
    """A text description of the module tree: one line per submodule (shared ones
    under every name they have), with its dotted name, its class (module and qualified
    name), its ``extra_repr()`` (the settings a module prints, e.g. a convolution's
    stride or a LeakyReLU's slope) and its plain-valued attributes
    (:func:`module_attributes`: the settings it may not print, and a user's own).

    It changes when a submodule is replaced by one of another class (``nn.ReLU`` by
    ``nn.Tanh``, a layer by a subclass with its own ``forward``) or with other settings
    (printed or not),
    and when a forward hook or pre-hook is added or removed (on a submodule, or globally),
    even when no weight changes. A hook counts by its callable's name: what a closure
    captures does not. Cheap: no tensor is read.
    """
    from torch.nn.modules import module as torch_module

    lines = [
        f"{name}|{_class_name(module)}|{_settings(module)}|{module_attributes(module)}|"
        f"{_hook_lines(module)}"
        for name, module in model.named_modules(remove_duplicate=False)
    ]
    for kind in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        hooks = getattr(torch_module, kind, None) or {}
        lines.extend(f"{kind[1:]}={callable_name(h)}" for h in hooks.values())
    return "\n".join(lines) + "\n"


def architecture(model: nn.Module) -> list[str]:
    """The model's modules, one ``"name: Class(settings)"`` line per submodule (shared
    ones under every name they have), for telling a saved index's model from another.

    Unlike :func:`module_structure`, a class counts by its qualified name alone (the same
    class defined in a script and imported from a package is the same) and hooks do not
    count: what is compared is what a person would call the architecture.
    """
    return [
        f"{name or '(model)'}: {type(module).__qualname__}({_settings(module)})"
        for name, module in model.named_modules(remove_duplicate=False)
    ]


def _settings(module: nn.Module) -> str:
    """The module's ``extra_repr()`` (the settings it prints), or a note that it failed:
    a broken ``extra_repr`` still lets the module be named by its class."""
    try:
        return module.extra_repr()
    except Exception as exc:  # noqa: BLE001 - any failure of user code
        return f"<extra_repr failed: {type(exc).__name__}>"


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the module structure and the names, dtypes, shapes and values of the
    parameters, buffers and tensors kept as plain module attributes.

    Any change to a weight, a buffer (e.g. BatchNorm running statistics) or a plain
    tensor attribute a ``forward`` reads, to a dtype,
    to the class or settings of any submodule (see :func:`module_structure`) or to the
    parameter layout changes the fingerprint. Changes to the ``forward`` code of a class
    that keep its name, and leave every tensor untouched, do not.
    """
    digest = hashlib.sha256(module_structure(model).encode())
    for kind, name, tensor in _model_tensors(model):
        digest.update(f"{kind}:{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def _plain_bytes(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor's stored bytes as a flat ``uint8`` tensor on its device, or ``None``
    for tensors whose stored bits are not simply their values (sparse, quantized, lazily
    conjugated or negated, meta)."""
    t = tensor.detach()
    if (
        t.layout != torch.strided
        or t.is_quantized
        or t.is_conj()
        or t.is_neg()
        or t.device.type == "meta"
    ):
        return None
    return t.reshape(-1).view(torch.uint8)  # reshape copies only a non-contiguous tensor


def _word_sums(raw: torch.Tensor) -> torch.Tensor:
    """Sums over the bytes ``raw`` read as 32-bit words (zero-padded to whole words) laid
    out in rows of :data:`_DIGEST_COLUMNS`: every row's and column's sum of the words as
    integers modulo 2**32 and every row's sum of the same bits read as float32, followed
    by the words of the last partial row; computed where the bytes live.

    The integer sums see any change of a single word; the float sums see what integer
    sums modulo 2**32 cancel: a tensor negated (each word gains 2**31, a whole row of them
    0 modulo 2**32) or scaled by a power of two (each exponent gains the same step).
    """
    if raw.numel() % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
    elif raw.storage_offset() % 4:  # a view that starts between two words
        raw = raw.clone()
    words = raw.view(torch.int32)
    full = words.numel() // _DIGEST_COLUMNS * _DIGEST_COLUMNS
    grid = words[:full].view(-1, _DIGEST_COLUMNS)
    values = grid.view(torch.float32)  # the same bits; NaN patterns just sum to NaN
    return torch.cat(
        [
            grid.sum(dim=1, dtype=torch.int32),
            grid.sum(dim=0, dtype=torch.int32),
            values.sum(dim=1).view(torch.int32),
            words[full:],
        ]
    )


#: Tensors smaller than this many bytes are summed together, one group per device, so
#: that a model of many small tensors costs a few operations instead of a few per tensor.
_SMALL_BYTES = 1 << 20


def quick_model_digest(model: nn.Module) -> str | None:
    """A cheap digest of the model's module structure (:func:`module_structure`), tensor
    layout and values, or ``None`` where it cannot be taken (see :func:`_plain_bytes`).

    One pass over the weights and buffers on their own device (no copy to the host
    beyond about one word per 1,024 of the model; small tensors are summed as one
    concatenation per device); any change to a single value, a negation or a scaling by a
    power of two, and any change that is not contrived to keep every sum of
    :func:`_word_sums`, changes it. It stands
    in for :func:`model_fingerprint` only through :class:`ModelFingerprints`, never on
    disk.
    """
    digest = hashlib.sha256(module_structure(model).encode())
    sums: dict[torch.device, list[torch.Tensor]] = {}
    small: dict[torch.device, list[torch.Tensor]] = {}
    for kind, name, tensor in _model_tensors(model):
        raw = _plain_bytes(tensor)
        if raw is None:
            return None
        big = raw.numel() >= _SMALL_BYTES
        digest.update(
            f"{kind}:{name}:{tensor.dtype}:{tuple(tensor.shape)}:{tensor.device}:"
            f"{raw.numel()}:{'own' if big else 'grouped'}\n".encode()
        )
        if big:
            sums.setdefault(raw.device, []).append(_word_sums(raw))
        else:
            small.setdefault(raw.device, []).append(raw)
    for device, raws in small.items():
        sums.setdefault(device, []).append(_word_sums(torch.cat(raws)))
    for parts in sums.values():  # one transfer per device
        digest.update(tensor_bytes(torch.cat(parts)))
    return digest.hexdigest()


def hash_object(obj: Any, digest: Any) -> bool:
    """Feed a structural description of ``obj`` into a hashlib ``digest``.

    Tensors and arrays contribute dtype, shape and values; tuples, lists and dicts
    recurse; numbers, strings, bytes and ``None`` contribute their value. Objects with a
    ``state_dict()`` (modules, optimizers) contribute it; other objects contribute their
    ``tobytes()`` when they have one (e.g. PIL images), else their ``repr`` when it is
    their own, else, for the default ``<... object at 0x...>`` form, their attributes
    (``__dict__`` and ``__slots__``), recursively.

    Returns:
        Whether everything was described by content. ``False`` means some part could
        only be named by its type (a function, an object whose ``repr`` shows an
        address and which has no attributes to read, nesting deeper than 64 levels):
        two different objects may then feed the same bytes, so the digest must not be
        taken to prove that they are equal.
    """
    return _hash_into(obj, digest, set(), 0)


#: Nesting deeper than this is not followed (the object then counts as not described).
_MAX_DEPTH = 64


def _hash_into(obj: Any, digest: Any, active: set[int], depth: int) -> bool:
    if isinstance(obj, torch.Tensor):
        digest.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        digest.update(tensor_bytes(obj))
        return True
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        digest.update(f"A{obj.dtype.str}{obj.shape}".encode())
        digest.update(np.ascontiguousarray(obj).data.cast("B"))
        return True
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
        return True
    if depth >= _MAX_DEPTH:
        digest.update(b"<too deep>")
        return False
    if id(obj) in active:  # a reference back to an object being described
        digest.update(b"<cycle>")
        return True
    active.add(id(obj))
    try:
        return _hash_composite(obj, digest, active, depth + 1)
    finally:
        active.discard(id(obj))


def _hash_composite(obj: Any, digest: Any, active: set[int], depth: int) -> bool:
    if isinstance(obj, np.ndarray):  # of Python objects
        digest.update(f"A{obj.dtype.str}{obj.shape}".encode())
        return _hash_into(obj.tolist(), digest, active, depth)
    if isinstance(obj, (tuple, list)):
        digest.update(f"{type(obj).__name__}{len(obj)}(".encode())
        described = all([_hash_into(item, digest, active, depth) for item in obj])
        digest.update(b")")
        return described
    if isinstance(obj, Mapping):
        digest.update(f"M{len(obj)}(".encode())
        keys = sorted(obj, key=repr)
        # keys ordered by a repr that shows an address are in no reproducible order
        described = not any(
            not isinstance(key, (str, int, float, bytes, tuple)) and " at 0x" in repr(key)
            for key in keys
        )
        for key in keys:
            described &= _hash_into(key, digest, active, depth)
            described &= _hash_into(obj[key], digest, active, depth)
        digest.update(b")")
        return described
    digest.update(f"O{_class_name(obj)}".encode())
    if isinstance(obj, type):
        digest.update(f"{obj.__module__}.{obj.__qualname__}".encode())
        return True
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict):
        try:
            state = state_dict()
        except Exception:  # noqa: BLE001 - then described like any other object
            pass
        else:
            digest.update(repr(obj).encode("utf-8", "replace"))
            return _hash_into(state, digest, active, depth)
    to_bytes = getattr(obj, "tobytes", None)
    if callable(to_bytes):
        try:
            digest.update(to_bytes())
            return True
        except Exception:  # noqa: BLE001 - a best-effort description
            pass
    if type(obj).__repr__ is not object.__repr__:
        text = repr(obj)
        if " at 0x" in text:
            return False  # named by its address (a function, a lambda): not by content
        digest.update(text.encode("utf-8", "replace"))
        return True
    attributes = _attributes(obj)
    if attributes is None:
        return False
    return _hash_into(attributes, digest, active, depth)


def _attributes(obj: Any) -> dict[str, Any] | None:
    """The instance attributes of ``obj`` (``__dict__`` and every slot of its classes,
    unset slots as a marker), or ``None`` when it has neither."""
    found: dict[str, Any] = {}
    has_any = False
    own = getattr(obj, "__dict__", None)
    if isinstance(own, dict):
        has_any = True
        found.update({f"dict.{key}": value for key, value in own.items()})
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            has_any = True
            attr = name
            if name.startswith("__") and not name.endswith("__"):  # a mangled private name
                attr = f"_{cls.__name__.lstrip('_')}{name}"
            found[f"slot.{cls.__qualname__}.{name}"] = getattr(obj, attr, "<unset slot>")
    return found if has_any else None


#: Prefix of a probe that also covers the whole content of a dataset's tensors, each by
#: its :func:`content_digest`.
WHOLE_PROBE = "tensors2:"
#: The prefix probes had while each tensor's content was one plain SHA-256 of its bytes;
#: such a whole part is not comparable with a :data:`WHOLE_PROBE` one (see
#: :func:`probes_differ`).
_WHOLE_PROBE_V1 = "tensors:"

#: Bytes per chunk of :func:`content_digest`.
_CHUNK_BYTES = 16 << 20


def content_digest(tensor: torch.Tensor) -> str:
    """SHA-256 over a tensor's dtype and shape and the SHA-256 of each 16 MiB chunk of
    its values' bytes (:func:`tensor_bytes`).

    As strong as one SHA-256 of the bytes (a tree of them), but the chunks are hashed in
    threads, up to one per CPU core (hashlib releases the GIL): a dataset of a gigabyte
    or more, hashed whole when a saved index is loaded, costs half the time on two cores.
    """
    data = tensor_bytes(tensor)
    chunks = [data[i : i + _CHUNK_BYTES] for i in range(0, len(data), _CHUNK_BYTES)]

    def one(chunk: memoryview) -> bytes:
        return hashlib.sha256(chunk).digest()

    workers = min(len(chunks), os.cpu_count() or 1, 8)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one, chunks))
    else:
        parts = [one(c) for c in chunks]
    digest = hashlib.sha256(f"T{tensor.dtype}{tuple(tensor.shape)}:{len(chunks)}".encode())
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def dataset_probe(
    dataset: Any,
    n_items: int = 5,
    include_type: bool = True,
    versions: dict[int, tuple[int, int]] | None = None,
    whole: bool = True,
) -> str | None:
    """Hash of a few items spread over a map-style dataset (first, last, in between),
    and, for a ``TensorDataset``, of every value of its tensors.

    Two datasets of the same length but different content almost always differ in
    these items, so a store built for one is not served for the other; for tensors held
    in memory nothing is left to chance: a change to any value changes the probe (then
    ``WHOLE_PROBE + items + ":" + tensors``; the tensors' digests are kept between
    calls, see :func:`tensor_fingerprint`). Compare probes with :func:`probes_differ`.
    The items are read with torch's, Python's and NumPy's random generators seeded
    alike each time (and put back afterwards), so a dataset with random augmentations
    gives the same probe at every call instead of looking like a new dataset. With
    ``include_type`` false the dataset's class does not count, only its length and the
    items (the same examples behind another wrapper give the same items part). Returns
    ``None`` when the dataset cannot be indexed. ``versions`` is passed to
    :func:`tensor_fingerprint`. With ``whole`` false, a ``TensorDataset`` is probed by its
    items only, as any other dataset (no pass over its tensors).
    """
    try:
        n = len(dataset)
    except TypeError:
        return None
    if n == 0 or not hasattr(dataset, "__getitem__"):
        return None
    positions = sorted({round(i * (n - 1) / max(n_items - 1, 1)) for i in range(n_items)})
    kind = type(dataset).__qualname__ if include_type else "items"
    digest = hashlib.sha256(f"{kind}:{n}".encode())
    try:
        with _seeded_generators():
            for i in positions:
                digest.update(f"[{i}]".encode())
                hash_object(dataset[i], digest)
    except Exception:  # noqa: BLE001 - a dataset we cannot index gives no probe
        return None
    from torch.utils.data import TensorDataset

    if not whole or not isinstance(dataset, TensorDataset):
        return digest.hexdigest()
    tensors = "".join(tensor_fingerprint(t, versions) for t in dataset.tensors)
    return f"{WHOLE_PROBE}{digest.hexdigest()}:{hashlib.sha256(tensors.encode()).hexdigest()}"


def loader_probe(loader: Any, include_type: bool = False, whole: bool = True) -> str | None:
    """:func:`dataset_probe` of the examples a DataLoader yields, in the order it yields
    them: its dataset as it is when it reads it sequentially, else the ``Subset`` of it its
    sampler or batch sampler picks (their indices are drawn once, with the global
    generators seeded and put back after, as for the items). ``whole`` as for
    :func:`dataset_probe`."""
    from torch.utils.data import BatchSampler, SequentialSampler, Subset

    dataset = loader.dataset
    sampler, batches = loader.sampler, loader.batch_sampler
    default_batches = batches is None or (
        isinstance(batches, BatchSampler) and batches.sampler is sampler
    )
    if default_batches and (sampler is None or isinstance(sampler, SequentialSampler)):
        return dataset_probe(dataset, include_type=include_type, whole=whole)
    try:
        with _seeded_generators():
            if default_batches:
                order = [int(i) for i in sampler]
            else:
                order = [int(i) for indices in batches for i in indices]
    except Exception:  # noqa: BLE001 - indices we cannot read give no probe
        return None
    return dataset_probe(Subset(dataset, order), include_type=include_type, whole=whole)


def probes_differ(saved: str | None, now: str | None) -> bool:
    """Whether two :func:`dataset_probe` values show different examples.

    The sampled items must agree; the whole tensors count where both probes cover them
    alike (a ``TensorDataset`` and the same examples behind a ``Subset`` agree by their
    items; a probe written before whole tensors were covered, or while they were hashed
    another way, is compared by its items). ``None`` (no probe) differs from nothing.
    """
    if saved is None or now is None:
        return False

    def parts(probe: str) -> tuple[str, str | None, str | None]:
        for scheme in (WHOLE_PROBE, _WHOLE_PROBE_V1):
            if probe.startswith(scheme):
                items, _, whole = probe[len(scheme) :].partition(":")
                return items, scheme, whole
        return probe, None, None

    (items_a, scheme_a, whole_a), (items_b, scheme_b, whole_b) = parts(saved), parts(now)
    if items_a != items_b:
        return True
    return scheme_a is not None and scheme_a == scheme_b and whole_a != whole_b


#: ``id(tensor) -> (weak reference, quick digest, content digest)`` of
#: :func:`tensor_fingerprint`.
_TENSOR_DIGESTS: dict[int, tuple[weakref.ref, str, str]] = {}


def version_counter(tensor: torch.Tensor) -> int | None:
    """``tensor``'s version counter (bumped by every in-place edit through torch), or
    ``None`` for a tensor made under ``torch.inference_mode()``, which keeps none: such
    a tensor is read again wherever a counter would have allowed skipping it."""
    return None if tensor.is_inference() else tensor._version


def tensor_fingerprint(
    tensor: torch.Tensor, versions: dict[int, tuple[int, int]] | None = None
) -> str:
    """A tensor's :func:`content_digest` (SHA-256 over its dtype, shape and values),
    kept between calls.

    It is computed again only when a cheap digest of the tensor (sums of its bit
    patterns, taken on its own device) changes, so asking again for a large dataset's
    tensors costs one pass of sums, not a copy to the host and a hash.

    ``versions`` (a caller's own dict, kept between its calls) skips even that: a tensor
    whose version counter and storage are the ones this caller last saw is not read at
    all. Every edit through torch bumps the counter; one through a NumPy view or
    ``.data`` does not, and is seen only by a caller with another dict (for callers that
    run often against data of many megabytes, where a pass would cost more than the work).
    """
    hit = _TENSOR_DIGESTS.get(id(tensor))
    if hit is not None and hit[0]() is not tensor:
        hit = None
    version = version_counter(tensor)
    if versions is not None and version is not None:
        state = (version, tensor.data_ptr() if tensor.layout == torch.strided else 0)
        if hit is not None and versions.get(id(tensor)) == state:
            return hit[2]
        versions[id(tensor)] = state
    raw = _plain_bytes(tensor)
    quick = None
    if raw is not None:
        head = f"{tensor.dtype}:{tuple(tensor.shape)}:{tensor.device}:"
        quick = hashlib.sha256(head.encode() + bytes(tensor_bytes(_word_sums(raw)))).hexdigest()
        if hit is not None and hit[1] == quick:
            return hit[2]
    full = content_digest(tensor)
    if quick is not None:
        key = id(tensor)

        def forget(_: weakref.ref) -> None:  # the tensor is gone: its id may be reused
            _TENSOR_DIGESTS.pop(key, None)

        _TENSOR_DIGESTS[key] = (weakref.ref(tensor, forget), quick, full)
    return full


@contextmanager
def _seeded_generators(seed: int = 0) -> Iterator[None]:
    """Seed torch's (CPU), Python's and NumPy's global generators; restore them after."""
    saved = GlobalRandomState(torch.device("cpu"))
    torch.default_generator.manual_seed(seed)  # the CPU generator only
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        saved.restore()


class ModelFingerprints:
    """A model's :func:`model_fingerprint`, kept between calls.

    The SHA-256 is computed again only when :func:`quick_model_digest` changes, so a
    model that stays the same between calls costs one pass of sums on its own device
    instead of a copy of every weight to the host and a hash of it.
    """

    def __init__(self) -> None:
        self._quick: str | None = None
        self._fingerprint: str | None = None

    def __call__(self, model: nn.Module) -> str:
        quick = quick_model_digest(model)
        if quick is None or quick != self._quick or self._fingerprint is None:
            self._fingerprint = model_fingerprint(model)
            self._quick = quick
        return self._fingerprint


#: One :class:`ModelFingerprints` per model, shared by every object that fingerprints it.
_BY_MODEL: weakref.WeakKeyDictionary[nn.Module, ModelFingerprints] = weakref.WeakKeyDictionary()


def fingerprints_of(model: nn.Module) -> ModelFingerprints:
    """The fingerprint cache of ``model``, shared by all callers (so a new
    ``SimilarityInfluence`` over a model another one has fingerprinted starts warm)."""
    cache = _BY_MODEL.get(model)
    if cache is None:
        cache = _BY_MODEL[model] = ModelFingerprints()
    return cache


__all__ = [
    "ModelFingerprints",
    "callable_fingerprint",
    "fingerprints_of",
    "dataset_probe",
    "loader_probe",
    "probes_differ",
    "tensor_fingerprint",
    "content_digest",
    "hash_object",
    "model_fingerprint",
    "architecture",
    "module_structure",
    "quick_model_digest",
    "tensor_bytes",
]
