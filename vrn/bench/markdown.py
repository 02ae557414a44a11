"""Markdown pieces shared by the reports of ``vrn-bench`` (:mod:`.report`) and of the
other benchmark scripts (:mod:`.script_results`): number formats and tables."""

from __future__ import annotations


def fmt_ms(value: float | None) -> str:
    """Milliseconds with about three significant digits (``512``, ``23.4``, ``0.123``)."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]
