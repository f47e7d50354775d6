"""Where one call of ours spends its time, on any device: a cProfile of the Python side.

On a GPU the work is queued asynchronously, so the Python-level profile shows the
per-batch overhead that decides the wall time of small models (and any host-device
synchronisation, which appears as time inside the call that waits).

Usage: ``python benchmarks/profile_calls.py [--device cuda] [--top 25]``
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proponents  # noqa: E402
from workloads import BenchCNN, cnn_data, device, make_checkpoints, sync, use_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    use_device(args.device)
    torch.manual_seed(0)
    train, x_test, y_test = cnn_data()
    model = BenchCNN().to(device())
    ckpts = make_checkpoints(model, train, Path(tempfile.mkdtemp()))
    loss = nn.CrossEntropyLoss(reduction="sum")
    fast = proponents.TracInCPFast(model, "fc2", train, ckpts, loss_fn=loss, batch_size=128)
    tracin = proponents.TracInCP(
        model, train, ckpts, loss_fn=loss, batch_size=128, sample_wise_grads_per_batch=True
    )
    calls = {
        "TracInCPFast self-influence": lambda: fast.influence(),
        "TracInCPFast scores": lambda: fast.influence((x_test,), y_test),
        "TracInCP scores": lambda: tracin.influence((x_test,), y_test),
    }
    for name, call in calls.items():
        call()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        sync()
        wall = (time.perf_counter() - t0) / args.calls
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        sync()
        profile.disable()
        print(f"\n===== {name}: {wall * 1e3:.1f} ms per call on {device()} =====")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
