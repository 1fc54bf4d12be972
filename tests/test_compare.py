"""Two runs compared cell by cell (``antidote_pl.experiment.compare``, the ``compare`` command)."""

from __future__ import annotations

import copy
import json

import pytest

from antidote_pl.commands.dispatch import main as front_door
from antidote_pl.errors import ConfigError
from antidote_pl.experiment.compare import compare_cell, compare_runs, sign_test_p, user_interval
from antidote_pl.utils.intervals import rate_interval


def _row(method, alpha, hs, fa, knob=None):
    row = {
        "method": method,
        "alpha": alpha,
        "n_seeds": len(hs),
        "n_harmful_score": 80,
        "n_finetune_accuracy": 100,
    }
    if knob:
        row["knob"] = knob
    for metric, values in (("harmful_score", hs), ("finetune_accuracy", fa)):
        row[f"{metric}_values"] = list(values)
    return row


def _report(shift: float = 0.0) -> dict:
    """A 3-seed report: the aligned stage (the same model in every seed), the attacked model, one
    Wanda cell, one re-attack curve and one leaderboard row; ``shift`` moves the Wanda HS."""
    reattack = {
        str(s): {"reattack": {"wanda a0.05": [{"step": 0, "harmful_score": 20.0 + s, "n_harmful_score": 80}]}}
        for s in range(3)
    }
    return {
        "seeds": [0, 1, 2],
        "primary_judge": "LMJudge",
        "rows": [
            _row("aligned", None, [0.0, 0.0, 0.0], [10.0, 10.0, 10.0]),
            _row("none", 0.0, [66.0, 70.0, 62.0], [80.0, 82.0, 84.0]),
            _row("wanda", 0.05, [20.0 + shift, 21.0 + shift, 22.0 + shift], [52.0, 53.0, 51.0]),
        ],
        "analysis": reattack,
        "leaderboard": {
            "rows": [{"method": "wanda", "fa_budget": 5.0, "values": {"0": 0.05, "1": None, "2": 0.05}}]
        },
    }


def _cell(result, variant, metric="harmful_score"):
    (cell,) = [c for c in result["cells"] if c["variant"] == variant and c["metric"] == metric]
    return cell


def test_a_run_against_itself_agrees_everywhere_with_no_shift():
    result = compare_runs(_report(), _report())
    assert result["agree"] == result["total"] == 3 * 2 + 1  # three rows x (HS, FA) + one re-attack HS
    assert result["same_choices"] == result["total_choices"] == 3
    assert all(d["equal"] == d["cells"] and d["sign_test_p"] == 1.0 for d in result["direction"])


def test_a_shift_beyond_both_intervals_is_flagged_and_the_others_still_agree():
    result = compare_runs(_report(), _report(shift=30.0))
    wanda = _cell(result, "wanda 0.05")
    assert not wanda["agrees"] and wanda["differences"] == [30.0, 30.0, 30.0]
    assert _cell(result, "none")["agrees"] and _cell(result, "wanda 0.05", "finetune_accuracy")["agrees"]
    assert result["agree"] == result["total"] - 1


def test_a_cell_with_no_spread_over_seeds_is_judged_by_its_items_wilson_interval():
    low, high = rate_interval(50.0, 80)
    inside, outside = high - 50.0 - 0.5, high - 50.0 + 0.5
    assert compare_cell([50.0] * 3, [50.0 + inside] * 3, 80)["agrees"]
    assert not compare_cell([50.0] * 3, [50.0 + outside] * 3, 80)["agrees"]
    assert user_interval(50.0, 0.0, 80) == pytest.approx((low, high))
    assert user_interval(50.0, 20.0, 80) == (30.0, 70.0)  # the seeds' spread is wider: it wins
    assert user_interval(99.0, 5.0, None) == (94.0, 100.0)  # a rate's interval stays within [0, 100]


def test_agreement_needs_each_mean_inside_the_other_interval():
    # A wide run and a tight one: the tight run's mean lies inside the wide interval, not the reverse.
    wide, tight = [10.0, 50.0, 90.0], [79.0, 80.0, 81.0]
    assert not compare_cell(wide, tight, None)["agrees"]
    assert compare_cell([70.0, 80.0, 90.0], tight, None)["agrees"]


def test_sign_test_is_the_exact_two_sided_binomial():
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(3, 3) == 1.0
    assert sign_test_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)


def test_choices_and_missing_variants_are_reported():
    other = _report()
    other["leaderboard"]["rows"][0]["values"]["1"] = 0.01
    other["rows"].pop(0)
    result = compare_runs(_report(), other)
    assert result["same_choices"] == 2 and result["total_choices"] == 3
    assert result["unmatched"]["cells"] == ["aligned"]


def test_runs_of_different_seeds_are_refused():
    other = _report()
    other["seeds"] = [0, 1, 3]
    with pytest.raises(ConfigError, match="seeds"):
        compare_runs(_report(), other)


def _write_run(path, report):
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps(report))
    return str(path)


def test_compare_command_writes_markdown_json_and_plot(tmp_path):
    base = _write_run(tmp_path / "fp32", _report())
    other = _write_run(tmp_path / "bf16", _report(shift=30.0))
    out = tmp_path / "cmp" / "precision.md"
    front_door(["compare", "--base", base, "--other", other, "--labels", "[fp32,bf16]", "--out", str(out)])
    text = out.read_text()
    assert "**no**, 6 of 7" in text and "## Cells that disagree" in text
    assert "| wanda 0.05 | 21.0 ± 1.0 / 51.0 ± 1.0 ✗ |" in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["labels"] == ["fp32", "bf16"] and saved["agree"] == 6
    assert out.with_suffix(".png").stat().st_size > 0


def test_compare_command_refuses_a_directory_without_a_report(tmp_path, capsys):
    base = _write_run(tmp_path / "fp32", _report())
    with pytest.raises(SystemExit) as exit_info:
        front_door(["compare", "--base", base, "--other", str(tmp_path), "--out", str(tmp_path / "x.md")])
    assert exit_info.value.code == 2
    assert "other" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_labels_must_be_two_different_names(tmp_path):
    base = _write_run(tmp_path / "a", _report())
    other = _write_run(tmp_path / "b", copy.deepcopy(_report()))
    with pytest.raises(SystemExit):
        front_door(
            [
                "compare",
                "--base",
                base,
                "--other",
                other,
                "--labels",
                "[x,x]",
                "--out",
                str(tmp_path / "o.md"),
            ]
        )


def test_direction_counts_the_all_cells_table_once_and_shows_the_shift_per_seed():
    result = compare_runs(_report(), _report(shift=30.0))
    (hs,) = [d for d in result["direction"] if d["metric"] == "harmful_score"]
    # Three rows carry HS; the re-attack's step 0 is not counted a second time.
    assert (hs["cells"], hs["higher"], hs["equal"]) == (3, 1, 2)
    assert hs["shift_per_seed"] == pytest.approx([10.0, 10.0, 10.0])
