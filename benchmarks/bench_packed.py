"""Packed text batches: proponents vs captum.influence, side by side in one process.

The workload of PyTorch's text-classification tutorial in small: an ``nn.EmbeddingBag``
(vocabulary 5,000, width 64) and two linear layers over bags of 5 to 40 tokens, batches
packed by a ``collate_fn`` (all tokens concatenated, with offsets). 1,000 training and 32
test texts, 3 checkpoints, batch size 64. Captum scores such batches on its
``sample_wise_grads_per_batch=False`` path, one backward pass per example; proponents
vectorises those backward passes over the examples of a batch.

Timed, best of ``--repeats`` (the libraries alternate):

* TracInCP scores (32 x 1,000), every parameter;
* TracInCP self-influence of the training set;
* TracInCPFast scores on the final layer (Captum's leaves out the bias, ours has it).

The TracInCP scores are compared (they must agree to float32 round-off).

Run: ``python benchmarks/bench_packed.py [--repeats 3] [--processes 5]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proponents import TracInCP, TracInCPFast  # noqa: E402
from workloads import median_over_processes, set_threads  # noqa: E402

VOCAB, WIDTH, CLASSES = 5000, 64, 4


class BagClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, WIDTH, mode="mean")
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.fc = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(self.bag(tokens, offsets))))


def texts(n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 41, (n,), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return [
        (torch.randint(0, VOCAB, (int(length),), generator=g), int(label))
        for length, label in zip(lengths, labels)
    ]


def pack(batch):
    tokens = [t for t, _ in batch]
    offsets = torch.tensor([0] + [len(t) for t in tokens[:-1]]).cumsum(0)
    return torch.cat(tokens), offsets, torch.tensor([label for _, label in batch])


def _load(model: nn.Module, path: str) -> float:
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model_state_dict"])
    return float(state["learning_rate"])


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(repeats: int) -> list[dict]:
    from captum.influence import TracInCP as CaptumTracInCP
    from captum.influence import TracInCPFast as CaptumTracInCPFast

    set_threads(2)
    torch.manual_seed(0)
    model = BagClassifier()
    train = DataLoader(texts(1000, 1), batch_size=64, collate_fn=pack)
    tokens, offsets, labels = pack(texts(32, 2))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for c in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            path = f"{tmp}/ckpt-{c}.pt"
            torch.save({"model_state_dict": model.state_dict(), "learning_rate": 0.1}, path)
            paths.append(path)
        per_example = nn.CrossEntropyLoss(reduction="none")
        total = nn.CrossEntropyLoss(reduction="sum")
        ours = TracInCP(model, train, paths, _load, loss_fn=per_example)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = CaptumTracInCP(model, train, paths, _load, loss_fn=per_example)
            ours_fast = TracInCPFast(model, "fc", train, paths, _load, loss_fn=total)
            theirs_fast = CaptumTracInCPFast(model, model.fc, train, paths, _load, loss_fn=total)
            cases = [
                (
                    "TracInCP scores (32 x 1,000)",
                    lambda: ours.influence((tokens, offsets), labels, k=None),
                    lambda: theirs.influence((tokens, offsets, labels), k=None),
                ),
                (
                    "TracInCP self-influence (1,000)",
                    ours.self_influence,
                    lambda: theirs.self_influence(None),
                ),
                (
                    "TracInCPFast scores (32 x 1,000)",
                    lambda: ours_fast.influence((tokens, offsets), labels, k=None),
                    lambda: theirs_fast.influence((tokens, offsets, labels), k=None),
                ),
            ]
            for name, mine, captum in cases:
                ours_s, got = _best(mine, repeats)
                captum_s, want = _best(captum, repeats)
                row = {
                    "operation": name,
                    "ours_s": ours_s,
                    "captum_s": captum_s,
                    "ratio": captum_s / ours_s,
                }
                if not name.startswith("TracInCPFast"):  # Captum's leaves out the bias
                    row["max_abs_diff"] = float((got - want).abs().max())
                rows.append(row)
                print(
                    f"{name}: ours {ours_s * 1e3:.1f} ms, Captum {captum_s * 1e3:.1f} ms, "
                    f"ratio {captum_s / ours_s:.2f}x"
                    + (f", max |diff| {row['max_abs_diff']:.2e}" if "max_abs_diff" in row else "")
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.processes:
        median_over_processes(__file__, sys.argv[1:], args.processes)
        return
    rows = run(args.repeats)
    if args.json is not None:
        args.json.write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
