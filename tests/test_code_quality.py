"""The three checks the README asks of every change, run with the tests so CI enforces them
(all three tools come with the ``dev`` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECKS = {
    "ruff check": ["ruff", "check", "."],
    "ruff format": ["ruff", "format", "--check", "src", "tests", "benchmarks"],
    "mypy": ["mypy", "src"],
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_the_readme_checks_report_nothing(name):
    command = [sys.executable, "-m", *CHECKS[name]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (
        f"`{' '.join(CHECKS[name])}` reports problems (a missing tool: install the dev "
        f"extra):\n{done.stdout}\n{done.stderr}"
    )
