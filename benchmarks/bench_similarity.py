"""SimilarityInfluence: proponents vs captum.influence, side by side in one process.

Default mode: the benchmark CNN, layers conv2 and fc1, 2,000 source / 64 test examples,
top_k=10, batch size 128, 2 threads. Each library is timed on

* a first call with an empty activation directory (activations computed and stored),
* a repeated call on the same object (stored activations reused),

taking the best of ``--repeats`` runs (the libraries alternate, so both see the same
machine load). The two answers are compared: indices where the scores are not tied,
and the scores themselves.

``--large``: 100,000 source examples of a 512-wide layer (a model mapping 32 inputs to
512 features; its 10-wide output layer is searched too, because captum cannot be given a
single layer), each phase in a fresh subprocess; reports the peak resident memory
above what the process held once the model and the data were in memory.

``--metric euclidean``: the same comparison with Euclidean distance, nearest first.

``--processes N``: the default comparison in N fresh processes, with the median ratio and
its range (the figures RESULTS.md quotes).

Run: ``python benchmarks/bench_similarity.py [--repeats 3] [--processes 5] [--large]
[--metric euclidean] [--device cuda]``
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
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proponents.influence.similarity import SimilarityInfluence  # noqa: E402
from workloads import (  # noqa: E402
    BenchCNN,
    cnn_data,
    device,
    median_over_processes,
    set_threads,
    sync,
    use_device,
)

LAYERS = ["conv2", "fc1"]


def _captum():
    try:
        from captum.influence import SimilarityInfluence as CaptumSimilarity
    except ImportError as exc:  # pragma: no cover
        raise SystemExit(
            "captum is needed for the comparison: pip install 'proponents[bench]'"
        ) from exc
    return CaptumSimilarity


def _captum_runs_on(make, inputs, top_k) -> bool:
    """Whether captum's SimilarityInfluence answers on these (GPU) inputs at all."""
    try:
        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make(folder).influence(inputs, top_k=top_k)
    except RuntimeError as err:
        print(f"captum's SimilarityInfluence fails on {inputs.device}: {err}")
        return False
    return True


def main_ours_only(make, inputs, top_k, repeats: int) -> None:
    """Time our first and repeated calls alone (when captum cannot run here)."""
    first, again = [], []
    for _ in range(repeats):
        f, a, _, _ = _time_pair(make, inputs, top_k)
        first.append(f)
        again.append(a)
    print(
        f"device {device()}, torch {torch.__version__}, best of {repeats}: proponents first "
        f"call {min(first) * 1e3:.1f} ms, repeated call {min(again) * 1e3:.1f} ms"
    )


def _time_pair(make, inputs, top_k):
    """(first-call seconds, repeated-call seconds, first result, repeated result)."""
    with tempfile.TemporaryDirectory() as folder:
        obj = make(folder)
        sync()
        t0 = time.perf_counter()
        first = obj.influence(inputs, top_k=top_k)
        sync()
        t1 = time.perf_counter()
        again = obj.influence(inputs, top_k=top_k)
        sync()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, first, again


def _agreement(ours, theirs, tol=1e-5):
    """Fraction of matching indices among untied positions, and max score difference."""
    report = {}
    for layer in LAYERS:
        i_a, v_a = ours[layer]
        i_b, v_b = theirs[layer]
        v_a, v_b = v_a.double().cpu(), v_b.double().cpu()
        gaps = (v_a[:, 1:] - v_a[:, :-1]).abs()
        untied = torch.ones_like(v_a, dtype=torch.bool)
        untied[:, 1:] &= gaps > tol
        untied[:, :-1] &= gaps > tol
        same = (i_a.cpu() == i_b.cpu())[untied]
        report[layer] = {
            "untied_index_agreement": float(same.float().mean()) if same.numel() else 1.0,
            "max_score_diff": float((v_a - v_b).abs().max()),
        }
    return report


def _metric_arguments(metric: str) -> tuple[dict, dict]:
    """Keyword arguments selecting ``metric`` for ours and for captum."""
    if metric == "cosine":
        return {}, {}
    from captum.influence._core.similarity_influence import euclidean_distance as theirs

    from proponents import euclidean_distance as ours

    pick = {"similarity_direction": "min"}
    return {"similarity_metric": ours, **pick}, {"similarity_metric": theirs, **pick}


def main_compare(repeats: int, json_out: Path | None = None, metric: str = "cosine") -> None:
    set_threads(2)
    torch.manual_seed(0)
    model = BenchCNN().to(device()).eval()
    train, test_x, _ = cnn_data(2000, 64)
    captum_cls = _captum()
    top_k = 10
    ours_metric, captum_metric = _metric_arguments(metric)

    def make_ours(folder):
        return SimilarityInfluence(model, LAYERS, train, folder, batch_size=128, **ours_metric)

    def make_captum(folder):
        return captum_cls(model, LAYERS, train, folder, batch_size=128, **captum_metric)

    if device().type == "cuda" and not _captum_runs_on(make_captum, test_x, top_k):
        main_ours_only(make_ours, test_x, top_k, repeats)
        return

    times = {"captum": ([], []), "proponents": ([], [])}
    results = {}
    for _ in range(repeats):
        for name, make in (("captum", make_captum), ("proponents", make_ours)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                first, again, r1, r2 = _time_pair(make, test_x, top_k)
            times[name][0].append(first)
            times[name][1].append(again)
            results[name] = r2
    best = {name: (min(f), min(a)) for name, (f, a) in times.items()}
    print(
        f"device {device()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"metric {metric}, best of {repeats}"
    )
    print(f"{'':12s} {'first call':>12s} {'repeated':>12s}")
    for name, (f, a) in best.items():
        print(f"{name:12s} {f * 1e3:10.1f}ms {a * 1e3:10.1f}ms")
    ratio_first = best["captum"][0] / best["proponents"][0]
    ratio_again = best["captum"][1] / best["proponents"][1]
    targets = "   (targets 2x, 5x)" if metric == "cosine" else ""
    print(f"{'speed-up':12s} {ratio_first:11.2f}x {ratio_again:11.2f}x{targets}")
    print(
        "all runs (s):",
        json.dumps({k: [[round(x, 4) for x in v] for v in t] for k, t in times.items()}),
    )
    print(
        "agreement with captum:", json.dumps(_agreement(results["proponents"], results["captum"]))
    )
    if json_out is not None:
        rows = [
            {
                "operation": name,
                "ours_s": best["proponents"][i],
                "captum_s": best["captum"][i],
                "ratio": best["captum"][i] / best["proponents"][i],
                # the targets of issue 5 are for the default (cosine) comparison
                "target": target if metric == "cosine" else None,
            }
            for i, (name, target) in enumerate(
                (("first call (empty activation directory)", 2), ("repeated call", 5))
            )
        ]
        json_out.write_text(json.dumps(rows))


# ------------------------------------------------------------------------------ large


class Wide(nn.Module):
    """32 inputs -> 512 features -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 512)
        self.act = nn.ReLU()
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


def _rss_now_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    """This process's own peak (VmHWM); ru_maxrss starts at the parent's size at fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def large_phase(phase: str, library: str, folder: str, n: int) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    set_threads(2)
    torch.manual_seed(0)
    model = Wide().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    data = TensorDataset(x, y)
    test = torch.randn(64, 32, generator=g)
    with torch.no_grad():
        model(x[:1000])  # allocator and kernels warmed up before the baseline
    if library == "captum":
        cls = _captum()
    else:
        cls = SimilarityInfluence
    # captum fails on any single layer (a str or a list of one), so both libraries get
    # "fc" plus the 10-wide "head", which adds 2% to the data
    obj = cls(model, ["fc", "head"], data, folder, batch_size=1000)
    base = _rss_now_kib()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj.influence(test, top_k=10, load_src_from_disk=True)
    seconds = time.perf_counter() - t0
    peak = _peak_kib()
    print(
        json.dumps(
            {
                "library": library,
                "phase": phase,
                "seconds": round(seconds, 3),
                "baseline_mib": round(base / 1024, 1),
                "peak_above_baseline_mib": round(max(0, peak - base) / 1024, 1),
            }
        )
    )


def main_large(n: int, with_captum: bool) -> None:
    libraries = ["proponents"] + (["captum"] if with_captum else [])
    print(
        f"{n} source examples x 512 features (float32: {n * 512 * 4 / 2**20:.0f} MiB), "
        "64 test, top_k=10"
    )
    for library in libraries:
        with tempfile.TemporaryDirectory() as folder:
            for phase in ("first", "repeated"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--phase",
                        phase,
                        "--library",
                        library,
                        "--dir",
                        folder,
                        "--n",
                        str(n),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "2"},
                )
                print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--with-captum", action="store_true", help="also measure captum in --large")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="device of the default comparison")
    parser.add_argument("--json", type=Path, default=None, help="write the ratios as JSON here")
    parser.add_argument(
        "--metric",
        choices=["cosine", "euclidean"],
        default="cosine",
        help="the similarity of the default comparison (euclidean: nearest first)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the default comparison in this many fresh processes and report the median "
        "ratio and its range",
    )
    args = parser.parse_args()
    use_device(args.device)
    if args.processes > 1:
        median_over_processes(__file__, sys.argv[1:], args.processes, args.json)
    elif args.phase:
        large_phase(args.phase, args.library, args.dir, args.n)
    elif args.large:
        main_large(args.n, args.with_captum)
    else:
        main_compare(max(2, args.repeats), args.json, args.metric)
