"""Reports of ``dmd-dar eval``: a self-contained HTML page (grids, spectra, tables with CIs, verdicts) + plots."""

from dmd_dar.report.html import render_html, write_report

__all__ = ["render_html", "write_report"]
