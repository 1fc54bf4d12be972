"""The pipeline report's analysis sections: choice of alpha, and the summary across seeds."""

from __future__ import annotations

from antidote_pl.pipeline_analysis import budget_section, focus_alpha, seeds_analysis_markdown


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
    assert "| 2 | wanda | 0.05 / 0.1 / - | 2 of 3 | 30.0 ± 14.1 | 85.0 ± 7.1 |" in md
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
