"""The public influence classes.

Every public name of :mod:`proponents` can also be imported from here, so that code
written as ``from captum.influence import TracInCP, TracInCPFast`` runs with ``captum``
replaced by ``proponents``. The names are looked up on first use, like the package's own
(importing this subpackage does not import torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proponents import (
        AnnoyNearestNeighbors,
        DataInfluence,
        ExactNearestNeighbors,
        FaissNearestNeighbors,
        KMostInfluentialResults,
        NearestNeighbors,
        SimilarityInfluence,
        TracInCP,
        TracInCPBase,
        TracInCPFast,
        TracInCPFastRandProj,
        cosine_similarity,
        euclidean_distance,
        load_flexible_state_dict,
    )

__all__ = [
    "AnnoyNearestNeighbors",
    "DataInfluence",
    "ExactNearestNeighbors",
    "FaissNearestNeighbors",
    "KMostInfluentialResults",
    "NearestNeighbors",
    "SimilarityInfluence",
    "TracInCP",
    "TracInCPBase",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "cosine_similarity",
    "euclidean_distance",
    "load_flexible_state_dict",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'proponents.influence' has no attribute {name!r}")
    import proponents

    value = getattr(proponents, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
