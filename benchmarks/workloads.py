"""Workloads shared by the benchmark scripts (seeded, synthetic data, no downloads).

CNN: conv(3->16, 3x3) -> pool -> conv(16->32, 3x3) -> pool -> fc(2048->64) -> fc(64->10)
on 3x32x32 inputs. Transformer: Embedding, one self-attention block with LayerNorm,
d=64, sequence length 32.

Everything runs on the CPU unless a script calls :func:`use_device` (``--device cuda``):
then the data sets are created on that device and scripts move their models there with
``.to(device())``; timed calls end with :func:`sync` so GPU work is counted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

_DEVICE = torch.device("cpu")


def use_device(name: str) -> torch.device:
    """Create later data sets on ``name`` ("cpu", "cuda", "cuda:1", ...)."""
    global _DEVICE
    wanted = torch.device(name)
    if wanted.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA device")
    _DEVICE = wanted
    return wanted


def device() -> torch.device:
    """The device chosen with :func:`use_device` (the CPU by default)."""
    return _DEVICE


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timings include it."""
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize(_DEVICE)


class BenchCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(32 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class BenchTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 64, seq: int = 32, n_classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, num_heads=4, batch_first=True)
        self.norm1 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm1(h + a)
        h = self.norm2(h + self.ff2(torch.relu(self.ff1(h))))
        return self.head(h.mean(dim=1))


def cnn_data(n_train: int = 2000, n_test: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    x, y = x.to(_DEVICE), y.to(_DEVICE)
    train = TensorDataset(x[:n_train], y[:n_train])
    return train, x[n_train:], y[n_train:]


def transformer_data(n_train: int = 1000, n_test: int = 32, seed: int = 0, seq: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 1000, (n_train + n_test, seq), generator=g)
    y = torch.randint(0, 4, (n_train + n_test,), generator=g)
    x, y = x.to(_DEVICE), y.to(_DEVICE)
    return TensorDataset(x[:n_train], y[:n_train]), x[n_train:], y[n_train:]


def make_checkpoints(
    model: nn.Module,
    train: TensorDataset,
    folder: Path,
    n: int = 3,
    seed: int = 0,
    lr: float = 0.01,
) -> list[str]:
    """Train ``model`` briefly with SGD and save ``n`` checkpoints (state dict + lr)."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
    paths = []
    for epoch in range(n):
        for i, (x, y) in enumerate(loader):
            if i >= 4:
                break
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        path = folder / f"checkpoint-{epoch}.pt"
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, path)
        paths.append(str(path))
    return paths


def set_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def median_over_processes(
    script: str, argv: list[str], processes: int, json_out: Path | None = None
) -> None:
    """Run ``script`` with ``argv`` in ``processes`` fresh processes; print median ratios.

    The script must accept ``--json PATH`` and write there a list of rows, each with
    ``operation`` and, for compared rows, ``ratio`` (optional: ``target``,
    ``lower_is_better``, and the seconds ``ours_s`` and ``captum_s``). ``--processes N``
    is removed from ``argv`` before forwarding.
    A single process can sit in one allocator state for its whole life (RESULTS.md), so
    the median over fresh processes is the figure to quote.
    """
    forwarded, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == "--processes":
            skip_next = True
        elif not arg.startswith("--processes="):
            forwarded.append(arg)
    runs: list[list[dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(processes):
            out = Path(tmp) / f"run-{n}.json"
            cmd = [sys.executable, script, *forwarded, "--json", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
            print(f"process {n + 1}/{processes} done")
    print(f"median over {processes} processes (range in brackets):")
    summary = []
    for i, first in enumerate(runs[0]):
        if "ratio" not in first:
            continue
        ratios = sorted(run[i]["ratio"] for run in runs)
        median = statistics.median(ratios)
        target = first.get("target")
        mark = ""
        if target is not None:
            # a cost row (lower is better) or a speed-up
            met = median <= target if first.get("lower_is_better") else median >= target
            mark = f" (target {target}: {'met' if met else 'MISSED'})"
        name = first["operation"]
        times = ""
        if "ours_s" in first and "captum_s" in first:
            ours = statistics.median(run[i]["ours_s"] for run in runs)
            theirs = statistics.median(run[i]["captum_s"] for run in runs)
            times = f"  (medians: ours {ours * 1e3:.1f} ms, captum {theirs * 1e3:.1f} ms)"
        print(f"  {name:<48} {median:5.2f}x  [{ratios[0]:.2f} - {ratios[-1]:.2f}]{mark}{times}")
        summary.append({"operation": name, "median": median, "ratios": ratios})
    if json_out:
        json_out.write_text(json.dumps(summary, indent=2))
