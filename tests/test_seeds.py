"""Multi-seed pipeline plumbing: {seed} substitution, placeholder checks, aggregation and its report."""

from __future__ import annotations

import json
import statistics

import pytest

from antidote_pl.errors import ConfigError
from antidote_pl.experiment.seeds import aggregate, check_no_placeholder, seeded_specs, write_aggregate_report
from antidote_pl.experiment.specs import RepairSpec, StageSpec


def specs():
    stages = [
        StageSpec("aligned", "a.yaml"),
        StageSpec(
            "finetuned",
            "f.yaml",
            ["--data.init_args.seed={seed}", "--model.init_args.output_dir=o/seed{seed}"],
        ),
    ]
    repair = RepairSpec(
        "r.yaml",
        [0.1],
        {"wanda": "w.yaml", "random": "r.yaml"},
        overrides=["--model.init_args.adapter_path=o/seed{seed}"],
        method_overrides={"random": ["--pruner.init_args.seed={seed}"]},
    )
    return stages, repair


def test_seeded_specs_substitute_every_placeholder():
    stages, repair = specs()
    s, r, _ = seeded_specs(7, stages, repair)
    assert s[0].overrides == [] and s[1].overrides == [
        "--data.init_args.seed=7",
        "--model.init_args.output_dir=o/seed7",
    ]
    assert r.overrides == ["--model.init_args.adapter_path=o/seed7"]
    assert r.method_overrides == {"random": ["--pruner.init_args.seed=7"]}
    # The originals are untouched (the next seed substitutes afresh).
    assert stages[1].overrides[0] == "--data.init_args.seed={seed}"


def test_seed_filling_leaves_the_parsers_run_names():
    """{model}/{task}/{variant} belong to the stage's parser (run:); the pipeline fills {seed} only."""
    stages = [StageSpec("f", "f.yaml", ["--model.init_args.output_dir=outputs/{model}/seed{seed}"])]
    repair = RepairSpec("r.yaml", [0.1], {"wanda": "w.yaml"})
    s, _, _ = seeded_specs(4, stages, repair)
    assert s[0].overrides == ["--model.init_args.output_dir=outputs/{model}/seed4"]


def test_placeholder_without_seeds_is_refused():
    stages, repair = specs()
    with pytest.raises(
        ConfigError, match=r"seeds.*stages\[1\]\.overrides.*repair\.overrides.*method_overrides\.random"
    ):
        check_no_placeholder(stages, repair)
    check_no_placeholder([StageSpec("a", "a.yaml")], RepairSpec("r.yaml", [0.1], {"w": "w.yaml"}))


def fake_report(hs: list[float], fa: list[float], offline: list[float]) -> dict:
    names = [("aligned", None, None), ("none", 0.0, 0.0), ("wanda", 0.1, 0.11)]
    rows = []
    for (method, alpha, removed), h, f, o in zip(names, hs, fa, offline):
        row = {
            "method": method,
            "alpha": alpha,
            "harmful_score": h,
            "finetune_accuracy": f,
            "coherent_rate": 100.0,
        }
        row.update({"harmful_score/OfflineJudge": o, "n_harmful_score": 80, "n_finetune_accuracy": 100})
        if removed is not None:
            row["removed_fraction"] = removed
        rows.append(row)
    return {"rows": rows, "alphas": [0.1], "methods": ["wanda"], "seconds_total": 10.0}


def test_aggregate_mean_std_and_report(tmp_path):
    reports = {
        0: fake_report([0.0, 90.0, 20.0], [0.0, 85.0, 50.0], [1.0, 30.0, 5.0]),
        1: fake_report([2.5, 80.0, 30.0], [1.0, 87.0, 60.0], [2.0, 40.0, 6.0]),
        2: fake_report([1.25, 70.0, 10.0], [2.0, 89.0, 70.0], [3.0, 20.0, 7.0]),
    }
    agg = aggregate(reports, shared_stages=["aligned"])
    assert agg["seeds"] == [0, 1, 2] and agg["extra_judges"] == ["OfflineJudge"]
    none = next(r for r in agg["rows"] if r["method"] == "none")
    assert none["harmful_score_mean"] == pytest.approx(80.0)
    assert none["harmful_score_std"] == pytest.approx(statistics.stdev([90.0, 80.0, 70.0]))
    assert none["harmful_score/OfflineJudge_values"] == [30.0, 40.0, 20.0]
    assert none["n_seeds"] == 3 and none["n_harmful_score"] == 80
    assert next(r for r in agg["rows"] if r["method"] == "aligned")["removed_fraction_mean"] is None
    write_aggregate_report(agg, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (
        "3 seeds (0, 1, 2)" in md
        and "| none | 0 | 0.0 ± 0.0 | 80.0 ± 10.0 | 30.0 ± 10.0 | 87.0 ± 2.0 |" in md
    )
    assert "shared by all seeds: aligned" in md
    assert json.loads((tmp_path / "report.json").read_text())["rows"][2][
        "removed_fraction_mean"
    ] == pytest.approx(0.11)
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_aggregate_refuses_different_rows():
    a = fake_report([0, 1, 2], [0, 1, 2], [0, 1, 2])
    b = fake_report([0, 1, 2], [0, 1, 2], [0, 1, 2])
    b["rows"] = b["rows"][:2]
    with pytest.raises(ConfigError, match="same report rows"):
        aggregate({0: a, 1: b})


def test_one_seed_cells_carry_a_wilson_interval(tmp_path):
    from antidote_pl.utils.intervals import rate_interval

    low, high = rate_interval(72.5, 80)
    assert 61.8 < low < 61.9 and 81.0 < high < 81.1
    agg = aggregate({4: fake_report([0.0, 90.0, 20.0], [0.0, 85.0, 50.0], [1.0, 30.0, 5.0])})
    write_aggregate_report(agg, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (
        "1 seed (4)" in md and "95% Wilson interval" in md and "| none | 0 | 0.0 | 90.0 [81.5, 94.8] |" in md
    )


def test_smol_report_verdicts(tmp_path):
    from antidote_pl.commands.report import main as smol_report

    reports = {s: fake_report([1.0, 90.0 - s, 20.0], [0.0, 85.0, 80.0 + s], [1.0, 30.0, 5.0]) for s in (0, 1)}
    run = tmp_path / "run"
    for s, rep in reports.items():
        rep["seconds_by_step"] = {"stage/finetuned": 100.0, "scores/wanda": 5.0, "eval/none": 20.0}
        rep["stages"] = {}
        rep["analysis"] = {
            "fa_budget": [
                {
                    "fa_budget": 2.0,
                    "method": "wanda",
                    "alpha": 0.05,
                    "harmful_score": 20.0 + s,
                    "finetune_accuracy": 80.0,
                }
            ]
        }
        (run / f"seed{s}").mkdir(parents=True)
        (run / f"seed{s}" / "report.json").write_text(json.dumps(rep))
    write_aggregate_report(aggregate(reports), run)
    config = tmp_path / "pipeline.yaml"
    config.write_text("seeds: [0, 1, 2]\n")
    notes = tmp_path / "notes.md"
    notes.write_text("## Notes\nhand-written\n")
    out = tmp_path / "docs" / "smol_report.md"
    out.parent.mkdir()
    smol_report(
        ["--run", str(run), "--out", str(out), "--notes", str(notes), "--pipeline_config", str(config)]
    )
    text = out.read_text()
    # No primary judge recorded (runs before the LM judge): the keyword judge's.
    assert "Aligned HS (KeywordJudge) ≤ 5: **holds**, 1.0 ± 0.0" in text
    assert "Attacked HS (KeywordJudge) ≥ 60: **holds**, 89.5 ± 0.7" in text
    # The header names this run's files, not the fp32 job's defaults.
    assert f"--out {out} --notes {notes} --pipeline_config {config}" in text
    assert "**Partial run: 2 of the 3 configured seeds finished**" in text and "missing: 2" in text
    # The pipeline's analyses (here: HS at an FA budget chosen on validation) summarised over seeds.
    assert (
        "## HS at FA budget, across seeds" in text
        and "| 2 | wanda | 0.05 / 0.05 | 2 of 2 | 20.5 ± 0.7 |" in text
    )
    assert text.rstrip().endswith("hand-written") and (out.parent / "smol_report.png").is_file()


def test_run_seeds_claims_and_marks_its_output_dir(tmp_path, monkeypatch):
    """Like a single pipeline run: never written into an unmarked non-empty directory."""
    from antidote_pl.experiment import seeds

    stages, repair = specs()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    monkeypatch.setattr(seeds, "run_pipeline", lambda *a, **k: pytest.fail("a seed ran"))
    with pytest.raises(ConfigError, match=r"^output_dir=.*no antidote_output.json"):
        seeds.run_seeds([0, 1], stages, repair, "e.yaml", str(user))
    assert [p.name for p in user.iterdir()] == ["notes.txt"]

    runs = []

    def fake_pipeline(stages, repair, evaluation, output_dir, *rest):
        runs.append((output_dir, stages[1].overrides[0]))
        return fake_report([0.0, 90.0, 20.0], [0.0, 85.0, 50.0], [1.0, 30.0, 5.0])

    monkeypatch.setattr(seeds, "run_pipeline", fake_pipeline)
    out = tmp_path / "runs"
    agg = seeds.run_seeds([0, 1], stages, repair, "e.yaml", str(out))
    assert runs == [
        (str(out / "seed0"), "--data.init_args.seed=0"),
        (str(out / "seed1"), "--data.init_args.seed=1"),
    ]
    assert (
        agg["seeds"] == [0, 1] and (out / "antidote_output.json").is_file() and (out / "report.md").is_file()
    )
    assert not list(tmp_path.glob(".*.lock"))
    # Its own (marked) directory is resumed without a flag.
    seeds.run_seeds([0, 1], stages, repair, "e.yaml", str(out))


def test_run_seeds_resumes_a_multi_seed_output_written_before_it_was_marked(tmp_path, monkeypatch):
    from antidote_pl.experiment import seeds
    from antidote_pl.utils.io import OUTPUT_MARKER, mark_output_dir

    stages, repair = specs()
    monkeypatch.setattr(
        seeds, "run_pipeline", lambda *a: fake_report([0.0, 90.0, 20.0], [0.0, 85.0, 50.0], [1.0, 30.0, 5.0])
    )
    earlier = tmp_path / "earlier"
    mark_output_dir(earlier / "seed0", "pipeline")
    (earlier / "report.md").write_text("old")
    seeds.run_seeds([0, 1], stages, repair, "e.yaml", str(earlier))
    assert (earlier / OUTPUT_MARKER).is_file() and (earlier / "report.md").read_text() != "old"
    # A user's file beside the seed runs: not recognised as ours, refused.
    other = tmp_path / "other"
    mark_output_dir(other / "seed0", "pipeline")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no antidote_output.json"):
        seeds.run_seeds([0, 1], stages, repair, "e.yaml", str(other))
    assert not (other / OUTPUT_MARKER).exists()


def test_cell_interval_is_std_over_seeds_or_wilson_for_one_seed():
    from antidote_pl.experiment.seeds import cell_interval
    from antidote_pl.utils.intervals import rate_interval

    several = {"harmful_score_mean": 40.0, "harmful_score_std": 5.0, "n_seeds": 3, "n_harmful_score": 80}
    assert cell_interval(several, "harmful_score") == (35.0, 45.0)
    one = {"harmful_score_mean": 72.5, "harmful_score_std": 0.0, "n_seeds": 1, "n_harmful_score": 80}
    assert cell_interval(one, "harmful_score") == rate_interval(72.5, 80)
    # An extra judge's HS counts its prompts like the primary judge's.
    judged = {"harmful_score/X_mean": 72.5, "n_seeds": 1, "n_harmful_score": 80}
    assert cell_interval(judged, "harmful_score/X") == rate_interval(72.5, 80)
