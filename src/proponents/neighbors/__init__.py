"""Nearest-neighbour search by inner product, used by TracInCPFastRandProj.

:class:`ExactNearestNeighbors` (the default) is exact; :class:`AnnoyNearestNeighbors`
and :class:`FaissNearestNeighbors` wrap optional packages (``pip install
'proponents[annoy]'`` / ``'proponents[faiss]'``), imported only when such an object is
created. All of them return ``(indices, scores)`` where the scores are the exact inner
products with the query as given (largest first); opponents are found by querying with
the negated vector and negating the scores back. Data and queries may also be
``(N, *features)``: they are flattened to ``(N, D)``. Any other object with
``setup(data)`` and ``get_nearest_neighbors(query, k)`` (e.g. written for Captum) can be
wrapped in :class:`ForeignNearestNeighbors`, as TracInCPFastRandProj does.
"""

from proponents.neighbors.annoy_backend import AnnoyNearestNeighbors
from proponents.neighbors.base import (
    MissingExtraError,
    NearestNeighbors,
    NearestNeighborsNotReadyError,
)
from proponents.neighbors.exact import ExactNearestNeighbors
from proponents.neighbors.faiss_backend import FaissNearestNeighbors
from proponents.neighbors.foreign import ForeignNearestNeighbors

__all__ = [
    "AnnoyNearestNeighbors",
    "ExactNearestNeighbors",
    "FaissNearestNeighbors",
    "ForeignNearestNeighbors",
    "MissingExtraError",
    "NearestNeighbors",
    "NearestNeighborsNotReadyError",
]
