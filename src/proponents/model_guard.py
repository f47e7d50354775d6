"""Leave the user's model exactly as it was found.

Every public call loads checkpoints into the model and switches it to eval mode;
:func:`preserved` sets the values of every parameter and buffer aside (the
model works on copies meanwhile, or on checkpoint tensors loaded by reference), with
their gradients, ``requires_grad`` flags
and the train/eval mode of every submodule, and puts them back on the way out,
also when the call is interrupted by an exception or ``KeyboardInterrupt``.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import nn

from proponents.allocator import keep_freed_memory
from proponents.errors import InvalidArgumentError, first_names
from proponents.module_settings import MODULE_BASICS


def _refuse_placeholders(model: nn.Module) -> None:
    """Raise unless every parameter and buffer of ``model`` has its shape and memory (not
    lazy, not on the meta device).

    A lazy module (``nn.LazyLinear``, say) that has not run yet holds placeholders that
    cannot be set aside, and the first load or forward turns it into an ordinary module
    for good (new class, hooks removed), which the guard could not undo.

    Raises:
        InvalidArgumentError: naming the placeholders and how to create them.
    """
    tensors = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    lazy = [name for name, t in tensors if nn.parameter.is_lazy(t)]
    if lazy:
        raise InvalidArgumentError(
            f"the model has parameters whose shapes are not known yet ({first_names(lazy)}: "
            "lazy modules such as nn.LazyLinear); run it once on a batch of inputs before "
            "this call, so that they are created"
        )
    # A model built on the meta device has shapes but no memory: a checkpoint loaded into
    # it keeps nothing, and the first computation fails deep inside.
    meta = [name for name, t in tensors if t.is_meta]
    if meta:
        raise InvalidArgumentError(
            f"the model has parameters or buffers on the meta device ({first_names(meta)}), "
            "which hold no values; give them memory first: model.to_empty(device='cpu') (or "
            "your device), or load a state dict with model.load_state_dict(state, assign=True)"
        )


def _registered(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """Every parameter and buffer slot: ``(module, name in it, kind, tensor)``."""
    slots = []
    for module in model.modules():
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, tensor in table.items():
                if tensor is not None:
                    slots.append((module, name, kind, tensor))
    return slots


#: Set inside a call whose checkpoint loads must hand the model new tensors instead of
#: copying into the ones it has (see :func:`preserved` and :func:`loads_by_reference`).
_BY_REFERENCE: ContextVar[bool] = ContextVar("proponents_loads_by_reference", default=False)


def loads_by_reference() -> bool:
    """Whether checkpoint loads in the current call must give the model's parameters and
    buffers new tensors to hold (``.data``) rather than copy into the ones they hold:
    inside :func:`preserved` with ``loads_by_reference=True``, where parameters are not
    copied on entry and their original values are the ones they hold."""
    return _BY_REFERENCE.get()


def _loads_its_own_way(module: nn.Module) -> bool:
    """Whether loading a state dict into ``module`` may run code of its own (an override
    of ``_load_from_state_dict``, as norm layers have, or load hooks), which could copy
    into its tensors whatever the loader asks for."""
    return bool(
        type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
        or module._load_state_dict_pre_hooks
        or module._load_state_dict_post_hooks
    )


@contextmanager
def preserved(model: nn.Module, loads_by_reference: bool = False) -> Iterator[nn.Module]:
    """Context manager that restores ``model`` to its state on entry.

    Inside, every parameter and buffer keeps its identity but holds a copy of its
    values (except as ``loads_by_reference`` says), and parameters hold no ``.grad``;
    the original values and gradients are set aside untouched and put back on the way
    out (no copy back). A parameter or
    buffer object that the body replaced in its module (``load_state_dict(...,
    assign=True)``, say) is put back too, so references the user holds stay valid, and so
    is every tensor a module holds as a plain attribute (``spectral_norm``'s ``weight``).
    What each module registers is put back as it was: a submodule the body swapped
    for another, or a parameter or buffer it registered or removed, leaves no trace.

    Args:
        model: the model to guard.
        loads_by_reference: the body loads checkpoints only through a loader that
            honours :func:`loads_by_reference` (the default loader does), handing the
            model new tensors instead of writing into its own. Parameters are then not
            copied on entry: nothing writes into them. Parameters of modules that load
            their own way (:func:`_loads_its_own_way`), and all buffers, are copied as
            always, and so is everything when the model overrides ``load_state_dict``.

    Raises:
        InvalidArgumentError: when the model has lazy parameters or buffers not yet
            created (see :func:`_refuse_placeholders`); nothing is changed then.
    """
    _refuse_placeholders(model)
    slots = _registered(model)
    uncopied: set[int] = set()
    if loads_by_reference and type(model).load_state_dict is nn.Module.load_state_dict:
        own_way = {
            id(t) for m in model.modules() if _loads_its_own_way(m) for t in m._parameters.values()
        }
        uncopied = {id(t) for _, _, kind, t in slots if kind == "param"} - own_way
    else:
        loads_by_reference = False
    originals: dict[int, tuple[torch.Tensor, torch.Tensor | None, bool]] = {}
    for _, _, kind, tensor in slots:
        if id(tensor) in originals:  # tied: one tensor in several slots
            continue
        grad = tensor.grad if kind == "param" else None
        originals[id(tensor)] = (tensor.data, grad, tensor.requires_grad)
    modes = {m: m.training for m in model.modules()}
    # What each module registers (parameters, buffers, submodules), as the entries were:
    # a load function that registers, removes or replaces one leaves it so otherwise.
    tables = [
        (
            m,
            dict(m._parameters),
            dict(m._buffers),
            dict(m._modules),
            set(m._non_persistent_buffers_set),
        )
        for m in model.modules()
    ]
    # Tensors a module keeps as plain attributes, such as the weight that
    # ``nn.utils.spectral_norm`` recomputes from ``weight_orig`` before each forward:
    # a forward inside the call replaces them with values of the last checkpoint.
    attributes = [
        (m, name, value)
        for m in model.modules()
        for name, value in vars(m).items()
        if isinstance(value, torch.Tensor)
    ]
    # Every other attribute of the user's, as it was, and what the containers among them
    # hold: a forward that updates one (a cached sequence length, a call counter, a list
    # it appends to, a dict of counts) changes state.
    settings = {m: _attribute_snapshot(m) for m in model.modules()}
    token = _BY_REFERENCE.set(loads_by_reference)
    try:
        copied: set[int] = set(uncopied)
        with torch.no_grad():
            for _, _, kind, tensor in slots:
                if kind == "param":
                    tensor.grad = None
                if id(tensor) not in copied:  # a tied tensor is copied once
                    copied.add(id(tensor))
                    tensor.data = originals[id(tensor)][0].clone()
        yield model
    finally:
        _BY_REFERENCE.reset(token)
        _to_the_end(lambda: _put_back(model, slots, originals, modes, attributes, tables, settings))


def _to_the_end(action: Callable[[], None]) -> None:
    """Run ``action`` to its end even when Ctrl-C arrives during it, then re-raise.

    Python raises ``KeyboardInterrupt`` between any two bytecodes, so an interrupt that
    lands while a model is being put back would leave it half restored (weights of the
    last checkpoint, lost ``.grad``, eval mode). ``action`` must be idempotent: it is
    started again from the beginning after each interrupt. Blocking the signal instead
    would not do: the kernel hands a process's SIGINT to any thread that does not block
    it (torch's worker threads), and Python then raises in the main thread all the same.
    """
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            action()
        except KeyboardInterrupt as err:
            interrupted = err
            continue
        break
    if interrupted is not None:
        raise interrupted


def _put_back(
    model: nn.Module,
    slots: list,
    originals: dict[int, tuple[torch.Tensor, torch.Tensor | None, bool]],
    modes: dict[nn.Module, bool],
    attributes: list[tuple[nn.Module, str, torch.Tensor]],
    tables: list[tuple[nn.Module, dict, dict, dict, set]],
    settings: dict[nn.Module, dict[str, tuple[Any, Any]]],
) -> None:
    """Put ``model`` back as :func:`preserved` found it (idempotent)."""
    for m, params, buffers, children, non_persistent in tables:
        # the entries as they were, in their order (this also puts every slot's object back)
        for now, entry in ((m._parameters, params), (m._buffers, buffers), (m._modules, children)):
            if now.keys() != entry.keys() or any(now[k] is not v for k, v in entry.items()):
                now.clear()
                now.update(entry)
        if m._non_persistent_buffers_set != non_persistent:
            m._non_persistent_buffers_set = set(non_persistent)
    for _, _, kind, tensor in slots:
        data, grad, flag = originals[id(tensor)]
        tensor.data = data
        if kind == "param":
            tensor.grad = grad
            tensor.requires_grad_(flag)
    for m, training in modes.items():
        m.training = training
    # A tensor a forward stored on its module during the call (``self.last = h``) is
    # state the forward writes, not a setting it reads: it is put back as it was (or
    # removed, if new), and remembered, so that fingerprints leave it out.
    had = {(id(m), name): value for m, name, value in attributes}
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if not isinstance(value, torch.Tensor):
                continue
            before = had.get((id(m), name))
            if before is None or value is not before:
                written_by_forward(m).add(name)
            if before is None:
                del m.__dict__[name]
    for m, name, value in attributes:
        m.__dict__[name] = value
    # Likewise any other attribute the call reassigned, added or removed, or a container
    # it changed in place: put back (a container refilled in place, so references to it
    # stay valid), and remembered as state.
    for m, saved in settings.items():
        now = m.__dict__
        for name in [n for n, v in now.items() if n not in saved and _snapshotted(n, v)]:
            del now[name]
            written_by_forward(m).add(name)
        for name, (value, contents) in saved.items():
            if now.get(name, _MISSING) is not value:
                now[name] = value
                written_by_forward(m).add(name)
            if contents is not _MISSING and _refill(value, contents):
                written_by_forward(m).add(name)


_MISSING = object()
#: How deep containers held as attributes are copied (deeper ones are held by reference).
_COPY_DEPTH = 3
#: Largest NumPy array attribute copied at each call (a larger one is held by reference).
_COPY_BYTES = 64 << 20
#: Most items (through nested lists and dicts) of one container attribute copied at each
#: call; a larger one is held by reference.
_COPY_ITEMS = 1 << 16


def _snapshotted(name: str, value: Any) -> bool:
    """Whether the guard sets attribute ``name`` aside by value here (tensors and torch's
    own bookkeeping are handled apart)."""
    return name not in MODULE_BASICS and not isinstance(value, torch.Tensor)


def _attribute_snapshot(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``{name: (value, contents)}`` for each attribute of the user's the module holds:
    the object, and a copy of what it holds where it is a container a forward may change
    in place (``_MISSING`` otherwise)."""
    return {
        name: (value, _bounded_contents(value))
        for name, value in vars(module).items()
        if _snapshotted(name, value)
    }


class _TooLarge(Exception):
    """A container holds more than :data:`_COPY_ITEMS` items (counted through nesting)."""


def _bounded_contents(value: Any) -> Any:
    """:func:`_contents` of ``value``, or ``_MISSING`` (held by reference) when it holds
    more than :data:`_COPY_ITEMS` items: a vocabulary of a million words is not copied
    and compared at every call."""
    try:
        return _contents(value, 0, [_COPY_ITEMS])
    except _TooLarge:
        return _MISSING


def _contents(value: Any, depth: int, budget: list[int]) -> Any:
    """What container ``value`` holds (a list, dict, set, bytearray, or a writeable NumPy
    array of up to :data:`_COPY_BYTES`), or ``_MISSING`` for anything else (raises
    :class:`_TooLarge` past ``budget[0]`` items in all): a list's or
    dict's items as the objects they are, with what those hold in turn (down to
    :data:`_COPY_DEPTH`), so that they can be refilled in place too; a copy of the others.
    """
    if depth >= _COPY_DEPTH:
        return _MISSING
    if isinstance(value, (list, dict, set, bytearray)):
        budget[0] -= len(value)
        if budget[0] < 0:
            raise _TooLarge
    if isinstance(value, np.ndarray):
        # not a file's pages (a memmap) nor one too large to copy at every call
        small = value.nbytes <= _COPY_BYTES and not isinstance(value, np.memmap)
        return value.copy() if small and value.flags.writeable else _MISSING
    if isinstance(value, set):
        return set(value)
    if isinstance(value, bytearray):
        return bytearray(value)
    if isinstance(value, list):
        return [(item, _contents(item, depth + 1, budget)) for item in value]
    if isinstance(value, dict):
        return [(key, item, _contents(item, depth + 1, budget)) for key, item in value.items()]
    return _MISSING


def _refill(value: Any, contents: Any) -> bool:
    """Put ``contents`` (:func:`_contents`) back into container ``value`` in place, and
    its items' into them; whether anything had changed (idempotent)."""
    if isinstance(value, (list, dict)):
        changed = [_refill(item, held) for *_, item, held in contents if held is not _MISSING]
        if _holds(value, contents):
            return any(changed)
    elif _holds(value, contents):
        return False
    if isinstance(value, np.ndarray):
        np.copyto(value, contents)
    elif isinstance(value, (list, bytearray)):
        value[:] = [entry[0] for entry in contents] if isinstance(value, list) else contents
    else:  # a set, or a dict
        value.clear()
        value.update(contents if isinstance(value, set) else [e[:2] for e in contents])
    return True


def _holds(value: Any, contents: Any) -> bool:
    """Whether container ``value`` still holds ``contents`` (:func:`_contents`): the same
    items, by identity for a list's or dict's; ``False`` when they cannot be compared."""
    try:
        if isinstance(value, np.ndarray):
            return np.array_equal(value, contents, equal_nan=value.dtype.kind in "fc")
        if isinstance(value, list):
            return len(value) == len(contents) and all(
                now is item for now, (item, _) in zip(value, contents)
            )
        if isinstance(value, dict):
            return list(value) == [key for key, _, _ in contents] and all(
                value[key] is item for key, item, _ in contents
            )
        return bool(value == contents)
    except Exception:  # noqa: BLE001 - items whose comparison fails: put back to be sure
        return False


#: Per module, the names of plain attributes its forward was seen to (re)assign.
_WRITTEN: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def written_by_forward(module: nn.Module) -> set[str]:
    """Names of the plain attributes ``module``'s forward assigned during a guarded call
    (a kept activation, an updated counter or cached length, say): state, which
    fingerprints leave out."""
    names = _WRITTEN.get(module)
    if names is None:
        names = _WRITTEN[module] = set()
    return names


#: Models :func:`observe_forward_state` has run once in this process.
_OBSERVED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def observe_forward_state(model: nn.Module, args: Callable[[], tuple[Any, ...] | None]) -> None:
    """Run ``model`` once on ``args()`` (guarded, its outcome discarded), the first time
    this process asks for ``model``, so that the attributes its forward writes (a call
    counter, a kept activation, the weight ``spectral_norm`` recomputes) are known as
    state (:func:`written_by_forward`) before anything fingerprints it.

    Without it the first fingerprint of each process would count them and every later one
    would not, and what was stored under the first (activations) would be rebuilt at the
    next call. ``args`` gives model inputs that need not be copied (the model may edit
    them), or ``None`` when there are none: nothing is run then. A forward that fails
    is left to fail where the caller runs the model itself.
    """
    if model in _OBSERVED:
        return
    given = args()
    if given is None:
        return
    _OBSERVED.add(model)
    # a forward that fails here is reported by the caller's own run of the model
    with preserved(model, loads_by_reference=True), torch.no_grad(), suppress(Exception):
        model(*given)


class GlobalRandomState:
    """The global generators a data pipeline may draw from, as they are now: torch's CPU
    generator (and that of ``device`` when it is a GPU), Python's ``random`` and NumPy's
    legacy global generator. :meth:`restore` puts them all back.

    Args:
        device: the model's device.
    """

    def __init__(self, device: torch.device):
        self.cuda = (device.index or 0) if device.type == "cuda" else None
        self.torch = torch.get_rng_state()
        self.torch_cuda = None if self.cuda is None else torch.cuda.get_rng_state(self.cuda)
        self.python = random.getstate()
        self.numpy = np.random.get_state()

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        if self.cuda is not None and self.torch_cuda is not None:
            torch.cuda.set_rng_state(self.torch_cuda, self.cuda)
        random.setstate(self.python)
        np.random.set_state(self.numpy)


@contextmanager
def call_scope(
    model: nn.Module, device: torch.device, loads_by_reference: bool = False
) -> Iterator[None]:
    """Everything a public call runs inside: the model restored on the way out and in eval
    mode meanwhile, the global random generators restored (iterating a ``DataLoader`` or
    a dataset with random augmentations draws from them; see :class:`GlobalRandomState`),
    gradients off unless a step turns them on,
    and glibc's allocator keeping freed memory for reuse (:mod:`proponents.allocator`).
    """
    generators = GlobalRandomState(device)
    try:
        with keep_freed_memory(), preserved(model, loads_by_reference), torch.no_grad():
            model.eval()
            yield
    finally:
        generators.restore()
