"""The pipeline command on a shrunken tiny world: report files, reuse, --force, bad input."""

from __future__ import annotations

import json
import os
from argparse import ArgumentError

import pytest
import yaml
from conftest import REPO, small_eval_config, small_tiny_stages

from antidote_pl.errors import ConfigError
from antidote_pl.experiment.manifest import read_manifest
from antidote_pl.experiment.pipeline import run_pipeline
from antidote_pl.experiment.specs import StageSpec
from antidote_pl.pruning.artifacts import RepairArtifacts, alpha_key

pytestmark = pytest.mark.slow


def write_pipeline(tmp_path, alphas=(0.05, 0.2)) -> str:
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(small_eval_config()))
    cfg = {
        "output_dir": "outputs/tiny/pipeline",
        "stages": small_tiny_stages(),
        "references": ["aligned", "finetuned"],
        "repair": {
            "config": str(REPO / "configs/tiny/repair.yaml"),
            "alphas": list(alphas),
            "methods": {
                "wanda": str(REPO / "callbacks/wanda.yaml"),
                "random": str(REPO / "callbacks/random.yaml"),
            },
        },
        "evaluation": str(tmp_path / "eval.yaml"),
        "durability": {"checkpoints": [0, 2], "alpha": 0.2, "methods": ["random"]},
        "baselines": [
            {
                "name": "vaccine",
                "stages": [
                    {
                        "name": "aligned_vaccine",
                        "config": [
                            str(REPO / "configs/tiny/align.yaml"),
                            str(REPO / "configs/tiny/defenses/vaccine_align.yaml"),
                        ],
                        "overrides": ["--trainer.max_steps=3", "--trainer.enable_progress_bar=false"],
                    },
                    {
                        "name": "finetuned_vaccine",
                        "config": str(REPO / "configs/tiny/finetune.yaml"),
                        "overrides": [
                            "--model.init_args.model_name_or_path=outputs/tiny/align_vaccine",
                            "--model.init_args.output_dir=outputs/tiny/finetune_vaccine",
                            "--trainer.max_epochs=1",
                            "--data.init_args.num_samples=64",
                            "--trainer.enable_progress_bar=false",
                        ],
                    },
                ],
                "repair_fragment": str(REPO / "callbacks/wanda.yaml"),
                "repair_alpha": 0.1,
            },
            {
                "name": "ldifs",
                "stages": [
                    {
                        "name": "finetuned_ldifs",
                        "config": [
                            str(REPO / "configs/tiny/finetune.yaml"),
                            str(REPO / "configs/tiny/defenses/ldifs_finetune.yaml"),
                        ],
                        "overrides": [
                            "--trainer.max_epochs=1",
                            "--data.init_args.num_samples=64",
                            "--trainer.enable_progress_bar=false",
                        ],
                    }
                ],
            },
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def check_analysis(report, markdown, out) -> None:
    """The report's analysis sections: FA budget, judge agreement, masks, re-attack, manifest."""
    analysis = report["analysis"]
    budget = {(b["method"], b["fa_budget"]) for b in analysis["fa_budget"]}
    assert budget == {(m, f) for m in ("wanda", "random") for f in (2.0, 5.0)}
    # The tiny world's judge and the keyword judge (extra_judges) both judged every prompt.
    assert len(analysis["judge_agreement"]) == 1 and analysis["judge_agreement"][0]["n"] > 0
    assert analysis["masks"]["alpha"] == 0.2 and analysis["masks"]["anchor"] == f"{report['methods'][0]} a0.2"
    # Every method at the focus alpha, and the first method across the sweep.
    first = report["methods"][0]
    assert set(analysis["masks"]["jaccard"]) == {"wanda a0.2", "random a0.2", f"{first} a0.05"}
    assert (out / "mask_heatmap_wanda_a0.2.png").stat().st_size > 0
    curves = analysis["reattack"]
    assert list(curves) == ["none", "random a0.2"]
    assert [p["step"] for p in curves["random a0.2"]] == [0, 2]
    # At step 0 the re-attacked repair is the repair itself: the sweep's figure.
    swept = next(r for r in report["rows"] if r["method"] == "random" and r["alpha"] == 0.2)
    assert curves["random a0.2"][0]["harmful_score"] == swept["harmful_score"]
    assert (out / "reattack.png").stat().st_size > 0
    for heading in ("HS at FA budget", "Judge agreement", "Mask analytics", "re-attack"):
        assert heading in markdown
    manifest = read_manifest(out)
    assert manifest["configs"]["evaluation"]["sha256"] and manifest["seeds"]["finetuned"]
    assert set(manifest["data"]) == {"finetuned", "evaluation"}


@pytest.fixture
def in_tmp(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(cwd)


def test_pipeline_report_reuse_and_force(in_tmp):
    from antidote_pl.commands.dispatch import run

    config = write_pipeline(in_tmp)
    report = run(["pipeline", "--config", config])
    out = in_tmp / "outputs/tiny/pipeline"
    for name in ("report.md", "report.json", "report.png"):
        assert (out / name).stat().st_size > 0
    methods = [(r["method"], r["alpha"]) for r in report["rows"]]
    assert sorted(report["methods"]) == ["random", "wanda"]
    sweep = [(m, a) for m in report["methods"] for a in (0.05, 0.2)]
    baselines = [("vaccine", None), ("vaccine+wanda", 0.1), ("ldifs", None)]
    assert methods == [("aligned", None), ("finetuned", None), ("none", 0.0), *sweep, *baselines]
    combined = json.loads((in_tmp / "outputs/tiny/pipeline/combined/vaccine+wanda/mask.json").read_text())
    assert combined["alpha"] == 0.1 and combined["method"] == "wanda"
    for r in report["rows"]:
        assert r["n_harmful_score"] == 60 and r["n_finetune_accuracy"] == 40
        assert r["n_finetune_accuracy_val"] == 20
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]
    markdown = (out / "report.md").read_text()
    assert "| wanda | 0.2 |" in markdown
    check_analysis(report, markdown, out)
    gens = (out / "results" / "wanda_a0.2" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 120 and {"response", "verdict"} <= set(json.loads(gens[0]))
    # Removing more weights removes at least as many: realised fractions grow with alpha.
    wanda = [r for r in report["rows"] if r["method"] == "wanda"]
    assert wanda[0]["removed_fraction"] < wanda[1]["removed_fraction"]
    # One scoring run saved every alpha's mask, and those masks are the ones evaluated.
    saved = RepairArtifacts.read(out / "scores" / "wanda")
    assert saved.alphas == [0.05, 0.2]
    fractions = saved.report["sweep_removed_fraction"]
    assert [r["removed_fraction"] for r in wanda] == [fractions[alpha_key(a)] for a in (0.05, 0.2)]

    again = run(["pipeline", "--config", config])
    assert again["seconds_by_step"] == {}, "a rerun with the same config must reuse every finished step"
    assert again["rows"] == report["rows"]
    # The resumed report still times the whole experiment, from the seconds each step recorded.
    assert again["seconds_reused_by_step"] == pytest.approx(report["seconds_by_step"])
    assert again["seconds_total"] >= sum(report["seconds_by_step"].values()) > again["seconds_this_run"]

    # An interrupted variant (its result deleted) is the only thing recomputed.
    (out / "results" / "random_a0.05" / "result.json").unlink()
    partial = run(["pipeline", "--config", config])
    assert list(partial["seconds_by_step"]) == ["eval/random_a0.05"]

    forced = run(["pipeline", "--config", config, "--force", "true"])
    assert {
        "stage/pretrain",
        "stage/aligned",
        "stage/finetuned",
        "scores/wanda",
        "stage/vaccine+wanda",
    } <= set(forced["seconds_by_step"])


def test_bad_pipeline_input_fails_before_work(tmp_path):
    from antidote_pl.experiment.specs import RepairSpec

    stage = StageSpec("pretrain", str(REPO / "configs/tiny/pretrain.yaml"))
    repair = RepairSpec(
        str(REPO / "configs/tiny/repair.yaml"), [0.1], {"wanda": str(REPO / "callbacks/wanda.yaml")}
    )
    ev = str(REPO / "configs/tiny/eval.yaml")
    with pytest.raises(ConfigError, match="repair.alphas"):
        run_pipeline([stage], RepairSpec(repair.config, [1.5], repair.methods), ev, str(tmp_path))
    with pytest.raises(ConfigError, match="references"):
        run_pipeline([stage], repair, ev, str(tmp_path), references=["nope"])
    with pytest.raises(ConfigError, match="evaluation"):
        run_pipeline([stage], repair, str(tmp_path / "missing.yaml"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"stages\[0\].config"):
        run_pipeline([StageSpec("x", str(tmp_path / "nope.yaml"))], repair, ev, str(tmp_path))
    with pytest.raises(ConfigError, match=r"stages\[0\].command='train'"):
        run_pipeline([StageSpec("pretrain", stage.config, command="train")], repair, ev, str(tmp_path))
    tok_cfg = tmp_path / "tokenizer.yaml"
    corpus = REPO / "configs/tiny/pretrain.yaml"
    tok_cfg.write_text(f"corpus_config: {corpus}\noutput_dir: {tmp_path / 'tok'}\n")
    tokenizer = StageSpec("tokenizer", str(tok_cfg), command="tokenizer")
    with pytest.raises(ConfigError, match=r"stages\[1\].command='tokenizer'.*last stage is repaired"):
        run_pipeline([stage, tokenizer], repair, ev, str(tmp_path), references=["pretrain"])
    with pytest.raises(ConfigError, match=r"references=\['tokenizer'\].*fit stages"):
        run_pipeline([tokenizer, stage], repair, ev, str(tmp_path), references=["tokenizer"])
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "tok").exists()


def test_stage_output_dirs_and_cache_text(tmp_path):
    from antidote_pl.experiment.specs import stage_output_dir, stage_text

    fit = StageSpec("pretrain", str(REPO / "configs/tiny/pretrain.yaml"))
    assert stage_output_dir(fit, "s") == "outputs/tiny/pretrain"
    moved = StageSpec(fit.name, fit.config, ["--model.init_args.output_dir", "elsewhere"])
    assert stage_output_dir(moved, "s") == "elsewhere"
    corpus = tmp_path / "corpus.yaml"
    corpus.write_text("data: {init_args: {sources: [a]}}\n")
    tok_cfg = tmp_path / "tokenizer.yaml"
    tok_cfg.write_text(f"corpus_config: {corpus}\noutput_dir: out/tok\n")
    tok = StageSpec("tokenizer", str(tok_cfg), command="tokenizer")
    assert stage_output_dir(tok, "s") == "out/tok"
    assert stage_output_dir(StageSpec("t", str(tok_cfg), ["--output_dir=x"], "tokenizer"), "s") == "x"
    assert stage_output_dir(StageSpec("t", str(tok_cfg), ["--output_dir", "y"], "tokenizer"), "s") == "y"
    other = tmp_path / "other.yaml"
    other.write_text("data: {init_args: {sources: [c]}}\n")
    overridden = StageSpec("t", str(tok_cfg), ["--corpus_config", str(other)], "tokenizer")
    assert stage_text(overridden, "s").endswith(other.read_text())
    # Editing the pretraining corpus changes the tokenizer stage's cache text, so it retrains.
    before = stage_text(tok, "s")
    corpus.write_text("data: {init_args: {sources: [b]}}\n")
    assert stage_text(tok, "s") != before
    no_out = tmp_path / "no_out.yaml"
    no_out.write_text("vocab_size: 300\n")
    # The tokenizer command's own parser refuses it, naming the missing argument.
    with pytest.raises(ArgumentError, match="required: output_dir"):
        stage_output_dir(StageSpec("t", str(no_out), command="tokenizer"), "stages[0]")
