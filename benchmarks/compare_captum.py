"""Side-by-side timing of proponents and Captum on the same workloads, in one process.

Usage::

    pip install -e ".[bench]"
    python benchmarks/compare_captum.py            # CNN + transformer TracInCP, all ratios
    python benchmarks/compare_captum.py --memory   # 10,000 test x 20,000 train peak RSS

Every figure is the best of ``--repeats`` runs (default 2), measured with 2 threads.
Ratios are Captum's time divided by ours (higher is better for us). Scores of the two
libraries are checked to agree before any ratio is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proponents  # noqa: E402
from workloads import (  # noqa: E402
    BenchCNN,
    BenchTransformer,
    cnn_data,
    device,
    make_checkpoints,
    median_over_processes,
    set_threads,
    sync,
    transformer_data,
    use_device,
)


def synced(fn):
    """``fn`` followed by a wait for the GPU work it queued (a no-op on the CPU)."""

    def call():
        out = fn()
        sync()
        return out

    return call


def best_of(fn, repeats: int, warmup: bool = True):
    """Best wall time of ``repeats`` runs after one untimed warm-up run."""
    fn = synced(fn)
    best, out = float("inf"), None
    if warmup:
        fn()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def compare(ours_fn, theirs_fn, repeats: int):
    """Best times of ours and Captum's, runs alternating after one warm-up run of each.

    Alternating keeps slow drifts of the machine (other processes, frequency) from
    favouring whichever library happens to be timed first.
    """
    ours_fn, theirs_fn = synced(ours_fn), synced(theirs_fn)
    ours_out, theirs_out = ours_fn(), theirs_fn()
    best_ours = best_theirs = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours_out = ours_fn()
        t1 = time.perf_counter()
        theirs_out = theirs_fn()
        t2 = time.perf_counter()
        best_ours, best_theirs = min(best_ours, t1 - t0), min(best_theirs, t2 - t1)
    return best_ours, ours_out, best_theirs, theirs_out


def agree(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-3) -> None:
    a, b = a.double(), b.double()
    err = float((a - b).abs().max())
    scale = float(b.abs().max())
    status = "ok" if err <= rtol * scale else "MISMATCH"
    print(f"    agreement {what}: max |diff| {err:.3g} (scale {scale:.3g}) {status}")
    if status != "ok":
        raise SystemExit(f"scores disagree for {what}")


def captum_load(model: nn.Module, path: str) -> float:
    """Loader for Captum: its default expects a flat state dict without a learning rate."""
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model_state_dict"])
    return float(ckpt["learning_rate"])


def captum_neighbors():
    """Captum's default search (Annoy), or an exact one where annoy is not installed.

    Returns ``(nearest_neighbors argument, label)``; the exact stand-in implements
    Captum's ``NearestNeighbors`` interface with one matrix product and a top-k.
    """
    try:
        import annoy  # noqa: F401

        return None, "annoy"
    except ImportError:
        from captum.influence._utils.nearest_neighbors import NearestNeighbors

        class ExactForCaptum(NearestNeighbors):
            def setup(self, data: torch.Tensor) -> None:
                self.data = data.flatten(1)

            def get_nearest_neighbors(self, query: torch.Tensor, k: int):
                scores = query.flatten(1) @ self.data.T
                values, indices = scores.topk(k, dim=1)
                return indices, values

        return ExactForCaptum(), "exact"


def floor_pass(model: nn.Module, train) -> None:
    """One batched forward+backward pass over the training set (batch 128), the floor."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for x, y in torch.utils.data.DataLoader(train, batch_size=128):
        model.zero_grad()
        loss_fn(model(x), y).backward()
    model.zero_grad()


def forward_floor(model: nn.Module, train, ckpts: list[str]):
    """The fastest forward pass of the training set at every checkpoint, and nothing else.

    A last-layer self-influence call cannot do less than this: load each checkpoint and run
    the whole network forward on every training example (no autograd, no scoring). The
    pass shape (memory layout, sub-batch) is the fastest of six timed here, the same
    candidates our engine chooses from. Returns a function that runs one such pass.
    """
    work = copy.deepcopy(model)
    (x,) = train.tensors[:1]
    states = [torch.load(p, weights_only=True)["model_state_dict"] for p in ckpts]

    def run(layout: torch.memory_format, sub: int) -> None:
        with torch.inference_mode():
            for state in states:
                work.load_state_dict(state)
                work.to(memory_format=layout)
                for start in range(0, len(x), 128):
                    batch = x[start : start + 128].contiguous(memory_format=layout)
                    for part in batch.split(sub):
                        work(part)

    shapes = [(f, s) for f in (torch.contiguous_format, torch.channels_last) for s in (128, 64, 32)]
    timed = {shape: best_of(lambda shape=shape: run(*shape), 2)[0] for shape in shapes}
    fastest = min(timed, key=timed.__getitem__)
    print(f"    forward floor shape: {fastest[0]}, sub-batch {fastest[1]}")
    return lambda: run(*fastest)


def row(name: str, ours: float, theirs: float, target: float | None = None) -> dict:
    ratio = theirs / ours
    mark = (
        ""
        if target is None
        else f" (target >= {target:.0f}x: {'met' if ratio >= target else 'MISSED'})"
    )
    print(f"  {name:<48} ours {ours:8.3f}s  captum {theirs:8.3f}s  ratio {ratio:6.1f}x{mark}")
    return {"operation": name, "ours_s": ours, "captum_s": theirs, "ratio": ratio, "target": target}


def cnn_benchmark(repeats: int, workdir: Path, skip_default: bool) -> list[dict]:
    from captum.influence import TracInCP as CaptumTracInCP

    print("CNN workload: 2,000 train / 64 test, 3 checkpoints, batch 128, CE(sum)")
    torch.manual_seed(0)
    train, x_test, y_test = cnn_data()
    model = BenchCNN().to(device())
    ckpts = make_checkpoints(model, train, workdir / "cnn")
    loss = nn.CrossEntropyLoss(reduction="sum")
    ours = proponents.TracInCP(
        model, train, ckpts, loss_fn=loss, batch_size=128, sample_wise_grads_per_batch=True
    )
    theirs = CaptumTracInCP(
        model,
        train,
        ckpts,
        captum_load,
        loss_fn=loss,
        batch_size=128,
        sample_wise_grads_per_batch=True,
    )
    results = []
    t_ours, s_ours, t_cap, s_cap = compare(
        lambda: ours.influence((x_test,), y_test),
        lambda: theirs.influence((x_test, y_test)),
        repeats,
    )
    agree(s_ours, s_cap, "influence scores")
    results.append(row("TracInCP scores vs sample-wise", t_ours, t_cap, 4))
    tk_ours, k_ours, tk_cap, k_cap = compare(
        lambda: ours.influence((x_test,), y_test, k=10),
        lambda: theirs.influence((x_test, y_test), k=10),
        repeats,
    )
    agree(k_ours.influence_scores, k_cap.influence_scores, "k-most scores")
    results.append(row("TracInCP k-most (k=10) vs sample-wise", tk_ours, tk_cap, 4))
    ts_ours, si_ours, ts_cap, si_cap = compare(
        lambda: ours.influence(), lambda: theirs.self_influence(), repeats
    )
    agree(si_ours, si_cap, "self-influence")
    results.append(row("TracInCP self-influence vs sample-wise", ts_ours, ts_cap, 4))

    if not skip_default:
        default = CaptumTracInCP(
            model,
            train,
            ckpts,
            captum_load,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            batch_size=128,
            sample_wise_grads_per_batch=False,
        )
        td_cap, sd_cap = best_of(lambda: default.influence((x_test, y_test)), 2, warmup=False)
        agree(s_ours, sd_cap, "scores vs default path")
        results.append(row("TracInCP scores vs default path", t_ours, td_cap, 20))
        tdk_cap, _ = best_of(lambda: default.influence((x_test, y_test), k=10), 2, warmup=False)
        results.append(row("TracInCP k-most (k=10) vs default path", tk_ours, tdk_cap, 20))

    # the floor and our scores call, alternating, so both see the same machine
    floor, _, t_again, _ = compare(
        lambda: floor_pass(model, train), lambda: ours.influence((x_test,), y_test), repeats
    )
    per_ckpt = min(t_ours, t_again) / len(ckpts)
    print(
        f"  floor: one batched fwd+bwd over the training set {floor:.3f}s; ours per checkpoint "
        f"{per_ckpt:.3f}s = {per_ckpt / floor:.2f}x the floor (target <= 1.5x)"
    )
    results.append(
        {
            "operation": "cost per checkpoint / batched fwd+bwd",
            "ratio": per_ckpt / floor,
            "ours_s": per_ckpt,
            "floor_s": floor,
            "target": 1.5,
            "lower_is_better": True,
        }
    )
    return results


def fast_benchmark(repeats: int, workdir: Path) -> list[dict]:
    from captum.influence import TracInCPFast as CaptumFast
    from captum.influence import TracInCPFastRandProj as CaptumRandProj

    print("Last-layer methods, CNN workload (final layer fc2)")
    torch.manual_seed(0)
    train, x_test, y_test = cnn_data()
    model = BenchCNN().to(device())
    ckpts = make_checkpoints(model, train, workdir / "fast")
    loss = nn.CrossEntropyLoss(reduction="sum")
    ours = proponents.TracInCPFast(model, "fc2", train, ckpts, loss_fn=loss, batch_size=128)
    theirs = CaptumFast(model, model.fc2, train, ckpts, captum_load, loss_fn=loss, batch_size=128)
    results = []
    t_o, _, t_c, _ = compare(
        lambda: ours.influence((x_test,), y_test),
        lambda: theirs.influence((x_test, y_test)),
        repeats,
    )
    # Captum drops the bias gradient; compare weight-only scores through TracInCP(layers)
    print("    (Captum's TracInCPFast omits the bias term; its scores differ from ours by design)")
    results.append(row("TracInCPFast scores", t_o, t_c, 3))
    t_o, _, t_c, _ = compare(lambda: ours.influence(), lambda: theirs.self_influence(), repeats)
    results.append(row("TracInCPFast self-influence", t_o, t_c, 3))
    # how close a forward-bound call can get: the floor, ours and Captum's, alternating
    floor = forward_floor(model, train, ckpts)
    t_f, _, t_o2, _ = compare(floor, lambda: ours.influence(), repeats)
    t_f2, _, t_c2, _ = compare(floor, lambda: theirs.self_influence(), repeats)
    t_f = min(t_f, t_f2)
    print(
        f"  forward floor {t_f:.3f}s: ours {min(t_o, t_o2) / t_f:.2f}x it, Captum "
        f"{min(t_c, t_c2) / t_f:.2f}x it (the most a forward-bound call can gain)"
    )
    results.append(
        {
            "operation": "TracInCPFast self-influence / forward floor",
            "ratio": min(t_o, t_o2) / t_f,
            "ours_s": min(t_o, t_o2),
            "floor_s": t_f,
            "lower_is_better": True,
        }
    )
    results.append(
        {
            "operation": "Captum self-influence / forward floor (ceiling)",
            "ratio": min(t_c, t_c2) / t_f,
            "captum_s": min(t_c, t_c2),
            "floor_s": t_f,
        }
    )

    neighbors, search = captum_neighbors()

    t_o, rp_o, t_c, rp_c = compare(
        lambda: proponents.TracInCPFastRandProj(
            model,
            "fc2",
            train,
            ckpts,
            loss_fn=loss,
            batch_size=128,
            nearest_neighbors=proponents.ExactNearestNeighbors(),
            projection_dim=100,
        ),
        lambda: CaptumRandProj(
            model,
            model.fc2,
            train,
            ckpts,
            captum_load,
            loss_fn=loss,
            batch_size=128,
            projection_dim=100,
            nearest_neighbors=neighbors,
        ),
        repeats,
    )
    results.append(row("TracInCPFastRandProj construction (dim 100)", t_o, t_c, 2))
    t_o, _, t_c, _ = compare(
        lambda: rp_o.influence((x_test,), y_test, k=10),
        lambda: rp_c.influence((x_test, y_test), k=10),
        repeats,
    )
    results.append(row(f"TracInCPFastRandProj query k=10 (exact vs {search})", t_o, t_c, 1))
    return results


def fidelity_benchmark(workdir: Path, dims=(16, 64, 256), seeds=5) -> list[dict]:
    from captum.influence import TracInCPFastRandProj as CaptumRandProj

    print("Projection fidelity: mean correlation of projected with exact scores, 5 seeds")
    torch.manual_seed(0)
    train, x_test, y_test = cnn_data(n_train=1000)
    model = BenchCNN().to(device())
    ckpts = make_checkpoints(model, train, workdir / "fid")
    loss = nn.CrossEntropyLoss(reduction="sum")
    # Both libraries compared with their own exact (unprojected) scores.
    exact_o = proponents.TracInCPFastRandProj(
        model, "fc2", train, ckpts, loss_fn=loss, batch_size=128
    ).influence((x_test,), y_test, k=None)
    neighbors, _ = captum_neighbors()
    exact_c = CaptumRandProj(
        model,
        model.fc2,
        train,
        ckpts,
        captum_load,
        loss_fn=loss,
        batch_size=128,
        nearest_neighbors=neighbors,
    ).influence((x_test, y_test), k=None)

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    results = []
    for dim in dims:
        ours, theirs = [], []
        for seed in range(seeds):
            s = proponents.TracInCPFastRandProj(
                model,
                "fc2",
                train,
                ckpts,
                loss_fn=loss,
                batch_size=128,
                projection_dim=dim,
                seed=seed,
            ).influence((x_test,), y_test, k=None)
            ours.append(corr(s, exact_o))
            c = CaptumRandProj(
                model,
                model.fc2,
                train,
                ckpts,
                captum_load,
                loss_fn=loss,
                batch_size=128,
                projection_dim=dim,
                seed=seed,
                nearest_neighbors=neighbors,
            )
            theirs.append(corr(c.influence((x_test, y_test), k=None), exact_c))
        mo, mc = sum(ours) / seeds, sum(theirs) / seeds
        print(
            f"  projection_dim {dim:4d}: ours {mo:.3f}  captum {mc:.3f}  "
            f"({'met' if mo >= mc else 'MISSED'})"
        )
        results.append({"operation": f"fidelity dim {dim}", "ours": mo, "captum": mc})
    return results


INDEX_CHILD = r"""
import sys, json, time, torch, torch.nn as nn
sys.path.insert(0, {bench!r})
from workloads import BenchCNN, cnn_data, set_threads
set_threads(2)
import proponents
train, x, y = cnn_data(n_train={n}, n_test=8)
model = BenchCNN()
ckpts = json.loads({ckpts!r})
loss = nn.CrossEntropyLoss(reduction="sum")
t0 = time.perf_counter()
if {mode!r} == "build":
    rp = proponents.TracInCPFastRandProj(model, "fc2", train, ckpts, loss_fn=loss,
                                         batch_size=256, projection_dim=100)
    rp.save({path!r})
else:
    rp = proponents.TracInCPFastRandProj.load({path!r}, model, ckpts, loss, train_dataset=train)
elapsed = time.perf_counter() - t0
rp.influence((x,), y, k=10)
print(json.dumps({{"seconds": elapsed, "n": int(rp.embeddings.shape[0])}}))
"""


def index_load_benchmark(workdir: Path, n: int = 100_000) -> list[dict]:
    print(f"Saved TracInCPFastRandProj index of {n:,} examples: load vs construct")
    train, _, _ = cnn_data(n_train=2000)
    ckpts = make_checkpoints(BenchCNN(), train, workdir / "idx")
    out = {}
    for mode in ("build", "load"):
        code = INDEX_CHILD.format(
            bench=str(Path(__file__).resolve().parent),
            n=n,
            ckpts=json.dumps(ckpts),
            mode=mode,
            path=str(workdir / "index"),
        )
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])["seconds"]
    ratio = out["build"] / out["load"]
    print(
        f"  construct + save {out['build']:.2f}s, load {out['load']:.2f}s: {ratio:.1f}x "
        f"(target >= 10x: {'met' if ratio >= 10 else 'MISSED'})"
    )
    return [{"operation": "index load vs construct (100k)", "ratio": ratio, **out}]


def transformer_benchmark(repeats: int, workdir: Path) -> list[dict]:
    from captum.influence import TracInCP as CaptumTracInCP

    print("Transformer workload: 1,000 train / 32 test, 3 checkpoints, d=64, seq 32")
    torch.manual_seed(0)
    train, x_test, y_test = transformer_data()
    model = BenchTransformer().to(device())
    ckpts = make_checkpoints(model, train, workdir / "tf")
    ours = proponents.TracInCP(
        model, train, ckpts, loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=128
    )
    theirs = CaptumTracInCP(
        model,
        train,
        ckpts,
        captum_load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=128,
    )
    t_ours, s_ours = best_of(lambda: ours.influence((x_test,), y_test), repeats)
    t_cap, s_cap = best_of(lambda: theirs.influence((x_test, y_test)), 2, warmup=False)
    agree(s_ours, s_cap, "transformer scores", rtol=2e-3)
    return [row("Transformer TracInCP scores vs default path", t_ours, t_cap, 10)]


RSS_CHILD = r"""
import sys, json, resource, torch
from pathlib import Path
sys.path.insert(0, {bench!r})
from workloads import BenchCNN, cnn_data, set_threads
set_threads(2)
import torch.nn as nn
lib = {lib!r}
train, x, y = cnn_data(n_train={n_train}, n_test={n_test})
model = BenchCNN()
ckpts = json.loads({ckpts!r})
loss = nn.CrossEntropyLoss(reduction="sum")
def hwm_kib():
    # VmHWM: this process's own peak. ru_maxrss would start at the parent's resident size
    # at fork time (Linux keeps it across exec), which decides the figure once the parent
    # is larger than the child will ever be.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = hwm_kib()
if lib == "ours":
    import proponents
    t = proponents.TracInCP(model, train, ckpts, loss_fn=loss, batch_size=128,
                            sample_wise_grads_per_batch=True)
    s = t.influence((x,), y)
else:
    from captum.influence import TracInCP
    def load(m, p):
        c = torch.load(p, weights_only=True)
        m.load_state_dict(c["model_state_dict"])
        return c["learning_rate"]
    t = TracInCP(model, train, ckpts, load, loss_fn=loss, batch_size=128,
                 sample_wise_grads_per_batch=True)
    s = t.influence((x, y))
print(json.dumps({{"peak_mb": hwm_kib() / 1024,
                  "before_mb": base / 1024, "shape": list(s.shape)}}))
"""


def peak_rss(lib: str, ckpts: list[str], n_train: int, n_test: int) -> dict:
    code = RSS_CHILD.format(
        bench=str(Path(__file__).resolve().parent),
        lib=lib,
        n_train=n_train,
        n_test=n_test,
        ckpts=json.dumps(ckpts),
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_benchmark(workdir: Path) -> list[dict]:
    print("Peak RSS, CNN workload (separate processes)")
    train, _, _ = cnn_data()
    ckpts = make_checkpoints(BenchCNN(), train, workdir / "rss")
    ours = peak_rss("ours", ckpts, 2000, 64)
    theirs = peak_rss("captum", ckpts, 2000, 64)
    print(
        f"  peak RSS ours {ours['peak_mb']:.0f} MB, captum {theirs['peak_mb']:.0f} MB "
        f"(target: ours <= captum: {'met' if ours['peak_mb'] <= theirs['peak_mb'] else 'MISSED'})"
    )
    return [
        {
            "operation": "peak RSS MB (ours, captum)",
            "ours": ours["peak_mb"],
            "captum": theirs["peak_mb"],
        }
    ]


def memory_benchmark(workdir: Path) -> None:
    print("Memory: 10,000 test x 20,000 train on the benchmark CNN, 1 checkpoint")
    train, _, _ = cnn_data(n_train=2000)
    ckpts = make_checkpoints(BenchCNN(), train, workdir / "mem", n=1)
    t0 = time.perf_counter()
    ours = peak_rss("ours", ckpts, 20000, 10000)
    print(
        f"  peak RSS {ours['peak_mb']:.0f} MB (target < 4096 MB), scores {ours['shape']}, "
        f"{time.perf_counter() - t0:.0f}s"
    )


def across_processes(args: argparse.Namespace) -> None:
    """Run this script ``args.processes`` times and summarise each row's ratio."""
    median_over_processes(__file__, sys.argv[1:], args.processes, args.json)


SECTIONS = ["cnn", "transformer", "rss", "fast", "fidelity", "index"]


def each_section_apart(args: argparse.Namespace) -> None:
    """Run every section in a fresh process of its own, one after the other.

    What one section leaves in the process (a heap grown and fragmented by Captum's
    per-example loop, say) changes the speed of the next: the last-layer rows measured
    2.5x instead of 3.3x after the TracInCP section in one process.
    """
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SECTIONS:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--only", name, "--json", str(out)]
            cmd += ["--repeats", str(args.repeats), "--device", args.device]
            if args.skip_default:
                cmd.append("--skip-default")
            subprocess.run(cmd, check=True)
            results += json.loads(out.read_text())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="run the 10k x 20k memory check")
    parser.add_argument(
        "--skip-default",
        action="store_true",
        help="skip Captum's slow default (per-example loop) path",
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        default=None,
        help="run one section here; without it every section runs in a process of its own",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    parser.add_argument(
        "--device",
        default="cpu",
        help="run the in-process workloads (cnn, transformer, fast, fidelity) here, e.g. "
        "cuda; the subprocess ones (rss, index, --memory) always use the CPU",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the chosen comparisons in this many fresh processes and report the median "
        "ratio and its range (allocator state differs between processes; see RESULTS.md)",
    )
    args = parser.parse_args()
    if args.processes > 1:
        across_processes(args)
        return
    if args.only is None and not args.memory:
        each_section_apart(args)
        return
    set_threads(2)
    use_device(args.device)
    print(f"device {device()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.memory:
            memory_benchmark(work)
            return
        results = []
        if args.only in (None, "cnn"):
            results += cnn_benchmark(args.repeats, work, args.skip_default)
        if args.only in (None, "transformer"):
            results += transformer_benchmark(args.repeats, work)
        if args.only in (None, "rss"):
            results += rss_benchmark(work)
        if args.only in (None, "fast"):
            results += fast_benchmark(args.repeats, work)
        if args.only in (None, "fidelity"):
            results += fidelity_benchmark(work)
        if args.only in (None, "index"):
            results += index_load_benchmark(work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
