"""How much of the CPU forward pass PyTorch's max pooling costs, and what an exact
alternative would save (a probe behind a RESULTS.md note; nothing in the library uses it).

On the CPU, ``F.max_pool2d`` always computes the argmax indices, even under ``no_grad``.
The same values come from taking element-wise maxima of strided views of the input
(``torch.maximum`` of ``x[..., 0::2, :]`` and ``x[..., 1::2, :]``, then the same over
columns). This script times both for the pooling layers of common CNNs, in the standard
and the channels-last layout, and checks that the results are equal.

    python benchmarks/probe_pooling.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def strided_max_pool(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Max pooling (square window, no dilation, floor mode) from strided views."""
    if padding:
        x = F.pad(x, (padding,) * 4, value=float("-inf"))
    h, w = x.shape[-2:]
    rows_out, cols_out = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    rows = None
    for d in range(kernel):
        view = x[..., d : d + stride * (rows_out - 1) + 1 : stride, :]
        rows = view if rows is None else torch.maximum(rows, view)
    out = None
    for d in range(kernel):
        view = rows[..., d : d + stride * (cols_out - 1) + 1 : stride]
        out = view if out is None else torch.maximum(out, view)
    return out


def median_ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    cases = [
        ("BenchCNN pool 1", (128, 16, 32, 32), 2, 2, 0),
        ("BenchCNN pool 2", (128, 32, 16, 16), 2, 2, 0),
        ("ResNet stem", (32, 64, 112, 112), 3, 2, 1),
        ("3x3 stride 3", (128, 16, 32, 32), 3, 3, 0),
    ]
    print(f"{'layer':<16} {'layout':<14} {'max_pool2d':>11} {'strided':>9} {'ratio':>6}  equal")
    with torch.no_grad():
        for name, shape, k, s, p in cases:
            for layout, fmt in (
                ("standard", torch.contiguous_format),
                ("channels-last", torch.channels_last),
            ):
                x = torch.relu(torch.randn(shape)).contiguous(memory_format=fmt)
                same = torch.equal(F.max_pool2d(x, k, s, p), strided_max_pool(x, k, s, p))
                ours = median_ms(lambda: strided_max_pool(x, k, s, p))
                torch_ms = median_ms(lambda: F.max_pool2d(x, k, s, p))
                print(
                    f"{name:<16} {layout:<14} {torch_ms:>9.2f}ms {ours:>7.2f}ms "
                    f"{torch_ms / ours:>5.2f}x  {same}"
                )


if __name__ == "__main__":
    main()
