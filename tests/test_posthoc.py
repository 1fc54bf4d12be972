"""Post-hoc analysis of a saved pipeline run: masks recomputed from scores, Jaccards, judge agreement."""

from __future__ import annotations

import json

import pytest
import torch

from antidote_pl.commands.posthoc import main
from antidote_pl.errors import ConfigError
from antidote_pl.experiment.posthoc import (
    find_runs,
    load_all_masks,
    method_masks,
    pair_table,
    primary_judge,
    render,
)
from antidote_pl.pruning import overall_fraction, select_masks
from antidote_pl.pruning.artifacts import SCORES_FILE, write_artifacts

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.default.weight"
ALPHAS = [0.25, 0.5]
# One row of 8 entries per tensor; row scope removes the top 2 (alpha 0.25) or top 4 (alpha 0.5).
SCORES = {
    "wanda": [8, 7, 6, 5, 4, 3, 2, 1],  # 0.25 removes {0, 1}; 0.5 removes {0, 1, 2, 3}
    "wanda_benign": [8, 1, 7, 2, 6, 3, 5, 4],  # 0.25 removes {0, 2}; 0.5 removes {0, 2, 4, 6}
    "magnitude": [1, 8, 2, 3, 4, 5, 6, 7],  # 0.25 removes {1, 7}; 0.5 removes {1, 5, 6, 7}
}


def _v(harmful: bool, coherent: bool | None = None) -> dict:
    return {"harmful": harmful, "category": None, "score": None, "coherent": coherent}


def _write_method(directory, scores: list[float], own_alpha: float = 0.25, tamper: bool = False) -> None:
    s = {NAME.format(f): torch.tensor([scores], dtype=torch.float32) for f in ("A", "B")}
    masks = select_masks(s, own_alpha, "row")
    if tamper:  # an applied mask that the saved scores do not give
        masks = {n: m.flip(-1) for n, m in masks.items()}
    report = {
        "target": "lora",
        "scope": "row",
        "alpha": own_alpha,
        "protect_fraction": 0.0,
        "removed_fraction": overall_fraction(masks),
    }
    write_artifacts(directory, masks, s, report)


def _write_generations(path, keyword: list[bool], offline: list[bool]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"index": i, "kind": "harmful", "verdict": _v(k, True), "verdicts": {"OfflineJudge": _v(o)}}
        for i, (k, o) in enumerate(zip(keyword, offline))
    ]
    rows.append({"index": len(rows), "kind": "task", "correct": True})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _make_run(root, seeds=(0, 1)):
    for seed in seeds:
        d = root / f"seed{seed}"
        for method, scores in SCORES.items():
            # seed 1's wanda ranks the row reversed: across seeds at 0.5 {0..3} vs {4..7} -> 0.
            reverse = seed == 1 and method == "wanda"
            _write_method(d / "scores" / method, scores[::-1] if reverse else scores)
        (d / "report.json").write_text(json.dumps({"methods": list(SCORES), "alphas": ALPHAS}))
        # Keyword vs offline: none agrees on 3 of 4 prompts, wanda_a0.25 on 1 of 4 -> pooled 4 of 8.
        _write_generations(d / "results" / "none" / "generations.jsonl", [1, 1, 0, 0], [1, 1, 0, 1])
        _write_generations(d / "results" / "wanda_a0.25" / "generations.jsonl", [1, 0, 1, 0], [0, 1, 1, 1])
    return root


def test_masks_recomputed_from_saved_scores(tmp_path):
    _write_method(tmp_path / "m", SCORES["magnitude"])
    by_alpha = method_masks(tmp_path / "m", ALPHAS)
    removed = {a: by_alpha[a][NAME.format("A")][0].nonzero().flatten().tolist() for a in ALPHAS}
    assert removed == {0.25: [1, 7], 0.5: [1, 5, 6, 7]}


def test_recomputation_is_checked_against_the_applied_mask(tmp_path):
    _write_method(tmp_path / "m", SCORES["wanda"], tamper=True)
    with pytest.raises(ConfigError, match="differs from the mask recomputed"):
        method_masks(tmp_path / "m", ALPHAS)


def test_known_jaccards_and_chance(tmp_path):
    runs = find_runs(_make_run(tmp_path))
    assert [r.label for r in runs] == ["seed0", "seed1"]
    masks = load_all_masks(runs)
    # wanda vs magnitude: 0.25 {0,1} vs {1,7} -> 1/3 (chance .0625/.4375 = 0.143);
    # 0.5 {0,1,2,3} vs {1,5,6,7} -> 1/7 (chance 1/3). Seed 1's reversed wanda: {6,7} and {4..7}.
    table = pair_table(masks, runs[:1], "wanda", "magnitude")
    assert "| 0.25 | 0.333 (0.143) |" in table and "| 0.5 | 0.143 (0.333) |" in table
    both = pair_table(masks, runs, "wanda", "magnitude")
    # seed 1 at 0.25: {6,7} vs {1,7} -> 1/3; at 0.5: {4,5,6,7} vs {1,5,6,7} -> 3/5; means 0.333, 0.371.
    assert "| 0.25 | 0.333 (0.143) | 0.333 (0.143) | 0.333 (0.143) |" in both
    assert "| 0.5 | 0.143 (0.333) | 0.600 (0.333) | 0.371 (0.333) |" in both


def test_report_sections_and_pooled_agreement(tmp_path):
    run = _make_run(tmp_path / "run")
    config = tmp_path / "eval.yaml"
    config.write_text("model:\n  init_args:\n    judge: {class_path: antidote_pl.judges.base.KeywordJudge}\n")
    text = render(run, tmp_path / "docs", config, "## Reading\n\nhand-written")
    # Across seeds at 0.5 (the focus alpha: 0.1 is not swept), in corresponding coordinates: lora_A
    # ([1, 8]) columns touched {0..3} vs {4..7}; lora_B ([1, 8]) its one output row, touched in both.
    # Jaccard 1 / 9 = 0.111; 5 of 9 touched in each, chance (25/81) / (65/81) = 0.385.
    assert "| seed0 | 55.6 | 1.000 | 0.111 (0.385) |" in text and "BA equals (BM)(M⁻¹A)" in text
    assert "| q.lora_A | 0.333 (0.333) | 0.143 (0.333) | 0.000 (0.333) |" in text
    assert "| q.lora_B | 0.333 (0.333) | 0.143 (0.333) | 1.000 (1.000) |" in text
    # Harmful vs benign at 0.25: seed 0 {0,1} vs {0,2} -> 1/3; seed 1 {6,7} vs {0,2} -> 0.
    assert "| 0.25 | 0.333 (0.143) | 0.000 (0.143) | 0.167 (0.143) |" in text.split("Harmful vs benign")[1]
    # Pooled over both variants: 4 of 8 agree; over both seeds 8 of 16.
    assert "| KeywordJudge | OfflineJudge | 8 | 50.0 |" in text
    assert "| KeywordJudge | OfflineJudge | 16 | 50.0 |" in text
    assert "Primary judge: KeywordJudge" in text and text.rstrip().endswith("hand-written")
    assert (tmp_path / "docs" / "mask_heatmap_wanda_a0.5.png").is_file()


def test_single_seed_run_and_cli(tmp_path):
    _make_run(tmp_path, seeds=(0,))
    out = tmp_path / "docs" / "analysis.md"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "analysis_notes.md").write_text("## Reading\n\nnotes here\n")
    main(["--run", str(tmp_path / "seed0"), "--out", str(out)])
    text = out.read_text()
    assert "One seed: no overlap across seeds." in text and text.rstrip().endswith("notes here")
    assert "| KeywordJudge" not in text and "| primary | OfflineJudge | 8 | 50.0 |" in text


def test_edit_repairs_and_masks_of_other_tensors_are_left_out(tmp_path):
    """A weight-editing repair (repair.json, no mask) is skipped; a mask over other tensors (Wanda in
    delta space) is named as left out instead of failing the overlap (issue #27's 16-method run)."""
    run = _make_run(tmp_path / "run", seeds=(0,))
    seed = run / "seed0"
    (seed / "scores" / "delta_scaling").mkdir(parents=True)
    (seed / "scores" / "delta_scaling" / "repair.json").write_text(json.dumps({"knob": "lambda"}))
    other = {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": torch.rand(1, 8)}
    sweep = {a: select_masks(other, a, "row") for a in ALPHAS}
    report = {"target": "delta", "scope": "row", "alpha": 0.25, "protect_fraction": 0.0}
    report |= {"removed_fraction": 0.25, "sweep_removed_fraction": {str(a): a for a in ALPHAS}}
    write_artifacts(seed / "scores" / "wanda_delta", sweep[0.25], other, report, sweep=sweep)
    methods = [*SCORES, "wanda_delta", "delta_scaling"]
    (seed / "report.json").write_text(json.dumps({"methods": methods, "alphas": ALPHAS}))
    assert find_runs(seed)[0].methods == [*SCORES, "wanda_delta"]
    text = render(seed, tmp_path / "docs", None, "")
    assert "Left out of these overlaps: wanda_delta" in text and "delta_scaling" not in text


def test_judge_from_manifest(tmp_path):
    run = find_runs(_make_run(tmp_path, seeds=(0,)))[0]
    entry = {"text": "model:\n  init_args:\n    judge: {class_path: my.pkg.StrictJudge}\n"}
    (run.directory / "manifest.json").write_text(json.dumps({"configs": {"evaluation": entry}}))
    assert primary_judge(run, None)[0] == "StrictJudge"
    # The judge the evaluator built, recorded in report.json, wins over the recorded config text (a
    # composed evaluation, e.g. eval.yaml then a judge fragment, is several files in one entry).
    report = json.loads((run.directory / "report.json").read_text()) | {"primary_judge": "LMJudge"}
    (run.directory / "report.json").write_text(json.dumps(report))
    assert primary_judge(run, None)[0] == "LMJudge"


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing; expected a pipeline output_dir"):
        find_runs(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="neither scores/ nor seed<N>/scores/"):
        find_runs(tmp_path)
    _make_run(tmp_path / "run", seeds=(0,))
    (tmp_path / "run" / "seed0" / "scores" / "wanda" / SCORES_FILE).unlink()
    with pytest.raises(ConfigError, match="scores.safetensors: missing"):
        load_all_masks(find_runs(tmp_path / "run"))
