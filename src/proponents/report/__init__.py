"""The influence report: a self-contained HTML page of proponents, opponents and rankings.

Build one from results you computed yourself with :func:`build_report` (it shows inline in
a notebook and saves with ``report.save("report.html")``), or let the command line
(``proponents demo`` / ``proponents explain``) compute and write it.
"""

from __future__ import annotations

from proponents.report.builder import InfluenceReport, build_report
from proponents.report.plot import MissingExtraError, detection_table, found_at

__all__ = ["InfluenceReport", "MissingExtraError", "build_report", "detection_table", "found_at"]
