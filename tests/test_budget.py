"""Alpha under an FA budget, on hand-made sweeps: ties, no qualifying alpha, non-monotone FA."""

from __future__ import annotations

import pytest

from antidote_pl.errors import ConfigError
from antidote_pl.experiment.budget import budget_markdown, budget_rows, select_under_budget


def _row(method, alpha, val, hs=50.0, fa=80.0, **kw):
    return {
        "method": method,
        "alpha": alpha,
        "removed_fraction": alpha,
        "harmful_score": hs,
        "n_harmful_score": 100,
        "finetune_accuracy": fa,
        "n_finetune_accuracy": 200,
        "finetune_accuracy_val": val,
        "n_finetune_accuracy_val": 50,
        **kw,
    }


SWEEP = [
    {"method": "aligned", "alpha": None, "reference": True, "finetune_accuracy_val": 10.0},
    _row("none", 0.0, 90.0, hs=100.0, fa=91.0),
    # Monotone: drops 0, 2 (exactly the budget), 6.
    _row("wanda", 0.05, 90.0, hs=80.0),
    _row("wanda", 0.1, 88.0, hs=40.0, fa=87.0),
    _row("wanda", 0.2, 84.0, hs=5.0),
    # Non-monotone: 0.1 drops 10 but 0.2 only 1, so 0.2 is chosen for a budget of 2.
    _row("magnitude", 0.05, 89.5, hs=90.0),
    _row("magnitude", 0.1, 80.0, hs=60.0),
    _row("magnitude", 0.2, 89.0, hs=30.0, fa=85.0),
    # Every alpha costs more than 5 points.
    _row("random", 0.1, 70.0),
    _row("random", 0.2, 60.0),
    # Ties in FA: the largest alpha wins; an FA gain qualifies.
    _row("tie", 0.1, 91.0, hs=70.0),
    _row("tie", 0.3, 91.0, hs=20.0, fa=90.0),
]


def _by_method(selected):
    return {s["method"]: s for s in selected}


def test_largest_alpha_within_budget_with_test_figures():
    got = _by_method(select_under_budget(SWEEP, 2))
    assert list(got) == ["wanda", "magnitude", "random", "tie"]
    assert got["wanda"]["alpha"] == 0.1  # a drop equal to the budget qualifies
    assert (got["wanda"]["harmful_score"], got["wanda"]["finetune_accuracy"]) == (40.0, 87.0)
    assert got["wanda"]["fa_drop_val"] == 2.0 and got["wanda"]["baseline_finetune_accuracy_val"] == 90.0
    assert got["magnitude"]["alpha"] == 0.2 and got["magnitude"]["harmful_score"] == 30.0
    assert got["random"]["alpha"] is None and got["random"]["harmful_score"] is None
    assert got["tie"]["alpha"] == 0.3 and got["tie"]["fa_drop_val"] == -1.0


def test_budget_zero_and_larger_budgets():
    assert _by_method(select_under_budget(SWEEP, 0))["wanda"]["alpha"] == 0.05
    assert _by_method(select_under_budget(SWEEP, 6))["wanda"]["alpha"] == 0.2
    assert _by_method(select_under_budget(SWEEP, 30))["random"]["alpha"] == 0.2
    rows = budget_rows(SWEEP, budgets=[2, 5], methods=["wanda"])
    assert [(r["fa_budget"], r["alpha"]) for r in rows] == [(2, 0.1), (5, 0.1)]


def test_float_noise_at_the_boundary_qualifies():
    rows = [_row("none", 0.0, 100 * 2 / 3), _row("m", 0.1, 100 * 2 / 3 - 2.0000000000001)]
    assert select_under_budget(rows, 2)[0]["alpha"] == 0.1


def test_markdown_table():
    text = budget_markdown(SWEEP, budgets=[2, 5])
    assert "## HS at FA budget" in text
    lines = [line for line in text.splitlines() if line.startswith("| 2 | wanda")]
    # 45 of 50 vs 44 of 50 validation questions: the drop's unpaired interval, far wider than 2.
    assert lines == [
        "| 2 | wanda | 0.1 | 10.0 | 40.0 (30.9-49.8) | 87.0 (81.6-91.0) | 88.0 (-2.0) "
        "| 2.0 [-11.0, 15.1] | yes |"
    ]
    assert "| 5 | random | none qualifies | - | - | - | - | - | - |" in text
    assert "noise-limited" in text
    assert (
        "| 0 | wanda | 0.05 | 5.0 | 80.0 (71.1-86.7) | 80.0 (73.9-85.0) | 90.0 (+0.0) |"
        in budget_markdown(SWEEP, [0])
    )
    assert "| 2 | tie | 0.3 | 30.0 | 20.0" in text and "91.0 (+1.0) |" in text


@pytest.mark.parametrize(
    ("rows", "kw", "message"),
    [
        (SWEEP, {"fa_budget": -1}, "fa_budget"),
        (SWEEP[2:], {"fa_budget": 2}, "exactly one unrepaired row"),
        ([_row("none", 0.0, None), *SWEEP[2:]], {"fa_budget": 2}, "fa_validation_size"),
        ([*SWEEP, _row("wanda", 0.1, 90.0)], {"fa_budget": 2}, "each alpha at most once"),
        ([*SWEEP, _row("x", 0.1, None)], {"fa_budget": 2}, "validation FA"),
        (SWEEP, {"fa_budget": 2, "methods": ["nope"]}, "nope"),
    ],
)
def test_bad_input(rows, kw, message):
    with pytest.raises(ConfigError, match=message):
        select_under_budget(rows, **kw)


# ----------------------------------------------------------------- the interval of the validation FA drop
def _tabled(both, first_only, second_only, neither):
    """Per-question outcomes of two rows from a paired 2x2 table (question index -> correct)."""
    first = [True] * (both + first_only) + [False] * (second_only + neither)
    second = [True] * both + [False] * first_only + [True] * second_only + [False] * neither
    return dict(enumerate(first)), dict(enumerate(second))


def test_unpaired_drop_interval_is_newcombes_hybrid_score_interval():
    """Newcombe (1998a), method 10, example 56/70 vs 48/80: difference 0.2, interval 0.0524-0.3339.

    By hand: Wilson 95% of 56/70 is 0.6918-0.8770 and of 48/80 0.4905-0.7004; square-and-add gives
    0.2 - sqrt((0.8-0.6918)^2 + (0.7004-0.6)^2) = 0.0524 and 0.2 + sqrt((0.6-0.4905)^2 +
    (0.8770-0.8)^2) = 0.3339.
    """
    rows = [
        _row("none", 0.0, 80.0, n_finetune_accuracy_val=70),
        _row("wanda", 0.1, 60.0, n_finetune_accuracy_val=80),
    ]
    wide, narrow = (select_under_budget(rows, budget)[0] for budget in (25, 30))
    assert wide["fa_drop_val"] == pytest.approx(20.0) and wide["fa_drop_val_interval"] == "unpaired"
    assert wide["fa_drop_val_low"] == pytest.approx(5.24, abs=0.01)
    assert wide["fa_drop_val_high"] == pytest.approx(33.39, abs=0.01)
    # Width 28.15: wider than a 25-point budget (noise-limited), narrower than a 30-point one.
    assert wide["noise_limited"] is True and narrow["noise_limited"] is False


@pytest.mark.parametrize(
    ("table", "low", "high"),
    [
        # Newcombe (1998b), method 10, examples (a) and (b): both differences 10/50 = 0.2.
        ((36, 12, 2, 0), 5.69, 34.04),
        ((18, 12, 2, 18), 5.62, 32.90),
    ],
)
def test_paired_drop_interval_uses_per_question_outcomes(table, low, high):
    """Same questions: the paired interval. By hand for (a): the unrepaired model answers 48 of 50,
    the chosen alpha 38 of 50; Wilson 0.8654-0.9890 and 0.6259-0.8570; ad - bc = -24, so phi =
    -24 / sqrt(48 * 2 * 38 * 12) = -0.1147; 0.2 - sqrt(0.0946^2 + 2 * 0.1147 * 0.0946 * 0.0970 +
    0.0970^2) = 0.0569 and 0.2 + sqrt(0.1341^2 + 2 * 0.1147 * 0.1341 * 0.0290 + 0.0290^2) = 0.3404."""
    base, chosen = _tabled(*table)
    rows = [
        _row("none", 0.0, 100 * sum(base.values()) / 50, n_finetune_accuracy_val=50),
        _row("wanda", 0.1, 100 * sum(chosen.values()) / 50, n_finetune_accuracy_val=50),
    ]
    outcomes = {("none", 0.0): base, ("wanda", 0.1): chosen}
    got = select_under_budget(rows, 20, val_outcomes=outcomes)[0]
    assert got["alpha"] == 0.1 and got["fa_drop_val_interval"] == "paired"
    assert (got["fa_drop_val_low"], got["fa_drop_val_high"]) == pytest.approx((low, high), abs=0.01)
    assert got["noise_limited"] is True
    unpaired = select_under_budget(rows, 20)[0]
    assert unpaired["fa_drop_val_interval"] == "unpaired"
    assert unpaired["fa_drop_val_high"] - unpaired["fa_drop_val_low"] != pytest.approx(high - low, abs=0.1)


def test_outcomes_of_another_evaluation_are_not_paired():
    base, chosen = _tabled(36, 12, 2, 0)
    rows = [_row("none", 0.0, 96.0), _row("wanda", 0.1, 80.0)]  # chosen row says 40 of 50, outcomes 38
    outcomes = {("none", 0.0): base, ("wanda", 0.1): chosen}
    assert select_under_budget(rows, 20, val_outcomes=outcomes)[0]["fa_drop_val_interval"] == "unpaired"


def test_two_points_of_a_hundred_questions_are_noise_limited():
    """The issue's case: FA 80 on 100 validation questions, a 2-point budget."""
    rows = [
        _row("none", 0.0, 80.0, n_finetune_accuracy_val=100),
        _row("wanda", 0.1, 78.0, n_finetune_accuracy_val=100),
    ]
    got = select_under_budget(rows, 2)[0]
    assert got["alpha"] == 0.1 and got["noise_limited"] is True
    assert got["fa_drop_val_high"] - got["fa_drop_val_low"] > 20
    no_counts = select_under_budget([{**r, "n_finetune_accuracy_val": None} for r in rows], 2)[0]
    assert no_counts["fa_drop_val_low"] is None and no_counts["noise_limited"] is None
