"""proponents: which training examples made a PyTorch model do that?

Public API (compatible with the influential-examples API of ``captum.influence``)::

    from proponents import TracInCP, TracInCPFast, TracInCPFastRandProj, SimilarityInfluence

The names are imported on first use (PEP 562), so ``import proponents`` and the
``proponents`` command start without importing torch: a command interrupted while torch
loads is then handled by the command itself.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proponents.checkpoints import load_flexible_state_dict
    from proponents.influence.base import DataInfluence, KMostInfluentialResults, TracInCPBase
    from proponents.influence.fast import TracInCPFast, TracInCPFastRandProj
    from proponents.influence.similarity import (
        SimilarityInfluence,
        cosine_similarity,
        euclidean_distance,
    )
    from proponents.influence.tracincp import TracInCP
    from proponents.neighbors import (
        AnnoyNearestNeighbors,
        ExactNearestNeighbors,
        FaissNearestNeighbors,
        NearestNeighbors,
    )

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_HOMES = {
    "AnnoyNearestNeighbors": "proponents.neighbors",
    "DataInfluence": "proponents.influence.base",
    "ExactNearestNeighbors": "proponents.neighbors",
    "FaissNearestNeighbors": "proponents.neighbors",
    "NearestNeighbors": "proponents.neighbors",
    "SimilarityInfluence": "proponents.influence.similarity",
    "TracInCPFast": "proponents.influence.fast",
    "TracInCPFastRandProj": "proponents.influence.fast",
    "KMostInfluentialResults": "proponents.influence.base",
    "TracInCP": "proponents.influence.tracincp",
    "TracInCPBase": "proponents.influence.base",
    "cosine_similarity": "proponents.influence.similarity",
    "euclidean_distance": "proponents.influence.similarity",
    "load_flexible_state_dict": "proponents.checkpoints",
}

__all__ = [
    "AnnoyNearestNeighbors",
    "DataInfluence",
    "ExactNearestNeighbors",
    "FaissNearestNeighbors",
    "NearestNeighbors",
    "SimilarityInfluence",
    "TracInCPFast",
    "TracInCPFastRandProj",
    "KMostInfluentialResults",
    "TracInCP",
    "TracInCPBase",
    "cosine_similarity",
    "euclidean_distance",
    "load_flexible_state_dict",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        # a subpackage (proponents.errors, proponents.neighbors, ...), as after an import
        if not name.startswith("_") and importlib.util.find_spec(f"proponents.{name}"):
            return importlib.import_module(f"proponents.{name}")
        raise AttributeError(f"module 'proponents' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
