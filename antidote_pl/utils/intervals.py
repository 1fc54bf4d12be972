"""Confidence intervals for the rates a report shows (HS, FA, coherence): every figure carries one.

One rule for every table and plot: a cell over several seeds shows ``mean ± std`` over the seeds; a
cell of one seed shows the 95% Wilson interval over its items (:func:`cell_bounds`). Differences of
two rates (the FA drop that decides an FA budget) use Newcombe's intervals
(:func:`difference_interval`, :func:`paired_difference_interval`); a rate pooled over items that
come in clusters (one prompt judged in many variants) uses a design-effect-widened Wilson interval
(:func:`clustered_rate_interval`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from antidote_pl.errors import bad_value, check_int

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


# ------------------------------------------------------------------ differences of two proportions
def _square_and_add(
    p1: float, ci1: tuple[float, float], p2: float, ci2: tuple[float, float], phi: float
) -> tuple[float, float]:
    """Newcombe's square-and-add of two Wilson intervals around ``p1 - p2`` (fractions).

    ``phi`` is the correlation of the two estimates (0 for independent samples).
    """
    (l1, u1), (l2, u2) = ci1, ci2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    # With |phi| <= 1 both are >= 0 up to float rounding.
    return p1 - p2 - math.sqrt(max(below, 0.0)), p1 - p2 + math.sqrt(max(above, 0.0))


def difference_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """95% interval of ``k1/n1 - k2/n2`` for two *independent* samples, in percentage points.

    Newcombe's hybrid score interval (Newcombe 1998, Statistics in Medicine 17:873, method 10): the
    Wilson intervals of the two proportions combined by square-and-add. Applied to two rates on the
    *same* items it ignores their positive correlation and so is wider (conservative) than the
    paired interval (:func:`paired_difference_interval`), which needs the per-item outcomes.
    """
    check_int("n1", n1, 1)
    check_int("k1", k1, 0, n1)
    check_int("n2", n2, 1)
    check_int("k2", k2, 0, n2)
    p1, p2 = k1 / n1, k2 / n2
    low, high = _square_and_add(p1, wilson_bounds(p1, n1, z), p2, wilson_bounds(p2, n2, z), 0.0)
    return 100 * low, 100 * high


def paired_difference_interval(
    first: Sequence[bool], second: Sequence[bool], z: float = Z95
) -> tuple[float, float]:
    """95% interval of ``rate(first) - rate(second)`` for two outcomes on the *same* items, in points.

    Newcombe's interval for paired proportions (Newcombe 1998, Statistics in Medicine 17:2635,
    method 10): the Wilson intervals of the two rates combined by square-and-add with the
    correlation ``phi`` of the 2x2 table ``a`` (both true), ``b`` (first only), ``c`` (second only),
    ``d`` (neither): ``phi = C / sqrt((a+b)(c+d)(a+c)(b+d))`` with ``C = ad - bc - n/2`` when
    ``ad - bc > n/2``, ``0`` when ``0 <= ad - bc <= n/2`` and ``ad - bc`` when it is negative (the
    paper's continuity correction of ``phi``); ``phi = 0`` when a margin is empty.

    Args:
        first: Per-item outcomes of the first rate (e.g. the unrepaired model's correct answers).
        second: The same items' outcomes of the second rate, in the same order.
        z: Normal quantile (default: 95%).

    Raises:
        ConfigError: for no items, or sequences of different lengths.
    """
    if len(first) != len(second):
        raise bad_value("second", f"{len(second)} outcomes", f"as many as first ({len(first)})")
    n = len(first)
    check_int("n", n, 1)
    a = sum(1 for x, y in zip(first, second) if x and y)
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    d = n - a - b - c
    p1, p2 = (a + b) / n, (a + c) / n
    low, high = _square_and_add(
        p1, wilson_bounds(p1, n, z), p2, wilson_bounds(p2, n, z), _paired_phi(a, b, c, d)
    )
    return 100 * low, 100 * high


def _paired_phi(a: int, b: int, c: int, d: int) -> float:
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        return 0.0
    cross, half_n = a * d - b * c, (a + b + c + d) / 2
    corrected = cross - half_n if cross > half_n else (cross if cross < 0 else 0.0)
    return corrected / math.sqrt(margins)


# ------------------------------------------------------------------ one rate over clustered items
def clustered_rate_interval(
    successes: Sequence[int], sizes: Sequence[int], z: float = Z95
) -> tuple[float, float, float]:
    """Wilson interval of a pooled rate whose items come in clusters (e.g. one prompt judged in many
    variants), widened by the design effect of the clustering; in percent.

    The rate is ``p = sum(successes) / n`` over ``n = sum(sizes)`` items. Its variance, clustered by
    the ratio-estimator (linearisation) formula ``V = sum_i (y_i - p m_i)^2 / n^2`` (cluster ``i``
    with ``y_i`` successes of ``m_i`` items), is compared with the independent-items variance
    ``p(1-p)/n``: the design effect ``deff = V / (p(1-p)/n)`` (at least 1, so clustering never
    narrows the interval) gives an effective count ``n / deff``, and the interval is the Wilson one
    over that count. Singleton clusters give ``deff = 1``: exactly the plain Wilson interval. When
    ``p`` is 0 or 1 the variance ratio is undefined; ``deff`` is then the mean cluster size (items
    of one cluster counted as one, the most correlated case), so 100% agreement over 300 prompts
    in 38 variants is an interval over 300 prompts, not over 11,400 answers.

    Args:
        successes: Successes per cluster.
        sizes: Items per cluster (each >= 1), same order.
        z: Normal quantile (default: 95%).

    Returns:
        ``(low, high, deff)``; low and high in percent.
    """
    if len(successes) != len(sizes) or not sizes:
        raise bad_value(
            "sizes", f"{len(sizes)} clusters", f"one per successes entry ({len(successes)}), >= 1"
        )
    for y, m in zip(successes, sizes):
        check_int("sizes[i]", m, 1)
        check_int("successes[i]", y, 0, m)
    n = sum(sizes)
    p = sum(successes) / n
    if p in (0.0, 1.0):
        deff = n / len(sizes)
    else:
        variance = sum((y - p * m) ** 2 for y, m in zip(successes, sizes)) / (n * n)
        deff = max(1.0, variance / (p * (1 - p) / n))
    low, high = wilson_bounds(p, n / deff, z)
    return 100 * low, 100 * high, deff
