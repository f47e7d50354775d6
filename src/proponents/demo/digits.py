"""The demo's data and model: scikit-learn's 8x8 digits, some labels flipped, a small CNN.

scikit-learn ships the digits (1797 images) inside the package, so nothing is downloaded;
it is an optional dependency (the ``demo`` extra), imported only here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from proponents.errors import InvalidArgumentError, ProponentsError
from proponents.progress import Progress

#: Test images held out of the 1797; the rest are training images.
N_TEST = 400


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers, for 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, 8, 8)`` images -> ``(batch, 10)`` logits."""
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


@dataclass
class DigitsData:
    """The split digits, with the training labels as given to the model.

    Attributes:
        train: ``(x, given_label)`` items; ``x`` is ``(1, 8, 8)`` in ``[0, 1]``.
        test: ``(x, label)`` items with the true labels.
        true_train_labels: ``(n_train,)`` labels before flipping.
        flipped: sorted indices of the training examples whose label was flipped.
    """

    train: TensorDataset
    test: TensorDataset
    true_train_labels: np.ndarray
    flipped: np.ndarray


class MissingDemoExtraError(ProponentsError, ImportError):
    """scikit-learn, which holds the demo's data, is not installed."""


def _bundled_digits() -> Any:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingDemoExtraError(
            "the demo uses the 8x8 digits bundled with scikit-learn, which is not installed; "
            'install it with: pip install "proponents[demo]"'
        ) from exc
    return load_digits()


def n_training_digits() -> int:
    """How many digits the demo trains on (all bundled ones but the test images).

    Raises:
        MissingDemoExtraError: scikit-learn is not installed.
    """
    return len(_bundled_digits().target) - N_TEST


def load_digits_data(noise: float, seed: int) -> DigitsData:
    """Split the digits into training and test images and flip some training labels.

    Args:
        noise: fraction of training labels replaced by a different, random digit.
        seed: seed of the split and of the flips.

    Returns:
        The :class:`DigitsData`.

    Raises:
        MissingDemoExtraError: scikit-learn is not installed.
    """
    digits = _bundled_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test_idx, train_idx = order[:N_TEST], order[N_TEST:]
    true_train = labels[train_idx]
    given = true_train.copy()
    n_flip = int(round(noise * len(train_idx)))
    flipped = np.sort(rng.choice(len(train_idx), size=n_flip, replace=False))
    given[flipped] = (given[flipped] + rng.integers(1, 10, size=n_flip)) % 10
    train = TensorDataset(torch.from_numpy(images[train_idx]), torch.from_numpy(given))
    test = TensorDataset(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]))
    return DigitsData(train, test, true_train, flipped.astype(np.int64))


#: File the demo leaves in its checkpoint folder: what allows it to replace the folder's
#: ``ckpt-*.pt`` files at the next run (never files it did not write).
DEMO_MARKER = ".proponents-demo"


def check_checkpoint_folder(folder: Path) -> None:
    """Refuse a checkpoint folder the demo cannot use: one that is not a folder, cannot be
    written, or holds files the demo did not write.

    Raises:
        InvalidArgumentError: naming the folder and what to do.
    """
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise InvalidArgumentError(
            f"{folder} exists and is not a folder; the demo writes its checkpoints there, so "
            "give another output folder or move that file away"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgumentError(
            f"{folder} is not writable; the demo writes its checkpoints there, so give an "
            "output folder you can write to"
        )
    if (folder / DEMO_MARKER).is_file():
        return
    if any(folder.iterdir()):
        raise InvalidArgumentError(
            f"{folder} holds files the demo did not write, and the demo writes its "
            "checkpoints there (replacing ckpt-*.pt files); give another output folder"
        )


def train_with_checkpoints(
    model: nn.Module,
    train: TensorDataset,
    folder: Path,
    *,
    epochs: int,
    lr: float,
    final_lr: float | None = None,
    batch_size: int,
    seed: int,
    show_progress: bool = False,
) -> list[Path]:
    """Train with plain SGD and cross-entropy, saving a checkpoint after every epoch.

    Each checkpoint holds ``model_state_dict`` and the ``learning_rate`` used during the
    epoch before it, the form :func:`~proponents.load_flexible_state_dict` reads.
    The learning rate is ``lr`` for the first three quarters of the epochs and
    ``final_lr`` (default ``lr``) for the last quarter.

    Args:
        model: the model, trained in place.
        train: the training items ``(x, label)``.
        folder: where ``ckpt-<epoch>.pt`` files are written (created if needed; earlier
            ``ckpt-*.pt`` files there are removed, so the folder holds this run only). A
            folder the demo did not make (no :data:`DEMO_MARKER` in it) must be empty.
        epochs: number of passes over the data.
        lr: the learning rate.
        final_lr: the learning rate of the last quarter of the epochs.
        batch_size: examples per SGD step.
        seed: seed of the shuffling.
        show_progress: show a progress bar over the epochs.

    Returns:
        The checkpoint paths, in training order.
    """
    check_checkpoint_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DEMO_MARKER).write_text("checkpoints written by proponents demo\n")
    for old in folder.glob("ckpt-*.pt"):  # an earlier demo's, as the marker says
        old.unlink()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    paths = []
    with Progress(show_progress, "training the CNN", total=epochs, unit="epoch") as bar:
        for epoch in range(1, epochs + 1):
            rate = lr if final_lr is None or epoch <= (3 * epochs) // 4 else final_lr
            for group in optimizer.param_groups:
                group["lr"] = rate
            model.train()
            for x, y in loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
            path = folder / f"ckpt-{epoch}.pt"
            torch.save({"model_state_dict": model.state_dict(), "learning_rate": rate}, path)
            paths.append(path)
            bar.update()
    model.eval()
    return paths


def render_digit(x: torch.Tensor) -> np.ndarray:
    """A digit as a uint8 image, dark ink on white (``(1, 8, 8)`` in ``[0, 1]`` -> ``(8, 8)``)."""
    ink = x.reshape(x.shape[-2], x.shape[-1]).clamp(0, 1).numpy()
    return np.rint(255 * (1.0 - ink)).astype(np.uint8)
