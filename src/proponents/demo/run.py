"""The end-to-end demo: train on noisy digits, find the flipped labels, explain predictions."""

from __future__ import annotations

import json
import operator
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from proponents.demo.digits import (
    DEMO_MARKER,
    DigitsCNN,
    check_checkpoint_folder,
    load_digits_data,
    n_training_digits,
    render_digit,
    train_with_checkpoints,
)
from proponents.errors import ArgumentTypeError, InvalidArgumentError
from proponents.report.analysis import METHODS, pick_test_examples, predict, run_method
from proponents.report.builder import build_report, remove_unwritten, write_whole
from proponents.report.plot import (
    DEFAULT_FRACTIONS,
    MissingExtraError,
    detection_table,
    format_detection,
    require_matplotlib,
)

#: Training settings of the demo (plain SGD, so TracIn's learning-rate weighting is exact).
EPOCHS = 40
LEARNING_RATE = 0.15
FINAL_LEARNING_RATE = 0.05
BATCH_SIZE = 32


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one CPU thread meanwhile (restored after).

    The demo's model is tiny: one thread is as fast on an idle machine, far faster on a
    busy one, and makes the floating-point results independent of the core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class DemoResult:
    """What the demo found and wrote.

    Attributes:
        report_path: the written ``report.html``.
        figure_path: the mislabel-detection curve (PNG), or ``None`` without flipped labels.
        summary_path: ``summary.json`` with every number below.
        detection: ranking name -> {fraction inspected: share of flipped labels found}.
        n_train: training images.
        n_test: test images.
        n_flipped: flipped training labels.
        train_accuracy: accuracy on the training labels as given (flipped ones included).
        test_accuracy: accuracy on the test images.
        test_indices: the explained test images.
        seconds: wall time of each step and ``"total"``.
        suspicion_name: name of the ranking the method produced.
    """

    report_path: Path
    figure_path: Path | None
    summary_path: Path
    detection: dict[str, dict[float, float]]
    n_train: int
    n_test: int
    n_flipped: int
    train_accuracy: float
    test_accuracy: float
    test_indices: list[int]
    suspicion_name: str
    seconds: dict[str, float] = field(default_factory=dict)

    def summary_text(self) -> str:
        """The short terminal summary."""
        lines = [
            f"Digits: {self.n_train} training images ({self.n_flipped} labels flipped, "
            f"{self.n_flipped / max(self.n_train, 1):.0%}), {self.n_test} test images.",
            f"Small CNN: accuracy {self.train_accuracy:.1%} on the training labels as given, "
            f"{self.test_accuracy:.1%} on the test images.",
        ]
        if self.detection:
            lines.append("")
            lines.append(
                "Flipped labels found when inspecting the most suspicious training images:"
            )
            lines.append(format_detection(self.detection))
        lines.append("")
        lines.append(
            f"Explained {len(self.test_indices)} test digits (misclassified first) with "
            "their proponents and opponents."
        )
        lines.append(f"Report: {self.report_path}")
        if self.figure_path is not None:
            lines.append(f"Figure: {self.figure_path}")
        lines.append(f"Time: {self.seconds.get('total', 0.0):.1f} s")
        return "\n".join(lines)


def run_demo(
    out: str | Path = "proponents-demo",
    *,
    noise: float = 0.1,
    seed: int = 0,
    method: str = "tracincp",
    epochs: int = EPOCHS,
    k: int = 8,
    n_wrong: int = 3,
    n_right: int = 3,
    show_progress: bool = False,
) -> DemoResult:
    """Run the digits demo and write its report.

    Trains :class:`~proponents.demo.digits.DigitsCNN` on the 8x8 digits with a fraction
    ``noise`` of training labels flipped, saving a checkpoint per epoch; ranks the training
    images by ``method``'s suspicion score (self-influence for the TracIn methods) beside
    the final loss and random order; explains a few misclassified and correct test digits;
    writes ``report.html``, ``mislabel_curve.png`` (``self_influence.png`` without flipped
    labels; the other one, left by an earlier run, is removed), ``summary.json`` and the
    checkpoints under ``out``. Seeded: the same arguments give the same result. Global
    random state is left as it was; torch runs on one CPU thread during the call (restored
    after).

    Every argument is checked before anything is created: a bad one raises and leaves
    ``out`` as it was (not even created).

    Args:
        out: output directory (created if needed). The demo replaces its own files there
            (``report.html``, ``summary.json``, the figure, ``checkpoints/ckpt-*.pt``) in
            a folder an earlier demo run wrote (its ``checkpoints/.proponents-demo``
            mark); anywhere else, existing files of those names are refused.
        noise: fraction of training labels flipped, ``0 <= noise < 1``.
        seed: seed of the split, the flips, the initial weights and the shuffling.
        method: ``"tracincp"``, ``"fast"``, ``"randproj"`` or ``"similarity"``.
        epochs: training epochs (= checkpoints).
        k: proponents and opponents shown per test digit.
        n_wrong: misclassified test digits to explain.
        n_right: correctly classified test digits to explain.
        show_progress: show progress bars.

    Returns:
        The :class:`DemoResult`.

    Raises:
        InvalidArgumentError: an argument out of range, or an output folder the demo cannot
            use (the message says why).
        ArgumentTypeError: an argument of the wrong type (``epochs=2.5``, say).
        MissingDemoExtraError: scikit-learn is missing.
        MissingExtraError: matplotlib is missing.
    """
    check_demo_arguments(
        noise=noise, seed=seed, method=method, epochs=epochs, k=k, n_wrong=n_wrong, n_right=n_right
    )
    check_demo_output(out)
    # NumPy integers become Python ones: torch's seeding refuses np.uint64, say.
    seed, epochs, k = operator.index(seed), operator.index(epochs), operator.index(k)
    n_wrong, n_right = operator.index(n_wrong), operator.index(n_right)
    noise = float(noise)
    try:
        require_matplotlib()
    except MissingExtraError as exc:
        raise MissingExtraError(
            "the demo draws its report with matplotlib, which is not installed; install the "
            'demo extra: pip install "proponents[demo]"'
        ) from exc
    with _one_thread(), torch.random.fork_rng(devices=[]):
        return _run(out, noise, seed, method, epochs, k, n_wrong, n_right, show_progress)


#: Seeds the demo accepts: what both numpy's and torch's generators take.
SEED_LIMIT = 2**64
#: ... and with method "randproj", what TracInCPFastRandProj's seed takes.
RANDPROJ_SEED_LIMIT = 2**43


#: Files the demo writes into its output folder (one of the figures, by the noise).
DEMO_FILES = ("report.html", "summary.json", "mislabel_curve.png", "self_influence.png")


def check_demo_output(out: str | Path) -> None:
    """Refuse an output folder the demo cannot use, before anything is written.

    Refused: an ``out`` that is empty, not a folder or not writable; a ``checkpoints``
    subfolder that is not a writable folder or holds files the demo did not write (it
    replaces the ``ckpt-*.pt`` files there); a report, summary or figure of the demo's
    names that is a folder, or a file in a folder no earlier demo run wrote (the demo
    would replace it).

    Raises:
        ArgumentTypeError: ``out`` is not a path.
        InvalidArgumentError: naming the folder or file and what to do.
    """
    if not isinstance(out, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"out must be a folder path (str or Path), got {type(out).__name__}"
        )
    if not os.fspath(out):
        raise InvalidArgumentError("out is empty; give the folder to write the demo into")
    folder = Path(out)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InvalidArgumentError(
            f"{folder} is an existing file, not a folder; give a folder to write the demo into"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{folder} is not writable; give a folder you can write to")
    checkpoints = folder / "checkpoints"
    check_checkpoint_folder(checkpoints)
    present = [name for name in DEMO_FILES if (folder / name).exists()]
    not_files = [name for name in present if not (folder / name).is_file()]
    if not_files:
        raise InvalidArgumentError(
            f"{folder / not_files[0]} is not a file, and the demo writes its "
            f"{not_files[0]} there; give another output folder or move it away"
        )
    if present and not (checkpoints / DEMO_MARKER).is_file():
        one = len(present) == 1
        raise InvalidArgumentError(
            f"{folder} holds {', '.join(present)}, which no earlier demo run wrote (its "
            f"checkpoints/{DEMO_MARKER} mark is missing), and the demo would replace "
            f"{'it' if one else 'them'}; give another output folder or remove "
            f"{'it' if one else 'them'}"
        )


def _integer(name: str, value: Any) -> int:
    """``value`` as an int (Python or NumPy integers, not bools).

    Raises:
        ArgumentTypeError: anything else, naming the argument.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_demo_arguments(
    *, noise: float, seed: int, method: str, epochs: int, k: int, n_wrong: int, n_right: int
) -> None:
    """Refuse demo arguments out of range before anything is trained or written.

    Raises:
        InvalidArgumentError: an argument out of range (the message names it); also a
            ``seed`` that is not an integer.
        ArgumentTypeError: ``noise``, ``epochs``, ``k``, ``n_wrong`` or ``n_right`` of the
            wrong type, or a ``method`` that is not a str.
        MissingDemoExtraError: scikit-learn, which holds the digits, is missing.
    """
    if not isinstance(method, str):
        raise ArgumentTypeError(f"method must be a str, got {type(method).__name__}")
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(noise, (bool, np.bool_)) or not isinstance(
        noise, (int, float, np.integer, np.floating)
    ):
        raise ArgumentTypeError(f"noise must be a number, got {type(noise).__name__} {noise!r}")
    if not 0.0 <= noise < 1.0:
        raise InvalidArgumentError(f"noise must be at least 0 and below 1, got {noise}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        # (InvalidArgumentError, as before: callers catch that for every seed mistake)
        raise InvalidArgumentError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    epochs, k = _integer("epochs", epochs), _integer("k", k)
    n_wrong, n_right = _integer("n_wrong", n_wrong), _integer("n_right", n_right)
    if not 0 <= seed < SEED_LIMIT:
        raise InvalidArgumentError(f"seed must be between 0 and 2**64 - 1, got {seed}")
    if method == "randproj" and seed >= RANDPROJ_SEED_LIMIT:
        raise InvalidArgumentError(
            f"seed must be below 2**43 with method 'randproj' (its projection seed), got {seed}"
        )
    if epochs < 1:
        raise InvalidArgumentError(f"epochs must be at least 1, got {epochs}")
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    n_train = n_training_digits()
    if k > n_train:
        raise InvalidArgumentError(
            f"k={k} exceeds the {n_train} training digits; ask for at most {n_train} "
            "proponents and opponents"
        )
    if n_wrong < 0 or n_right < 0:
        raise InvalidArgumentError("the numbers of test digits to explain must not be negative")


def _run(
    out: str | Path,
    noise: float,
    seed: int,
    method: str,
    epochs: int,
    k: int,
    n_wrong: int,
    n_right: int,
    show_progress: bool,
) -> DemoResult:
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits_data(noise, seed)
    torch.manual_seed(seed)  # the initial weights (global state is restored by run_demo)
    model = DigitsCNN()
    t = time.perf_counter()
    checkpoints = train_with_checkpoints(
        model,
        data.train,
        out / "checkpoints",
        epochs=epochs,
        lr=LEARNING_RATE,
        final_lr=FINAL_LEARNING_RATE,
        batch_size=BATCH_SIZE,
        seed=seed,
        show_progress=show_progress,
    )
    seconds["training"] = time.perf_counter() - t

    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    train_pred, train_loss = predict(model, data.train, loss_fn)
    test_pred, _ = predict(model, data.test, loss_fn, with_losses=False)
    train_labels = data.train.tensors[1].numpy()
    test_labels = data.test.tensors[1].numpy()
    test_indices = pick_test_examples(test_labels, test_pred, n_wrong, n_right)

    analysis = run_method(
        method,
        model,
        data.train,
        data.test,
        checkpoints,
        loss_fn,
        test_indices,
        k=k,
        batch_size=128,
        show_progress=show_progress,
        seed=seed,
    )
    seconds.update(analysis.seconds)

    t = time.perf_counter()
    if train_loss is None:  # pragma: no cover - predict() returns losses when given a loss
        raise RuntimeError("the demo's training losses could not be computed")
    rankings = {analysis.suspicion_name: analysis.suspicion, "final loss": train_loss}
    detection = (
        detection_table(rankings, data.flipped, DEFAULT_FRACTIONS, n=len(train_labels))
        if data.flipped.size
        else {}
    )
    summary = {
        "data": "scikit-learn 8x8 digits (bundled, no download)",
        "training images": f"{len(train_labels)} ({data.flipped.size} labels flipped, "
        f"noise {noise:g})",
        "test images": str(len(test_labels)),
        "model": f"small CNN, plain SGD, {epochs} epochs (lr {LEARNING_RATE:g}, "
        f"{FINAL_LEARNING_RATE:g} in the last quarter)",
        "checkpoints": f"{len(checkpoints)} (one per epoch)",
        "train accuracy (given labels)": f"{(train_pred == train_labels).mean():.1%}",
        "test accuracy": f"{(test_pred == test_labels).mean():.1%}",
        "method": method,
        "seed": str(seed),
    }
    report = build_report(
        data.train,
        data.test,
        analysis.proponents,
        analysis.opponents,
        test_indices=test_indices,
        test_predictions=test_pred,  # one per test image
        test_predictions_for="all",
        train_predictions=train_pred,
        self_influence=analysis.suspicion,
        self_influence_name=analysis.suspicion_name,
        mislabeled=data.flipped,
        baselines={"final loss": train_loss},
        label_names=[str(d) for d in range(10)],
        render=render_digit,
        title="proponents demo: which training digits are mislabelled?",
        subtitle=(
            "A small CNN trained on 8x8 handwritten digits with some training labels flipped. "
            "Red borders mark the flipped labels."
        ),
        summary=summary,
        notes=analysis.notes,
        proponents_title=analysis.proponents_title,
        opponents_title=analysis.opponents_title,
        ranking_note=analysis.ranking_note,
        examples_note=analysis.examples_note,
    )
    report_path = report.save(out / "report.html")
    figure_path = out / report.figure_name if report.figure_png is not None else None
    seconds["report"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start

    result = DemoResult(
        report_path=report_path,
        figure_path=figure_path,
        summary_path=out / "summary.json",
        detection=detection,
        n_train=len(train_labels),
        n_test=len(test_labels),
        n_flipped=int(data.flipped.size),
        train_accuracy=float((train_pred == train_labels).mean()),
        test_accuracy=float((test_pred == test_labels).mean()),
        test_indices=[int(i) for i in test_indices],
        suspicion_name=analysis.suspicion_name,
        seconds=seconds,
    )
    _write_summary(result, data.flipped, method, noise, seed, epochs)
    written = {"report.html", "summary.json"} | ({figure_path.name} if figure_path else set())
    remove_unwritten(out, DEMO_FILES, written)  # the other figure, of an earlier run
    return result


def _write_summary(
    result: DemoResult, flipped: np.ndarray, method: str, noise: float, seed: int, epochs: int
) -> None:
    payload: dict[str, Any] = {
        "method": method,
        "noise": noise,
        "seed": seed,
        "epochs": epochs,
        "n_train": result.n_train,
        "n_test": result.n_test,
        "n_flipped": result.n_flipped,
        "flipped": [int(i) for i in flipped],
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "suspicion": result.suspicion_name,
        "detection": {
            name: {f"{f:g}": v for f, v in values.items()}
            for name, values in result.detection.items()
        },
        "test_indices": result.test_indices,
        "report": str(result.report_path),
        "figure": str(result.figure_path) if result.figure_path else None,
        "seconds": {name: round(v, 3) for name, v in result.seconds.items()},
    }
    # whole or not at all, as the report: a full disk keeps the previous summary
    write_whole(result.summary_path, (json.dumps(payload, indent=2) + "\n").encode("utf-8"))
