"""What a repeated call costs beyond its arithmetic, for a model with many weights.

A SimilarityInfluence object answers a query from its stored activations: one forward
pass of the test batch and a search. Around it, every call checks that the model still
has the weights the store was built for (its fingerprint) and guards the model (every
weight and buffer set aside and restored). For a 23M-parameter MLP, 2,000 source
examples and 16 test examples, this script times in one process, alternating:

* the repeated query as the library runs it (fingerprint kept between calls, rehashed
  only when the on-device digest changes);
* the same query with the digest switched off, so every call hashes all weights (what
  every call cost before the digest existed);
* the forward pass of the test batch alone, and the guard alone;
* a TracInCPFastRandProj query (k=5) over three checkpoint files of that model, with the
  default loader's memory-mapped reads and with ordinary reads.

Run: ``python benchmarks/bench_call_overhead.py [--repeats 15] [--device cuda]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proponents.checkpoints as checkpoints  # noqa: E402
import proponents.fingerprints as fingerprints  # noqa: E402
from proponents import SimilarityInfluence, TracInCPFastRandProj  # noqa: E402
from proponents.model_guard import preserved  # noqa: E402
from workloads import device, set_threads, sync, use_device  # noqa: E402


def _timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    use_device(args.device)
    set_threads()
    torch.manual_seed(0)
    dev = device()
    model = nn.Sequential(
        nn.Linear(512, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    ).to(dev)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(2000, 512, device=dev), torch.randint(0, 10, (2000,), device=dev)
    query = torch.randn(16, 512, device=dev)
    original_digest = fingerprints.quick_model_digest

    def without_digest(_model):
        return None

    with tempfile.TemporaryDirectory() as tmp:
        sim = SimilarityInfluence(model, ["4"], TensorDataset(x, y), tmp, batch_size=500)
        sim.influence(query, top_k=5)  # builds the store
        # a second object on the same store, so the two rows keep separate fingerprints
        hashing = SimilarityInfluence(model, ["4"], TensorDataset(x, y), tmp, batch_size=500)
        hashing._fingerprint = fingerprints.ModelFingerprints()  # not the model's shared one

        def query_call():
            sim.influence(query, top_k=5)

        def full_hash_call():
            fingerprints.quick_model_digest = without_digest
            try:
                hashing.influence(query, top_k=5)
            finally:
                fingerprints.quick_model_digest = original_digest

        def forward():
            with torch.no_grad():
                model(query)

        def guard():
            with preserved(model):
                pass

        paths, trained = [], copy.deepcopy(model)
        for c in range(3):
            with torch.no_grad():
                for p in trained.parameters():
                    p.mul_(1.01)
            paths.append(Path(tmp) / f"checkpoint-{c}.pt")
            state = {"model_state_dict": trained.state_dict(), "learning_rate": 0.01}
            torch.save(state, paths[-1])
        loss = nn.CrossEntropyLoss(reduction="sum")
        index = TracInCPFastRandProj(
            model, "6", TensorDataset(x, y), paths, loss_fn=loss, batch_size=500
        )
        time.sleep(2.5)  # past the window in which fresh checkpoint files are hashed again
        labels = torch.randint(0, 10, (16,), device=dev)

        def mapped_query():
            index.influence((query,), labels, k=5)

        def read_query():
            original = checkpoints.zipfile.is_zipfile
            checkpoints.zipfile.is_zipfile = lambda _path: False  # type: ignore[assignment]
            try:
                index.influence((query,), labels, k=5)
            finally:
                checkpoints.zipfile.is_zipfile = original

        rows = {
            "query": query_call,
            "full_hash": full_hash_call,
            "forward": forward,
            "guard": guard,
            "mapped": mapped_query,
            "read": read_query,
        }
        times: dict[str, list[float]] = {k: [] for k in rows}
        for fn in rows.values():
            fn()  # warm
        for _ in range(args.repeats):
            for name, fn in rows.items():
                times[name].append(_timed(fn))
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"{n_params / 1e6:.1f}M parameters on {dev}, medians of {args.repeats} alternating calls")
    print(f"repeated query:                     {med['query']:8.1f} ms")
    print(f"same, every call hashing all weights: {med['full_hash']:6.1f} ms")
    print(f"ratio:                              {med['full_hash'] / med['query']:8.2f}x")
    print(f"forward pass of the test batch:     {med['forward']:8.1f} ms")
    print(f"the guard alone:                    {med['guard']:8.1f} ms")
    print(f"RandProj query, mapped checkpoints: {med['mapped']:8.1f} ms")
    print(f"same, checkpoints read normally:    {med['read']:8.1f} ms")
    print(f"ratio:                              {med['read'] / med['mapped']:8.2f}x")


if __name__ == "__main__":
    main()
