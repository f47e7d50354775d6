"""TracIn over several processes.

Run: ``torchrun --nproc_per_node=2 examples/distributed_tracin.py``

Every rank builds the same model, data and checkpoints; proponents shards the training set
over the ranks, and every rank gets the full answer. Rank 0 prints it.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from proponents import TracInCP, TracInCPFast, TracInCPFastRandProj


def data_and_model() -> tuple[TensorDataset, nn.Module]:
    """The same training set and architecture on every rank (seeded)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 20, generator=g), torch.randint(0, 4, (2000,), generator=g)
    return TensorDataset(x, y), nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))


def train_and_checkpoint(model: nn.Module, train: TensorDataset, folder: Path) -> None:
    """Train for three epochs, saving a checkpoint (weights + learning rate) after each."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        for xb, yb in DataLoader(train, batch_size=50, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
        state = {"model_state_dict": model.state_dict(), "learning_rate": 0.1}
        torch.save(state, folder / f"epoch-{epoch}.pt")


def main() -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # The timeout bounds how long a rank waits for one that died without reporting.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    rank = dist.get_rank()

    # Rank 0 writes the checkpoints into a shared folder; the others wait for them. On
    # several machines, use a folder that every machine sees (or copy the files first).
    folder = Path(os.environ.get("CKPT_DIR", Path(tempfile.gettempdir()) / "proponents-ckpts"))
    train, model = data_and_model()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        train_and_checkpoint(model, train, folder)
    dist.barrier()
    if cuda:
        model.cuda()

    loss = nn.CrossEntropyLoss(reduction="sum")
    test_x, test_y = train.tensors[0][:8], train.tensors[1][:8]
    if cuda:
        test_x, test_y = test_x.cuda(), test_y.cuda()

    # Each rank reads only its contiguous range of the 40 batches; results are gathered.
    tracin = TracInCP(model, train, folder, loss_fn=loss, batch_size=50,
                      sample_wise_grads_per_batch=True)  # fmt: skip
    top = tracin.influence((test_x,), test_y, k=5)
    suspicious = tracin.self_influence().argsort(descending=True)[:10]

    fast = TracInCPFast(model, "2", train, folder, loss_fn=loss, batch_size=50)
    scores = fast.influence((test_x,), test_y)  # (8, 2000), dataset order, on every rank

    # Each rank embeds and indexes its own shard; queries merge the per-rank top-k.
    index = TracInCPFastRandProj(model, "2", train, folder, loss_fn=loss, batch_size=50,
                                 projection_dim=16, seed=0)  # fmt: skip
    approx = index.influence((test_x,), test_y, k=5)

    if rank == 0:
        world = dist.get_world_size()
        print(f"{world} ranks; TracInCP proponents of test example 0: {top.indices[0].tolist()}")
        print(f"most self-influential training examples: {suspicious.tolist()}")
        print(f"TracInCPFast score matrix: {tuple(scores.shape)}")
        print(f"TracInCPFastRandProj proponents of test example 0: {approx.indices[0].tolist()}")
    # Shut down together: a rank that destroys its gloo group while another is still
    # printing was seen to abort at exit now and then ("terminate called without an
    # active exception", from torch's own threads), after correct results.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
