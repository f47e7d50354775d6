"""What the user reads: progress bar totals, range messages, where warnings point."""

from __future__ import annotations

import io
import os
import sysconfig
import warnings

import pytest
import torch
import tqdm.auto
import tqdm.std
from torch.utils.data import DataLoader, IterableDataset

from conftest import make_case
from proponents import TracInCP
from proponents.errors import InvalidArgumentError


class _Rows(IterableDataset):
    """``(x, y)`` rows with no ``__len__``: a DataLoader over it has no length."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


@pytest.fixture
def bars(monkeypatch):
    """Every progress bar opened, kept to read its total and count (writing nowhere)."""
    opened: list[tqdm.std.tqdm] = []

    class Recorded(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    return opened


def test_influence_bar_has_no_total_when_the_test_loader_has_no_length(tmp_path, bars):
    """A test DataLoader over an IterableDataset: the bar counted it as one batch per
    checkpoint and ended at 18/15 (3 checkpoints x (4 training + 2 test batches))."""
    case = make_case("mlp", tmp_path, n_train=13, n_test=4)
    t = TracInCP(
        case.model,
        case.dataset,
        case.checkpoints,
        loss_fn=case.loss_fn("none"),
        batch_size=4,
    )
    test = DataLoader(_Rows(case.test_inputs[0], case.test_labels), batch_size=2)
    t.influence(test, show_progress=True)
    assert len(bars) == 1
    bar = bars[0]
    assert bar.n == 3 * (4 + 2)
    assert bar.total is None or bar.total == bar.n, (bar.n, bar.total)


def test_k_out_of_range_without_a_known_training_length_says_what_is_valid(tmp_path):
    """With a training loader of unknown length the message read "between 1 and the
    number of training examples (None)"."""
    case = make_case("mlp", tmp_path)
    train = DataLoader(_Rows(case.train_inputs[0], case.train_labels), batch_size=4)
    t = TracInCP(case.model, train, case.checkpoints, loss_fn=case.loss_fn("none"))
    with pytest.raises(InvalidArgumentError, match="k=0") as err:
        t.influence(case.test_inputs, case.test_labels, k=0)
    assert "None" not in str(err.value) and "at least 1" in str(err.value)


def test_a_warning_from_code_in_site_packages_names_that_line():
    """Code installed in site-packages (a user's package, a pipeline library) that warns
    through proponents: site-packages lies inside the standard library's folder in a
    venv, pyenv or conda Python, so its frames were skipped as "standard library" and the
    warning named this test's line instead of the installed code's."""
    from proponents.user_warnings import warn

    where = os.path.join(sysconfig.get_paths()["purelib"], "somepkg", "core.py")
    namespace: dict = {"__name__": "somepkg.core"}
    exec(
        compile("def call(warn):\n    warn('from an installed package')\n", where, "exec"),
        namespace,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace["call"](warn)
    assert [(w.filename, w.lineno) for w in caught] == [(where, 2)]
