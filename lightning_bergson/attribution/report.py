"""Former home of the reports, now :mod:`lightning_bergson.scores.report` (any method).

Kept so that ``from lightning_bergson.attribution.report import ...`` goes on working.
"""

from ..scores.report import (
    Match,
    QueryReport,
    format_text,
    from_search,
    query_reports,
    write_report,
)

__all__ = ["Match", "QueryReport", "format_text", "from_search", "query_reports", "write_report"]
