"""Warnings are attributed to the user's line, whatever runs in between."""

from __future__ import annotations

import importlib.util
import warnings


def test_a_warning_from_a_file_run_by_importlib_names_that_file(tmp_path):
    """A task file executed through ``importlib`` (as the command line runs one): the
    warning names the file's line. A stack-level count overshot past importlib's frames,
    which ``warnings.warn`` skips, and the warning read ``sys:1``."""
    task = tmp_path / "task_file.py"
    task.write_text("from proponents.user_warnings import warn\n\nwarn('from the task')\n")
    spec = importlib.util.spec_from_file_location("task_file", task)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(module)
    assert [(w.filename, w.lineno) for w in caught] == [(str(task), 3)]


def test_repeats_from_one_line_are_shown_once_under_the_default_filter():
    """The user's module keeps the registry, so Python's "once per location" default
    holds for the user's line (and a second line warns again)."""
    from proponents.user_warnings import warn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            warn("same place")
        warn("same place")
    assert len(caught) == 2
    assert {w.filename for w in caught} == {__file__}
