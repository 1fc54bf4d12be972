"""The pipeline report's analysis sections: choice of alpha, and the summary across seeds."""

from __future__ import annotations

import pytest

from antidote_pl.experiment.reattack import reattack_bars
from antidote_pl.experiment.sections import (
    budget_section,
    focus_alpha,
    reattack_across_seeds,
    seeds_analysis_markdown,
)
from antidote_pl.utils.intervals import wilson_interval


def test_focus_alpha_prefers_the_papers_default():
    assert focus_alpha([0.2, 0.01, 0.1]) == 0.1
    assert focus_alpha([0.01, 0.05, 0.2]) == 0.05


def test_budget_section_needs_validation_fa():
    rows = [{"method": "none", "alpha": 0.0, "finetune_accuracy": 90.0}]
    assert budget_section(rows, ["wanda"]) == (None, "")


def _selection(alpha, hs, fa):
    return {"fa_budget": 2.0, "method": "wanda", "alpha": alpha, "harmful_score": hs, "finetune_accuracy": fa}


def test_seeds_summary_of_budget_overlap_and_reattack():
    by_seed = {
        0: {
            "fa_budget": [_selection(0.05, 40.0, 90.0)],
            "masks": {"alpha": 0.1, "jaccard": {"wanda a0.1": {"wanda a0.1": 1.0, "magnitude a0.1": 0.5}}},
            "reattack": {"wanda a0.1": [{"step": 0, "harmful_score": 10.0, "finetune_accuracy": 50.0}]},
        },
        1: {
            "fa_budget": [_selection(0.1, 20.0, 80.0)],
            "masks": {"alpha": 0.1, "jaccard": {"wanda a0.1": {"wanda a0.1": 1.0, "magnitude a0.1": 0.7}}},
            "reattack": {"wanda a0.1": [{"step": 0, "harmful_score": 30.0, "finetune_accuracy": 70.0}]},
        },
        2: {"fa_budget": [_selection(None, None, None)]},
    }
    md = seeds_analysis_markdown(by_seed)
    # Budget: the alpha each seed chose, and HS/FA over the two seeds where one qualifies.
    # Reports written before the noise flag was recorded: no count of noise-limited choices.
    assert "| 2 | wanda | 0.05 / 0.1 / - | 2 of 3 | 30.0 ± 14.1 | 85.0 ± 7.1 | - |" in md
    assert "| wanda a0.1 | magnitude a0.1 | 0.600 ± 0.141 | 2 |" in md
    assert "| wanda a0.1 | 0 | 20.0 ± 14.1 | 60.0 ± 14.1 | 2 |" in md


def test_seeds_summary_is_empty_without_analyses():
    assert seeds_analysis_markdown({}) == ""
    assert seeds_analysis_markdown({0: {"fa_budget": None, "masks": {}, "reattack": {}}}) == ""


def test_seeds_overlap_is_anchored_on_the_recorded_mask():
    """report.json sorts keys, so the anchor (the first method's mask) is named, not taken first."""
    jaccard = {
        "magnitude a0.05": {"magnitude a0.05": 1.0, "wanda a0.05": 0.2},
        "wanda a0.05": {"magnitude a0.05": 0.2, "wanda a0.05": 1.0},
    }
    masks = {"alpha": 0.05, "anchor": "wanda a0.05", "jaccard": jaccard}
    md = seeds_analysis_markdown({0: {"masks": masks}, 1: {"masks": masks}})
    assert "overlap of the removed sets with wanda a0.05" in md
    assert "| wanda a0.05 | magnitude a0.05 | 0.200 ± 0.000 | 2 |" in md


def _point(step, hs, fa, n=10):
    return {
        "step": step,
        "harmful_score": hs,
        "finetune_accuracy": fa,
        "n_harmful_score": n,
        "n_finetune_accuracy": n,
    }


def test_reattack_across_seeds_means_stds_and_single_seed_points():
    by_seed = {
        0: {"wanda a0.1": [_point(0, 10.0, 50.0), _point(5, 60.0, 70.0)]},
        1: {"wanda a0.1": [_point(0, 30.0, 70.0)], "none": [_point(0, 100.0, 90.0)]},
    }
    curves = reattack_across_seeds(by_seed)
    step0, step5 = curves["wanda a0.1"]
    assert step0["n_seeds"] == 2 and step0["harmful_score"] == 20.0 and step0["finetune_accuracy"] == 60.0
    assert step0["harmful_score_std"] == pytest.approx(14.142, abs=1e-3)
    # A point only one seed reached keeps its item counts: its bar is the Wilson interval, not ± 0.
    assert step5["n_seeds"] == 1 and "harmful_score_std" not in step5 and step5["n_harmful_score"] == 10
    assert step0["n_harmful_score"] == 10 and "finetune_accuracy_std" in step0
    low, high = wilson_interval(6, 10)
    assert reattack_bars(step5, "harmful_score") == pytest.approx((60.0 - low, high - 60.0))
    assert reattack_bars(step0, "harmful_score") == pytest.approx((14.142, 14.142), abs=1e-3)
    assert curves["none"] == [
        {
            "step": 0,
            "n_seeds": 1,
            "harmful_score": 100.0,
            "n_harmful_score": 10,
            "finetune_accuracy": 90.0,
            "n_finetune_accuracy": 10,
        }
    ]


def test_seeds_summary_writes_the_reattack_plot_it_links(tmp_path):
    by_seed = {
        s: {"reattack": {"none": [_point(0, 90.0 + s, 80.0), _point(3, 95.0, 81.0 + s)]}} for s in (0, 1)
    }
    md = seeds_analysis_markdown(by_seed, tmp_path / "curves.png")
    assert "![re-attack across seeds 0, 1](curves.png)" in md
    assert "| none | 3 | 95.0 ± 0.0 | 81.5 ± 0.7 | 2 |" in md
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "](" not in seeds_analysis_markdown(by_seed)  # no plot asked, none linked


def test_single_seed_cells_across_seeds_carry_a_wilson_interval_not_pm_zero():
    """A method that qualifies in 1 of 3 seeds, a re-attack point one seed reached and an overlap one
    seed measured: no "x ± 0.0" anywhere (issue #24)."""
    chosen = {**_selection(0.1, 50.0, 100.0), "n_harmful_score": 10, "n_finetune_accuracy": 10}
    chosen["noise_limited"] = True
    by_seed = {
        0: {"fa_budget": [_selection(None, None, None)]},
        1: {
            "fa_budget": [chosen],
            "masks": {"alpha": 0.1, "jaccard": {"wanda a0.1": {"wanda a0.1": 1.0, "magnitude a0.1": 0.5}}},
            "reattack": {"wanda a0.1": [_point(0, 50.0, 0.0)]},
        },
        2: {"fa_budget": [_selection(None, None, None)], "reattack": {"wanda a0.1": [_point(0, 30.0, 10.0)]}},
    }
    by_seed[1]["reattack"]["wanda a0.1"].append(_point(5, 50.0, 100.0))
    md = seeds_analysis_markdown(by_seed)
    assert "± 0.0" not in md and "±" in md  # the two-seed re-attack point keeps its std
    # Wilson 95% of 5/10: 23.659-76.341; of 10/10: 72.247-100; of 0/10: 0-27.753 (test_known_values).
    assert "| 2 | wanda | - / 0.1 / - | 1 of 3 | 50.0 [23.7, 76.3] | 100.0 [72.2, 100.0] | 1 of 1 |" in md
    assert "| wanda a0.1 | 5 | 50.0 [23.7, 76.3] | 100.0 [72.2, 100.0] | 1 |" in md
    assert "| wanda a0.1 | magnitude a0.1 | 0.500 (1 seed) | 1 |" in md


def test_budget_section_pairs_the_validation_outcomes_of_the_results(tmp_path):
    import json

    from antidote_pl.utils.intervals import paired_difference_interval

    base = [True] * 48 + [False] * 2  # 48 of 50 validation questions right
    chosen = [True] * 46 + [False] * 3 + [True]  # 47 of 50: 46 shared, one the unrepaired model missed
    for name, outcomes in (("none", base), ("wanda_a0.1", chosen)):
        (tmp_path / name).mkdir()
        lines = [{"index": i, "kind": "task_val", "correct": ok} for i, ok in enumerate(outcomes)]
        lines.append({"index": 99, "kind": "task", "correct": False})  # a test question: not used
        (tmp_path / name / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in lines))
    rows = [
        {"method": "none", "alpha": 0.0, "finetune_accuracy_val": 96.0, "n_finetune_accuracy_val": 50},
        {"method": "wanda", "alpha": 0.1, "finetune_accuracy_val": 94.0, "n_finetune_accuracy_val": 50},
    ]
    for row in rows:
        row.update(harmful_score=50.0, n_harmful_score=10, finetune_accuracy=80.0, n_finetune_accuracy=10)
    selections, md = budget_section(rows, ["wanda"], tmp_path)
    assert [s["alpha"] for s in selections] == [0.1, 0.1]  # budgets 2 and 5
    assert all(s["fa_drop_val_interval"] == "paired" for s in selections)
    low, high = paired_difference_interval(base, chosen)
    assert (selections[0]["fa_drop_val_low"], selections[0]["fa_drop_val_high"]) == (low, high)
    assert "Newcombe's paired interval" in md and md.count("| yes |") == 2
    # Without the results: the unpaired interval from the two rates, wider on the same questions.
    unpaired, _ = budget_section(rows, ["wanda"])
    assert unpaired[0]["fa_drop_val_interval"] == "unpaired"
    assert unpaired[0]["fa_drop_val_high"] - unpaired[0]["fa_drop_val_low"] > high - low
