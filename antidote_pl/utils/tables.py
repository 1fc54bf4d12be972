"""Small formatting helpers shared by the analysis tables (markdown, rates with intervals)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from antidote_pl.utils.intervals import rate_interval


def format_rate(value: float | None, n: int | None = None) -> str:
    """A rate in percent with its Wilson 95% interval when the count ``n`` behind it is known.

    Args:
        value: The rate in percent, or ``None`` (shown as ``n/a``).
        n: Number of items behind the rate; ``None`` or 0 shows the value alone.
    """
    if value is None:
        return "n/a"
    ci = rate_interval(value, n)
    return f"{value:.1f}" if ci is None else f"{value:.1f} ({ci[0]:.1f}-{ci[1]:.1f})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are converted with ``str``. Ends with a newline."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; ``(None, None)`` for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_pm(mean: float | None, std: float | None, digits: int = 1) -> str:
    """``mean ± std`` (``n/a`` without a mean; a missing std, e.g. of one seed, is 0)."""
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std or 0.0:.{digits}f}"


def format_mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± std`` of ``values`` (``n/a`` for none)."""
    return format_pm(*mean_std([v for v in values if v is not None]), digits)
