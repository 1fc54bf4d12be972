"""Wilson intervals against values computed by hand from the closed form."""

from __future__ import annotations

import pytest

from antidote_pl.errors import ConfigError
from antidote_pl.utils.intervals import cell_bounds, cell_distances, rate_interval, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (5, 10, 23.659, 76.341),
        (0, 10, 0.0, 27.753),
        (10, 10, 72.247, 100.0),
        (1, 300, 0.0589, 1.8637),
        (170, 300, 51.010, 62.155),
    ],
)
def test_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=2e-3) and hi == pytest.approx(high, abs=2e-3)


def test_rate_interval_and_bad_input():
    assert rate_interval(56.666666, 300) == wilson_interval(170, 300)
    assert rate_interval(None, 300) is None and rate_interval(50.0, 0) is None
    with pytest.raises(ConfigError, match="successes=11"):
        wilson_interval(11, 10)
    with pytest.raises(ConfigError, match="n=0"):
        wilson_interval(0, 0)


def test_report_cells_carry_the_interval_of_their_n():
    from antidote_pl.experiment.report import report_markdown

    row = {
        "method": "wanda",
        "alpha": 0.1,
        "removed_fraction": 0.1,
        "harmful_score": 50.0,
        "finetune_accuracy": 100.0,
        "coherent_rate": 100.0,
        "n_harmful_score": 10,
        "n_finetune_accuracy": 10,
    }
    line = report_markdown({"rows": [row]}).splitlines()[2]
    assert line == (
        "| wanda | 0.1 | 10.0 | 50.0 (23.7-76.3) | 100.0 (72.2-100.0) | 100.0 (72.2-100.0) | 10 | 10 |"
    )


def test_plot_error_bars_are_never_negative():
    """At HS 0 or 100 the Wilson bound equals the value up to rounding; matplotlib rejects < 0."""
    from antidote_pl.experiment.report import _error_bars

    points = [{"hs": v, "n": n} for v, n in ((0.0, 300), (100.0, 300), (100.0 / 3, 300), (None, 0))]
    below, above = _error_bars(points, "hs", "n")
    assert min(below + above) >= 0.0 and below[0] == 0.0 and above[1] == 0.0


def test_interval_distances_are_never_negative_and_match_the_interval():
    from antidote_pl.utils.intervals import interval_distances, rate_interval

    below, above = interval_distances(72.5, 80)
    low, high = rate_interval(72.5, 80)
    assert below == pytest.approx(72.5 - low) and above == pytest.approx(high - 72.5)
    assert interval_distances(0.0, 10)[0] == 0.0 and interval_distances(0.0, 10)[1] > 0
    assert interval_distances(100.0, 10)[1] == 0.0 and interval_distances(100.0, 10)[0] > 0
    assert interval_distances(None, 10) == (0.0, 0.0) and interval_distances(50.0, 0) == (0.0, 0.0)


def test_cell_bounds_is_std_over_seeds_or_wilson_for_one_seed():
    assert cell_bounds(40.0, 5.0, 3, 80) == (35.0, 45.0)
    assert cell_bounds(72.5, 0.0, 1, 80) == rate_interval(72.5, 80)
    assert cell_bounds(72.5, None, 1, None) == (72.5, 72.5)  # no item count: the value itself
    _, high = rate_interval(0.0, 80)
    assert cell_distances(0.0, None, 1, 80) == (0.0, high)  # clamped, never negative
    assert cell_distances(40.0, 5.0, 2, 80) == (5.0, 5.0)


def test_seed_cells_follow_the_one_interval_rule():
    from antidote_pl.utils.tables import format_over_seeds, format_seed_cell

    assert format_over_seeds([40.0, 60.0]) == "50.0 ± 14.1"
    # One seed: the Wilson interval over its items (5 of 10: 23.659-76.341), never "± 0.0".
    assert format_over_seeds([50.0, None], count=10) == "50.0 [23.7, 76.3]"
    assert format_seed_cell(50.0, 0.0, 1, 10) == "50.0 [23.7, 76.3]"
    # No item count (an overlap, not a rate over items): the value, said to be one seed's.
    assert format_over_seeds([0.5], digits=3) == "0.500 (1 seed)"
    assert format_over_seeds([None]) == format_seed_cell(None, None, 0) == "n/a"


@pytest.mark.parametrize(
    ("k1", "n1", "k2", "n2", "low", "high"),
    # Newcombe (1998a), method 10 (hybrid score), published examples.
    [(56, 70, 48, 80, 5.24, 33.39), (9, 10, 3, 10, 17.05, 80.90), (5, 56, 0, 29, -3.81, 19.26)],
)
def test_difference_interval_matches_newcombes_examples(k1, n1, k2, n2, low, high):
    from antidote_pl.utils.intervals import difference_interval

    assert difference_interval(k1, n1, k2, n2) == pytest.approx((low, high), abs=0.01)


def test_paired_difference_interval_matches_newcombes_examples_and_checks_input():
    from antidote_pl.utils.intervals import paired_difference_interval

    def table(a, b, c, d):
        return [True] * (a + b) + [False] * (c + d), [True] * a + [False] * b + [True] * c + [False] * d

    # Newcombe (1998b), method 10, example (c): 53 both, 1 neither: 0 with -0.0729-0.0729.
    assert paired_difference_interval(*table(53, 0, 0, 1)) == pytest.approx((-7.29, 7.29), abs=0.01)
    with pytest.raises(ConfigError, match="as many as first"):
        paired_difference_interval([True], [True, False])
    with pytest.raises(ConfigError, match="n=0"):
        paired_difference_interval([], [])


def test_clustered_rate_interval_by_hand():
    from antidote_pl.utils.intervals import clustered_rate_interval

    # Singletons: exactly the plain Wilson interval (design effect 1).
    assert clustered_rate_interval([1] * 5 + [0] * 5, [1] * 10) == (*wilson_interval(5, 10), 1.0)
    # Two clusters of 4, one all positive, one all negative: p = 0.5, variance (2^2 + 2^2) / 8^2 =
    # 0.125 against 0.25 / 8 = 0.03125: design effect 4, i.e. the Wilson interval of 1 of 2.
    low, high, deff = clustered_rate_interval([4, 0], [4, 4])
    assert deff == pytest.approx(4.0) and (low, high) == pytest.approx(wilson_interval(1, 2))
    # Every item positive: the items of a cluster count as one (mean cluster size 30 / 3 = 10).
    low, high, deff = clustered_rate_interval([10, 10, 10], [10, 10, 10])
    assert deff == 10.0 and (low, high) == pytest.approx(wilson_interval(3, 3))
    with pytest.raises(ConfigError, match="successes"):
        clustered_rate_interval([5], [4])
    with pytest.raises(ConfigError, match="sizes"):
        clustered_rate_interval([1, 1], [2])
