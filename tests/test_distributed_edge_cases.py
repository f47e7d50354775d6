"""Two gloo ranks whose calls differ: errors on every rank instead of an abort or wrong
answers (see ``tests/distributed_worker.py`` for the checks each scenario makes)."""

from __future__ import annotations

import pytest
import torch

from test_distributed import _launch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def test_calls_with_different_arguments_are_named_on_every_rank(tmp_path):
    """k, proponents, test inputs, aggregate, a self-influence loader and a saved index's
    projection that differ between the ranks raise one DistributedError naming what
    differs, on every rank (before: gloo aborted a rank in all_gather, or each rank
    returned a different, wrong answer); the objects then answer as one process does."""
    _launch(tmp_path, 2, "mismatched-calls", timeout=120, DIST_TIMEOUT_S="30")
