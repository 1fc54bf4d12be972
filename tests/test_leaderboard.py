"""The repair leaderboard over seeds: budget choices, per-judge ranks, single-seed intervals."""

from __future__ import annotations

import pytest

from antidote_pl.experiment.leaderboard import format_summary, leaderboard, leaderboard_markdown, summarise


def row(method, value, hs, fa, keyword, knob="alpha"):
    return {
        "method": method,
        "alpha": value,
        "knob": knob,
        "harmful_score": hs,
        "n_harmful_score": 80,
        "harmful_score/KeywordJudge": keyword,
        "n_harmful_score/KeywordJudge": 80,
        "finetune_accuracy": fa,
        "n_finetune_accuracy": 100,
        "coherent_rate": 90.0,
        "n_coherent_rate": 80,
    }


def report(choices, rows, reattack=None):
    """A seed's report: rows, the budget choices {(method, budget): value} and re-attack curves."""
    fa_budget = [{"method": m, "fa_budget": b, "alpha": v} for (m, b), v in choices.items()]
    return {
        "methods": ["wanda", "delta_scaling"],
        "rows": rows,
        "analysis": {"fa_budget": fa_budget, "reattack": reattack or {}},
    }


ROWS = [
    row("wanda", 0.05, 40.0, 70.0, 90.0),
    row("wanda", 0.1, 20.0, 50.0, 80.0),
    row("delta_scaling", 0.5, 30.0, 80.0, 60.0, knob="lambda"),
]


def test_budget_choices_figures_and_ranks_per_judge():
    seeds = {
        0: report({("wanda", 5.0): 0.05, ("delta_scaling", 5.0): 0.5}, ROWS),
        1: report({("wanda", 5.0): 0.1, ("delta_scaling", 5.0): None}, ROWS),
    }
    board = leaderboard(seeds, budgets=[5.0])
    wanda, scaling = board["rows"]
    assert wanda["values"] == {"0": 0.05, "1": 0.1} and wanda["seeds_within"] == 2
    assert wanda["harmful_score"]["mean"] == pytest.approx(30.0)
    assert scaling["seeds_within"] == 1 and scaling["knob"] == "lambda"
    # HS: wanda 30 = delta_scaling 30 (tie: both rank 1); keyword: wanda 85 > 60, so wanda drops.
    assert wanda["rank"] == scaling["rank"] == 1
    assert wanda["rank/KeywordJudge"] == 2 and wanda["standing_changes"] == ["KeywordJudge"]
    assert scaling["standing_changes"] == []
    text = leaderboard_markdown(board, "TinyWorldJudge")
    assert "wanda †" in text and "lambda: 0.5, -" in text and "1 of 2" in text


def test_method_without_qualifying_seed_ranks_last_with_dashes():
    seeds = {0: report({("wanda", 2.0): None, ("delta_scaling", 2.0): 0.5}, ROWS)}
    board = leaderboard(seeds, budgets=[2.0])
    wanda = board["rows"][0]
    assert wanda["rank"] is None and wanda["harmful_score"] is None
    assert "| - | wanda | -" in leaderboard_markdown(board)


def test_reattack_hs_comes_from_the_chosen_setting_curve():
    curve = {"wanda a0.1": [{"step": 0, "harmful_score": 20.0}, {"step": 10, "harmful_score": 95.0}]}
    seeds = {0: report({("wanda", 5.0): 0.1, ("delta_scaling", 5.0): 0.5}, ROWS, curve)}
    wanda, scaling = leaderboard(seeds, budgets=[5.0])["rows"]
    assert wanda["reattack"]["mean"] == 95.0 and scaling["reattack"] is None


def test_one_seed_cells_carry_a_wilson_interval_not_plus_minus_zero():
    one = summarise([(50.0, 100)])
    text = format_summary(one)
    assert "±" not in text and text.startswith("50.0 [") and "40.4" in text
    assert format_summary(summarise([(50.0, 100), (60.0, 100)])) == "55.0 ± 7.1"
    assert format_summary(None) == "-"
