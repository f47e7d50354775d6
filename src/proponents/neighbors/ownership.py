"""Which index a search backend was last set up for.

A backend object holds one index structure: ``setup(data)`` replaces whatever it held.
When one object is handed to two TracInCPFastRandProj indexes (passed to both
constructors, or an index's ``nearest_neighbors`` passed to ``load``), the second setup
takes it over, and the first index would search the other's data. Each index therefore
claims its backend when it sets it up, and checks the claim before it searches or saves:
an index whose backend was taken over sets it up again with its own embeddings.

Claims are kept beside the backend objects, not on them (a user's backend may not take
new attributes), in a table keyed by the object's identity (a backend class may define
``==`` and hashing by value, as a ``@dataclass`` does) that does not keep them alive. For a
wrapped duck-typed backend (:class:`~proponents.neighbors.ForeignNearestNeighbors`) the
claim is on the wrapped object, which two wrappers may share. An object that cannot be
referenced weakly (a class with ``__slots__`` and no ``__weakref__``) is not tracked: it
counts as held by whoever asks.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["claim", "holds"]

#: ``id(backend) -> (weak reference to it, owner token)``
_CLAIMS: dict[int, tuple[weakref.ref, object]] = {}


def _claimed_object(backend: Any) -> Any:
    """The object whose setup holds the index: the wrapped one for a wrapper."""
    from proponents.neighbors.foreign import ForeignNearestNeighbors

    return backend.backend if isinstance(backend, ForeignNearestNeighbors) else backend


def claim(backend: Any, owner: object) -> None:
    """Record that ``backend`` now holds the index structure set up for ``owner``.

    Args:
        backend: the backend just set up (or loaded).
        owner: a token that identifies the index (compared by identity).
    """
    obj = _claimed_object(backend)
    key = id(obj)

    def forget(ref: weakref.ref) -> None:  # the object is gone: its id may be reused
        if _CLAIMS.get(key, (None,))[0] is ref:
            del _CLAIMS[key]

    try:
        ref = weakref.ref(obj, forget)
    except TypeError:  # not weakly referenceable: not tracked
        return
    _CLAIMS[key] = (ref, owner)


def holds(backend: Any, owner: object) -> bool:
    """Whether ``backend`` still holds the structure set up for ``owner`` (``True`` for an
    object that is not tracked, or that nobody claimed)."""
    obj = _claimed_object(backend)
    entry = _CLAIMS.get(id(obj))
    if entry is None or entry[0]() is not obj:
        return True
    return entry[1] is owner
