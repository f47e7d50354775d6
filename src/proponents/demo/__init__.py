"""The ``proponents demo``: noisy 8x8 digits, a small CNN, and the report it produces.

Run it from the command line (``proponents demo``) or from Python::

    from proponents.demo import run_demo
    result = run_demo("demo-out", noise=0.1)
    print(result.summary_text())
"""

from __future__ import annotations

from proponents.demo.run import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
