"""Small formatting helpers shared by the analysis tables (markdown, rates with intervals)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from antidote_pl.utils.intervals import cell_bounds, rate_interval


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
    """``mean ± std`` (``n/a`` without a mean; a missing std is 0).

    For a cell whose seed count varies (one seed has no spread), use :func:`format_seed_cell`.
    """
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std or 0.0:.{digits}f}"


def format_mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± std`` of ``values`` (``n/a`` for none)."""
    return format_pm(*mean_std([v for v in values if v is not None]), digits)


def format_seed_cell(
    mean: float | None, std: float | None, n_seeds: int, count: int | None = None, digits: int = 1
) -> str:
    """A cell of a table over seeds, by the reports' one interval rule (:func:`cell_bounds`).

    Several seeds: ``mean ± std``. One seed: the value and its 95% Wilson interval over its
    ``count`` items, ``value [low, high]``; without a count (a figure that is no rate over items,
    e.g. a Jaccard overlap) the value and ``(1 seed)``, never a spread of 0.
    """
    if mean is None:
        return "n/a"
    if n_seeds > 1:
        return format_pm(mean, std, digits)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return f"{mean:.{digits}f} (1 seed)"
    low, high = cell_bounds(mean, None, 1, count)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_over_seeds(values: Sequence[float | None], count: int | None = None, digits: int = 1) -> str:
    """:func:`format_seed_cell` of the per-seed ``values`` (``None`` dropped; ``n/a`` for none)."""
    present = [v for v in values if v is not None]
    return format_seed_cell(*mean_std(present), len(present), count, digits)
