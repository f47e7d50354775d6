"""Where TracInCP's time goes, per stage and per layer, on the CNN benchmark workload.

Usage::

    python benchmarks/profile_tracincp.py

Times one pass over the 2,000 training examples at one checkpoint (best of 3), split
into: data loading, the recorded forward+backward pass, per-layer representation
(per-example gradients or factors), squared norms and inner products with 64 test
examples; and, for comparison, the floor (one batched forward+backward pass with
parameter gradients) and a forward pass alone.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proponents  # noqa: E402
from proponents.data import split_batch  # noqa: E402
from proponents.gradients import hooked  # noqa: E402
from workloads import BenchCNN, cnn_data, make_checkpoints, set_threads  # noqa: E402


def main() -> None:
    set_threads(2)
    train, x_test, y_test = cnn_data()
    model = BenchCNN().eval()
    ckpts = make_checkpoints(model, train, Path(tempfile.mkdtemp()))
    tracin = proponents.TracInCP(
        model,
        train,
        ckpts,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=128,
        sample_wise_grads_per_batch=True,
    )
    tracin.influence((x_test,), y_test)  # tunes and checks the per-layer strategies
    engine = tracin._engine
    print(
        "strategies:",
        {
            la.name: la.kind + (f"/{la.method}" if la.kind == "conv" else "/factored")
            for la in engine.hooked
        },
    )
    batches = [split_batch(b) for b in tracin.train_dataloader]
    test = split_batch((x_test, y_test))
    params, _ = engine._state()
    test_rep = engine.compute(test)
    best: dict[str, float] = {}
    for _ in range(3):
        t: dict[str, float] = {}

        def timed(key, fn):
            start = time.perf_counter()
            out = fn()
            t[key] = t.get(key, 0.0) + time.perf_counter() - start
            return out

        timed("data loading", lambda: [split_batch(b) for b in tracin.train_dataloader])
        for b in batches:
            rec, _ = timed(
                "forward + backward (recorded)",
                lambda b=b: hooked.record(model, engine.hooked, engine.loss, b),
            )
            reps = [
                timed(
                    f"per-example grads {la.name}",
                    lambda la=la, b=b: hooked.represent(la, model, rec[la.name], b.size, params),
                )
                for la in engine.hooked
            ]
            timed("inner products (64 test)", lambda reps=reps: engine.dot(test_rep, reps))
            timed("squared norms", lambda reps=reps: engine.sq_norm(reps))

        def floor():
            for b in batches:
                model.zero_grad()
                nn.functional.cross_entropy(model(*b.inputs), b.labels, reduction="sum").backward()
            model.zero_grad()

        def forward():
            with torch.no_grad():
                for b in batches:
                    model(*b.inputs)

        timed("FLOOR: batched forward+backward", floor)
        timed("forward only", forward)
        for k, v in t.items():
            best[k] = min(best.get(k, float("inf")), v)
    floor_s = best["FLOOR: batched forward+backward"]
    ours = sum(
        v
        for k, v in best.items()
        if k not in ("FLOOR: batched forward+backward", "forward only", "squared norms")
    )
    print(f"{'stage':<40} {'ms':>8} {'x floor':>8}")
    for k, v in best.items():
        print(f"{k:<40} {v * 1000:8.1f} {v / floor_s:8.2f}")
    print(f"{'TracInCP influence, one checkpoint':<40} {ours * 1000:8.1f} {ours / floor_s:8.2f}")


if __name__ == "__main__":
    main()
