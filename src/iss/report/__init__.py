"""The run report: one self-contained HTML page and a Markdown page over a finished run folder
(:mod:`~iss.report.html`). iss 0.3's ``iss.report`` names are re-exported here, the results tables among them
(now :mod:`iss.comparison.tables`).
"""

from iss.comparison.tables import (
    DIFFERENCES_TITLE,
    differences_rows,
    markdown,
    markdown_rows,
    mechanism_differences,
    mechanism_sections,
    mechanism_summary,
    precise_losses,
    results_rows,
    results_table,
    save_figure,
    verdict_title,
    write_results,
    write_rows,
)
from iss.report.html import HTML_TEMPLATE, Section, write_report

__all__ = [
    "DIFFERENCES_TITLE",
    "HTML_TEMPLATE",
    "Section",
    "differences_rows",
    "markdown",
    "markdown_rows",
    "mechanism_differences",
    "mechanism_sections",
    "mechanism_summary",
    "precise_losses",
    "results_rows",
    "results_table",
    "save_figure",
    "verdict_title",
    "write_report",
    "write_results",
    "write_rows",
]
