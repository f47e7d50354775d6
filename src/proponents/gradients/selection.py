"""Which parameters are differentiated, and which layer strategy serves each.

``layers`` names modules (dotted paths allowed); all parameters of each named
module are selected. ``layers=None`` selects every parameter of the model that
requires gradients. Selected parameters are then split into:

* *hooked* layers — ``nn.Linear`` and ``nn.Conv1d``/``nn.Conv2d`` with the standard
  forward, whose per-example gradients are rebuilt from the layer's input and the
  loss gradient at its output (one batched forward and backward pass), and
* the *generic* group — every other parameter, differentiated per example with
  ``torch.func`` (``vmap`` over ``grad``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from proponents.errors import ArgumentTypeError, InvalidArgumentError


@dataclass(frozen=True)
class HookedLayer:
    """A layer whose per-example gradients come from its input and output gradient.

    Attributes:
        name: the module's dotted name.
        kind: ``"linear"`` or ``"conv"``.
        weight: canonical name of the weight parameter.
        bias: canonical name of the bias parameter, or ``None``.
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    method: str = "unfold"

    @property
    def params(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule by every name it has (a module registered twice, as in
    ``self.out = self.head``, under both), the first name first."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False) if n}


def canonical_module_name(model: nn.Module, module: nn.Module) -> str:
    """The first name of ``module`` in ``model`` (the one ``named_modules()`` gives)."""
    return next(n for n, m in model.named_modules() if m is module)


def resolve_layers(model: nn.Module, layers: Sequence[str] | str | None, owner: str) -> list[str]:
    """Canonical names of the selected parameters, in the model's parameter order.

    Raises:
        ArgumentTypeError: when ``layers`` is not a list of names.
        InvalidArgumentError: for unknown names (valid names listed) or a selection
            without parameters.
    """
    canonical = dict(model.named_parameters())
    if layers is None:
        names = [n for n, p in canonical.items() if p.requires_grad]
        if not names:
            raise InvalidArgumentError(
                f"{owner}: the model has no parameter that requires gradients; pass "
                "`layers` to choose the modules to differentiate"
            )
        return names
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not all(isinstance(x, str) for x in layers):
        raise ArgumentTypeError(
            f"{owner}: layers must be a list of module names (str), got {layers!r}"
        )
    if len(layers) == 0:
        raise InvalidArgumentError(f"{owner}: layers is empty; pass None to use every layer")
    modules = named_modules(model)
    unknown = [x for x in layers if x not in modules]
    if unknown:
        valid = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters())]
        raise InvalidArgumentError(
            f"{owner}: unknown layer name(s) {unknown} in layers; valid names are: "
            f"{', '.join(valid)}"
        )
    ident_to_name = {id(p): n for n, p in canonical.items()}
    chosen: set[str] = set()
    for layer in layers:
        params = list(modules[layer].parameters())
        if not params:
            raise InvalidArgumentError(
                f"{owner}: layer {layer!r} in layers has no parameters, so it has no gradients "
                "to compare"
            )
        chosen.update(ident_to_name[id(p)] for p in params)
    return [n for n in canonical if n in chosen]


def find_hooked_layers(model: nn.Module, selected: Sequence[str]) -> list[HookedLayer]:
    """Layers of the selection that a per-layer strategy can serve.

    A layer qualifies when it is an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d``
    whose class keeps the standard ``forward``, whose weight and bias (if any) are its own
    registered parameters (not computed by a parametrization such as ``weight_norm``, nor
    a buffer or a plain tensor attribute), all of its parameters are
    selected, and none of them is shared with another module. Convolutions additionally need
    integer padding with ``padding_mode="zeros"``.
    """
    canonical = dict(model.named_parameters())
    ident_to_name = {id(p): n for n, p in canonical.items()}
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    chosen = set(selected)
    found: list[HookedLayer] = []
    for name, m in model.named_modules():  # a module under two names is hooked once
        if not name:
            continue
        kind = _layer_kind(m)
        if kind is None:
            continue
        own = list(m.parameters(recurse=False))
        if any(owners[id(p)] > 1 for p in own):
            continue
        if not _own_parameter(m, "weight") or not _own_parameter(m, "bias", optional=True):
            # computed (a parametrization), a buffer or a plain tensor attribute: the
            # generic path differentiates whatever the forward really uses
            continue
        names = [ident_to_name[id(p)] for p in own]
        if not names or not all(n in chosen for n in names):
            continue
        weight = ident_to_name[id(m.weight)]
        bias = ident_to_name[id(m.bias)] if getattr(m, "bias", None) is not None else None
        found.append(HookedLayer(name=name, kind=kind, weight=weight, bias=bias))
    return found


def _own_parameter(m: nn.Module, attr: str, optional: bool = False) -> bool:
    """Whether ``m.<attr>`` is a parameter registered on ``m`` itself (or, with
    ``optional``, absent: ``None``). A parametrized tensor is recomputed at every access,
    and a buffer, a plain attribute or a property is not a registered parameter at all.

    Decided from ``m``'s tables, without reading the attribute: reading a parametrized
    one runs its parametrization, and ``spectral_norm``'s updates its buffers in train
    mode.
    """
    if parametrize.is_parametrized(m, attr) or getattr(type(m), attr, None) is not None:
        return False
    if attr in m._parameters:
        return m._parameters[attr] is not None or optional
    if attr in m._buffers:
        return optional and m._buffers[attr] is None
    return optional and m.__dict__.get(attr) is None


def _layer_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return "linear"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and type(m).forward in (
        nn.Conv1d.forward,
        nn.Conv2d.forward,
    ):
        if m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return "conv"
    return None
