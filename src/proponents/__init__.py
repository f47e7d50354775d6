"""proponents: which training examples made a PyTorch model do that?

Public API (compatible with the influential-examples API of ``captum.influence``)::

    from proponents import TracInCP, TracInCPFast, TracInCPFastRandProj, SimilarityInfluence
"""

from __future__ import annotations

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
