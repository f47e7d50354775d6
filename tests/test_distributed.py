"""Sharded over two gloo ranks, every method and mode equals the single-process answer.

The test launches ``python -m torch.distributed.run --nproc_per_node=2`` on
``tests/distributed_worker.py``, which computes everything both ways on each rank and
prints one ``MISMATCH`` line per difference (it also checks that ranks disagreeing on
their data, and a rank failing mid-way, give errors on every rank instead of a hang).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from proponents import TracInCP
from proponents.distributed import even_rows, resolve_distributed, shard_loader, shard_range
from proponents.errors import ArgumentTypeError, InvalidArgumentError

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_module():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _launch(
    folder: Path, ranks: int, scenario: str = "equal", timeout: float = 180, **env: str
) -> None:
    """Run the worker on ``ranks`` local processes; every rank must report no mismatch.

    A run past ``timeout`` seconds (a rank left waiting in a collective) fails the test:
    torchrun and its workers are killed as one process group, so none is left behind.
    """
    _worker_module().prepare(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(folder),
        scenario,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the ranks did not finish within {timeout} s (a hang):\n{out[-6000:]}")
    assert proc.returncode == 0, out[-6000:]
    for rank in range(ranks):
        assert f"rank {rank} checked, 0 mismatches" in out, out[-6000:]


def test_two_ranks_equal_one_process(tmp_path):
    _launch(tmp_path, 2)


def test_a_failure_at_query_time_is_named_on_every_rank(tmp_path):
    """The test side of TracInCPFastRandProj and SimilarityInfluence runs inside the
    status exchange: rank 1's failing checkpoint or forward pass is its own error there
    and a DistributedError naming rank 1 on rank 0 (before: rank 0 waited forever)."""
    _launch(tmp_path, 2, "query-failure", timeout=120, DIST_TIMEOUT_S="30")


def test_training_items_that_are_whole_batches(tmp_path):
    """DataLoader(batch_size=None): sharded TracInCPFastRandProj (built, and loaded from
    its index) equals one process (before: construction crashed, and a load kept the
    wrong rows); k beyond the dataset and SimilarityInfluence are refused on every rank."""
    _launch(tmp_path, 2, "whole-batches", timeout=120, DIST_TIMEOUT_S="30")


def test_packed_batches_shard_like_any_other(tmp_path):
    """Packed text batches (EmbeddingBag offsets from a collate_fn): every TracIn class
    sharded over two ranks equals one process, scores and self-influence."""
    _launch(tmp_path, 2, "packed", timeout=120, DIST_TIMEOUT_S="30")


def test_nonfinite_warnings_name_dataset_positions_on_every_rank(tmp_path):
    """A NaN training example in rank 1's shard is named by its dataset position, by
    every rank, as one process names it (before: only rank 1, with its shard position).
    SimilarityInfluence's counts of NaN source rows in both shards are one process's
    counts on every rank (before: each rank counted its own share)."""
    _launch(tmp_path, 2, "nonfinite", timeout=120, DIST_TIMEOUT_S="30")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_two_ranks_with_the_model_on_cuda(tmp_path, backend):
    """Model, data and results on the GPU; gloo ranks may share one GPU.

    nccl refuses two ranks on one GPU, so its case needs two GPUs (a world of one rank
    would not shard at all); gloo's collectives go through the CPU.
    """
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("nccl with two ranks needs two GPUs")
    _launch(tmp_path, 2, DIST_BACKEND=backend, DIST_DEVICE="cuda")


def test_shards_are_contiguous_and_cover_every_batch():
    data = TensorDataset(torch.arange(11.0), torch.arange(11))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    seen = []
    for rank in range(3):
        shard = shard_loader(loader, rank, 3, "train_dataset")
        got = [int(v) for _, y in shard for v in y]
        assert shard_range(loader, rank, 3) == (len(seen), len(seen) + len(got))
        seen += got
    assert seen == list(range(11))
    # batch_size=None: every item is already a batch
    whole = torch.utils.data.DataLoader(data, batch_size=None)
    assert [int(y) for _, y in shard_loader(whole, 1, 2, "train_dataset")] == list(range(5, 11))
    # ... whose sizes are not known without reading them: no range (sizes come from results)
    assert shard_range(whole, 1, 2) is None
    # a saved index is split by rows: contiguous, in rank order, covering every row
    assert [even_rows(11, r, 3) for r in range(3)] == [(0, 3), (3, 7), (7, 11)]


def test_distributed_argument_is_checked(tmp_path):
    with pytest.raises(ArgumentTypeError, match="distributed"):
        resolve_distributed("yes", "TracInCP")
    assert resolve_distributed(None, "TracInCP") is None  # no process group: one process
    assert resolve_distributed(False, "TracInCP") is None
    model = nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "c.pt")
    with pytest.raises(InvalidArgumentError, match="init_process_group"):
        TracInCP(model, TensorDataset(torch.randn(4, 3), torch.arange(4) % 2), tmp_path,
                 distributed=True)  # fmt: skip
