"""Scale benchmark for TracInCPFastRandProj (issue 7): a million-example index on CPU.

N synthetic examples go through a small MLP (32 -> 64 -> 10; the final layer's gradient
has 65 x 10 = 650 entries) with projection_dim=64 and one checkpoint. For each N and mode
a fresh subprocess measures:

* construction time (embedding the training set; the default exact backend builds nothing);
* peak RSS (``VmHWM``) after construction, absolute and above the process's baseline
  (imports plus the synthetic data set, measured just before construction);
* query latency for 100 test examples with k=10: exact search, and Faiss ``Flat`` and
  ``IVF1024,Flat`` (nprobe 16) with their build times and the RSS they add.

Modes: ``memory`` (embeddings in RAM), ``disk`` (``memory_budget`` half the matrix, so
the matrix is memory-mapped from a scratch file; exact search only, since Faiss copies the
data into its own index) and ``disk-fp16`` (the same with ``index_dtype=torch.float16``).
Run ``python benchmarks/scale.py`` (N = 100,000 and 1,000,000) or
``--n`` to choose the larger N; ``--one N MODE`` runs a single measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_IN, HIDDEN, CLASSES, PROJ, K, N_TEST = 32, 64, 10, 64, 10, 100


def rss_now_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    """This process's own peak (VmHWM); ru_maxrss starts at the parent's size at fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_queries(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def one(n: int, mode: str) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from proponents import FaissNearestNeighbors, TracInCPFastRandProj
    from proponents.store import is_mapped

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    xt = torch.randn(N_TEST, D_IN, generator=g)
    yt = torch.randint(0, CLASSES, (N_TEST,), generator=g)
    tmp = Path(tempfile.mkdtemp())
    ckpt = tmp / "ckpt.pt"
    torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.1}, ckpt)
    matrix_mib = n * PROJ * 4 / 2**20
    half = mode == "disk-fp16"
    budget = None if mode == "memory" else int(n * PROJ * (2 if half else 4)) // 2
    base_rss, base_peak = rss_now_mib(), peak_mib()
    t0 = time.perf_counter()
    index = TracInCPFastRandProj(
        model,
        "2",
        TensorDataset(x, y),
        [ckpt],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=4096,
        projection_dim=PROJ,
        memory_budget=budget,
        index_dtype=torch.float16 if half else torch.float32,
    )
    build_s = time.perf_counter() - t0
    out = {
        "n": n,
        "mode": mode,
        "matrix_mib": matrix_mib / 2 if half else matrix_mib,
        "mapped": is_mapped(index.embeddings),
        "construction_s": build_s,
        "baseline_rss_mib": base_rss,
        "peak_rss_mib": peak_mib(),
        "peak_above_baseline_mib": peak_mib() - max(base_rss, 0),
        "baseline_peak_mib": base_peak,
    }
    out["exact_query_s"] = timed_queries(lambda: index.influence((xt,), yt, k=K))
    out["peak_after_exact_mib"] = peak_mib()
    exact = index.influence((xt,), yt, k=K)
    if mode == "memory":
        for factory, nprobe in (("Flat", None), ("IVF1024,Flat", 16)):
            backend = FaissNearestNeighbors(factory, nprobe=nprobe)
            t0 = time.perf_counter()
            backend.setup(index.embeddings)
            setup_s = time.perf_counter() - t0
            index.nearest_neighbors = backend
            q = timed_queries(lambda: index.influence((xt,), yt, k=K))
            found = index.influence((xt,), yt, k=K)
            recall = sum(
                len(set(a.tolist()) & set(b.tolist()))
                for a, b in zip(found.indices, exact.indices, strict=True)
            ) / (N_TEST * K)
            out[factory] = {
                "build_s": setup_s,
                "query_s": q,
                "recall_at_10": recall,
                "peak_rss_mib": peak_mib(),
            }
            del backend
            index.nearest_neighbors = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="the larger N (default 1M)")
    parser.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1])))
        return
    rows = []
    for n in sorted({min(100_000, args.n), args.n}):
        for mode in ("memory", "disk", "disk-fp16"):
            res = subprocess.run(
                [sys.executable, __file__, "--one", str(n), mode],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| N | mode | matrix | construction | per 1k ex. | peak RSS above baseline "
        "(x matrix) | exact 100xk=10 | Faiss Flat | Faiss IVF1024,Flat nprobe 16 (recall) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["peak_above_baseline_mib"] / r["matrix_mib"]
        flat = r.get("Flat")
        ivf = r.get("IVF1024,Flat")
        print(
            f"| {r['n']:,} | {r['mode']} | {r['matrix_mib']:.1f} MiB | "
            f"{r['construction_s']:.2f} s | {1000 * r['construction_s'] / r['n']:.3f} s | "
            f"{r['peak_above_baseline_mib']:.0f} MiB ({ratio:.2f}x) | "
            f"{1000 * r['exact_query_s']:.1f} ms | "
            + (f"{1000 * flat['query_s']:.1f} ms | " if flat else "- | ")
            + (f"{1000 * ivf['query_s']:.1f} ms ({ivf['recall_at_10']:.2f}) |" if ivf else "- |")
        )


if __name__ == "__main__":
    main()
