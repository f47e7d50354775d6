"""Progress bars for long loops (tqdm), silent unless asked for."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """A tqdm bar that does nothing when disabled.

    Args:
        enabled: show the bar.
        desc: what is being processed, e.g. ``"TracInCP: training batches"``.
        total: number of steps, or ``None`` when unknown.
        unit: the name of one step.
    """

    def __init__(self, enabled: bool, desc: str, total: int | None, unit: str = "batch"):
        self._bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    @property
    def count(self) -> int:
        """Steps done so far (0 when the bar is not shown)."""
        return 0 if self._bar is None else int(self._bar.n)

    def set_description(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description(desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_iter(
    iterable: Iterable[T], enabled: bool, desc: str, total: int | None = None, unit: str = "batch"
) -> Iterator[T]:
    """Iterate over ``iterable`` with a progress bar when ``enabled``."""
    with Progress(enabled, desc, total, unit) as bar:
        for item in iterable:
            yield item
            bar.update()
