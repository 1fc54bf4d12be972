"""The pipeline runs weight-editing repairs beside pruning: one run per method, every knob value
evaluated from its saved edits, the strongest setting within the FA budget chosen, re-attacked from
that setting, and the leaderboard written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_pipeline import write_pipeline

from antidote_pl.experiment.budget import select_under_budget, strength
from antidote_pl.repair.artifacts import EditArtifacts

VALUES = {"delta_scaling": [0.0, 0.5], "safelora": [0.5, 1.0], "refusal_k1": [0, 2]}


def repairs_pipeline(tmp_path) -> str:
    """The shrunk tiny pipeline of test_pipeline with three weight-editing methods and no baselines."""
    cfg = yaml.safe_load(Path(write_pipeline(tmp_path)).read_text())
    cfg.pop("baselines")
    methods = cfg["repair"]["methods"]
    for name in VALUES:
        methods[name] = str(REPO / f"callbacks/{name}.yaml")
    cfg["repair"]["values"] = VALUES
    cfg["repair"]["method_overrides"] = {"refusal_k1": ["--pruner.init_args.refusal_tokens=6"]}
    cfg["durability"] = {"checkpoints": [0, 2], "methods": [], "from_budget": 100.0}
    path = tmp_path / "repairs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_pipeline_sweeps_every_repair_family(tmp_path):
    from antidote_pl.commands.dispatch import run

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        report = run(["pipeline", "--config", repairs_pipeline(tmp_path)])
    finally:
        os.chdir(cwd)
    out = tmp_path / "outputs/tiny/pipeline"
    rows = {(r["method"], r["alpha"]): r for r in report["rows"] if not r.get("reference")}
    for method, values in VALUES.items():
        saved = EditArtifacts.read(out / "scores" / method)
        assert saved.values == sorted(float(v) for v in values)
        for value in values:
            row = rows[(method, float(value))]
            assert row["knob"] == saved.report["knob"] and row["removed_fraction"] is None
    # Neutral settings evaluate to the unrepaired model exactly (greedy generation is deterministic).
    none = rows[("none", 0.0)]
    for neutral in (("refusal_k1", 0.0),):
        assert rows[neutral]["harmful_score"] == none["harmful_score"]
        assert rows[neutral]["finetune_accuracy"] == none["finetune_accuracy"]
    # lambda 0 removes the whole update: the aligned model's answers, not the attacked ones.
    assert rows[("delta_scaling", 0.0)]["relative_change"] > 0
    # A 100-point budget admits every setting: the strongest one is chosen and re-attacked.
    picks = {p["method"]: p for p in select_under_budget(report["rows"], 100.0)}
    assert picks["delta_scaling"]["alpha"] == 0.0 and picks["refusal_k1"]["alpha"] == 2.0
    curves = report["analysis"]["reattack"]
    assert {"none", "delta_scaling a0", "safelora a1", "refusal_k1 a2", "wanda a0.2"} <= set(curves)
    assert curves["delta_scaling a0"][0]["harmful_score"] == rows[("delta_scaling", 0.0)]["harmful_score"]
    board = report["analysis"]["leaderboard"]
    assert {r["method"] for r in board["rows"]} == {"wanda", "random", *VALUES}
    markdown = (out / "report.md").read_text()
    assert "Repair leaderboard" in markdown and "lambda=0.5" in markdown
    assert json.loads((out / "report.json").read_text())["values"] == {
        k: [float(v) for v in vs] for k, vs in VALUES.items()
    }


def test_strength_orders_every_knob_away_from_its_neutral_value():
    assert strength({"alpha": 0.2}) > strength({"alpha": 0.05})
    assert strength({"alpha": 0.0, "knob": "lambda", "neutral": 1.0}) > strength(
        {"alpha": 0.5, "knob": "lambda", "neutral": 1.0}
    )
    assert strength({"alpha": 0.1, "neutral": float("inf")}) > strength(
        {"alpha": 10.0, "neutral": float("inf")}
    )
    assert strength({"alpha": 30.0, "knob": "epochs", "neutral": 0.0}) > strength(
        {"alpha": 1.0, "neutral": 0.0}
    )


def test_a_weight_editing_method_needs_its_values_before_work(tmp_path, capsys):
    from antidote_pl.commands.dispatch import main

    cfg = yaml.safe_load(Path(repairs_pipeline(tmp_path)).read_text())
    del cfg["repair"]["values"]["safelora"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    for fix, field in ((None, "repair.values.safelora"), ({**VALUES, "wanda": [0.1]}, "repair.values.wanda")):
        if fix is not None:
            cfg["repair"]["values"] = fix
            (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(SystemExit) as exit_:
            main(["pipeline", "--config", str(tmp_path / "bad.yaml")])
        assert exit_.value.code == 2 and field in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()
