"""Sharded over two gloo ranks, every method and mode equals the single-process answer.

The test launches ``python -m torch.distributed.run --nproc_per_node=2`` on
``tests/distributed_worker.py``, which computes everything both ways on each rank and
prints one ``MISMATCH`` line per difference (it also checks that ranks disagreeing on
their data, and a rank failing mid-way, give errors on every rank instead of a hang).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from proponents import TracInCP
from proponents.distributed import resolve_distributed, shard_loader, shard_range
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


def _launch(folder: Path, ranks: int, **env: str) -> None:
    """Run the worker on ``ranks`` local processes; every rank must report no mismatch."""
    _worker_module().prepare(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(folder),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    for rank in range(ranks):
        assert f"rank {rank} checked, 0 mismatches" in out, out[-6000:]


def test_two_ranks_equal_one_process(tmp_path):
    _launch(tmp_path, 2)


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
