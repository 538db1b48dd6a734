"""The evaluation report: one self-contained HTML page, its PNG figures and metrics.json."""

from __future__ import annotations

from imgclf.report.build import REPORT_FOLDER, write_report

__all__ = ["REPORT_FOLDER", "write_report"]
