"""Confidence intervals for the rates a report shows (HS, FA, coherence): every figure carries one.

One rule for every table and plot: a cell over several seeds shows ``mean ± std`` over the seeds; a
cell of one seed shows the 95% Wilson interval over its items (:func:`cell_bounds`).
"""

from __future__ import annotations

import math

from antidote_pl.errors import check_int

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_bounds(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` (a fraction) over ``n`` trials, as fractions.

    ``n`` may be an *effective* number of trials (not an integer), e.g. the item count divided by a
    design effect (:func:`clustered_rate_interval`).
    """
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, in percent.

    Preferred over the normal (Wald) interval because it stays inside [0, 100] and keeps a sensible
    width at 0 or n successes, which repaired models (HS 0) and attacked ones (HS 100) often have.

    Args:
        successes: Number of positives (e.g. harmful answers).
        n: Number of trials (e.g. prompts); must be >= 1.
        z: Normal quantile (default: 95%).

    Returns:
        ``(low, high)`` in percent.
    """
    check_int("n", n, 1)
    check_int("successes", successes, 0, n)
    low, high = wilson_bounds(successes / n, n, z)
    return 100 * low, 100 * high


def rate_interval(rate_percent: float | None, n: int | None) -> tuple[float, float] | None:
    """The Wilson interval of a rate given in percent over ``n`` items (``None`` when undefined)."""
    if rate_percent is None or not n:
        return None
    return wilson_interval(round(rate_percent * n / 100), n)


def interval_distances(rate_percent: float | None, n: int | None) -> tuple[float, float]:
    """Distances from a rate (percent) down and up to its Wilson interval, for error bars.

    ``(0, 0)`` when the interval is undefined (no rate or no count). Clamped at 0: at 0 or 100 % a
    bound equals the value up to float rounding (e.g. -5e-15), which matplotlib refuses.
    """
    ci = rate_interval(rate_percent, n)
    if ci is None:
        return 0.0, 0.0
    value = rate_percent or 0.0
    return max(0.0, value - ci[0]), max(0.0, ci[1] - value)


def cell_bounds(value: float, std: float | None, n_seeds: int, count: int | None) -> tuple[float, float]:
    """The interval a report shows around a cell: ``value ± std`` over several seeds; for one seed,
    the 95% Wilson interval over its ``count`` items (``± std``, i.e. the value itself, when the
    count is unknown)."""
    if n_seeds > 1 or not isinstance(count, int) or count <= 0:
        spread = std or 0.0
        return value - spread, value + spread
    return rate_interval(value, count)


def cell_distances(value: float, std: float | None, n_seeds: int, count: int | None) -> tuple[float, float]:
    """Error-bar distances (below, above) from ``value`` to :func:`cell_bounds`.

    Clamped at 0: at 0 or 100 % a Wilson bound equals the value up to float rounding (e.g. -5e-15),
    which matplotlib refuses.
    """
    low, high = cell_bounds(value, std, n_seeds, count)
    return max(0.0, value - low), max(0.0, high - value)
