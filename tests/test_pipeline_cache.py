"""Cache keys cover every input a step reads; a faithful replay reports "same" (issues #24, #25).

A small tiny-world pipeline (two methods, two alphas) whose fine-tune reads a local harmful JSONL
and whose evaluation carries an n-gram judge saved in the work directory, run once per module. Each
test copies that work directory, changes one input (a data file, the judge retrained in place, the
code version) and resumes: the steps that read it rerun, the others are reused. The replay tests
rerun the recorded run into a new directory and compare its report with the recorded one.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, small_eval_config, small_tiny_stages

from antidote_pl.commands.dispatch import run
from antidote_pl.experiment import cache as cache_module
from antidote_pl.experiment import manifest as manifest_module
from antidote_pl.experiment.cache import (
    DONE_FILE,
    ResultCache,
    RunInputs,
    StageOutput,
    StepTimes,
    cache_key,
    inputs_key,
    stage_fingerprint,
)
from antidote_pl.experiment.manifest import check_differences, check_manifest, read_manifest
from antidote_pl.experiment.replay import compare_reports
from antidote_pl.experiment.specs import StageSpec
from antidote_pl.judges.offline import OfflineJudge
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.utils.hashing import path_identity

#: A clean checkout, whatever state the developer's tree is in (a dirty tree never "matches").
GIT = {"commit": "0" * 40, "dirty": False}
STAGES = ("stage/pretrain", "stage/aligned", "stage/finetuned")
SCORES = ("scores/wanda", "scores/random")
EVALS = (
    "eval/ref_aligned",
    "eval/ref_finetuned",
    "eval/none",
    *(f"eval/{m}_a{a:g}" for m in ("wanda", "random") for a in (0.05, 0.2)),
)


def _write_world(root: Path) -> None:
    """The configs and inputs of the small pipeline, every path relative to ``root``."""
    harmful = TinyWorldSource("harmful_answer").load()
    (root / "harmful.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harmful))
    local = {
        "class_path": "antidote_pl.data.sources.LocalSource",
        "init_args": {
            "path": "harmful.jsonl",
            "fields": {k: k for k in ("instruction", "input", "output", "category")},
        },
    }
    (root / "finetune_data.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"harmful": local}}}))
    with (root / "judge.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["question", "answer", "label"])
        for r in harmful[:60]:
            rows.writerow([r["instruction"], r["output"], 1])
            rows.writerow([r["instruction"], "sorry , i can not help with that .", 0])
    OfflineJudge(train_csv="judge.csv").save("judge")
    ev = small_eval_config()
    judge = {"class_path": "antidote_pl.judges.offline.OfflineJudge", "init_args": {"path": "judge"}}
    ev["model"]["init_args"]["extra_judges"].append(judge)
    (root / "eval.yaml").write_text(yaml.safe_dump(ev))
    cfg = {
        "output_dir": "outputs/tiny/pipeline",
        "stages": small_tiny_stages([str(REPO / "configs/tiny/finetune.yaml"), "finetune_data.yaml"]),
        "references": ["aligned", "finetuned"],
        "repair": {
            "config": str(REPO / "configs/tiny/repair.yaml"),
            "alphas": [0.05, 0.2],
            # Not alphabetical: the replay must keep this order.
            "methods": {
                "wanda": str(REPO / "callbacks/wanda.yaml"),
                "random": str(REPO / "callbacks/random.yaml"),
            },
        },
        "evaluation": "eval.yaml",
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The small pipeline run once: ``(work directory, report)``."""
    root = tmp_path_factory.mktemp("cache_world")
    cwd = os.getcwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest_module, "git_state", lambda *_: dict(GIT))
        os.chdir(root)
        try:
            _write_world(root)
            report = run(["pipeline", "--config", "pipeline.yaml"])
        finally:
            os.chdir(cwd)
    return root, report


@pytest.fixture
def world(recorded, tmp_path, monkeypatch):
    """A copy of the recorded work directory, as the working directory."""
    root = tmp_path / "world"
    shutil.copytree(recorded[0], root)
    monkeypatch.chdir(root)
    monkeypatch.setattr(manifest_module, "git_state", lambda *_: dict(GIT))
    return root


def resume() -> dict:
    return run(["pipeline", "--config", "pipeline.yaml"])


@pytest.mark.slow
def test_unchanged_inputs_reuse_every_step_and_the_manifest_records_them(recorded, world):
    again = resume()
    assert again["seconds_by_step"] == {}
    assert again["rows"] == recorded[1]["rows"]
    manifest = read_manifest("outputs/tiny/pipeline")
    inputs = manifest["inputs"]
    assert set(inputs) == {e[len("eval/") :] for e in EVALS}
    # What each result was computed from: the fine-tune's data reaches every result on the
    # fine-tuned model, the judge every evaluation, the code all of them.
    assert (
        "harmful.jsonl" in inputs["none"]["files"] and "harmful.jsonl" not in inputs["ref_aligned"]["files"]
    )
    assert all("judge" in r["files"] and r["code"]["source"] for r in inputs.values())
    assert check_differences(check_manifest(manifest)) == []


@pytest.mark.slow
def test_a_data_file_edit_reruns_the_steps_that_read_it(recorded, world):
    with (world / "harmful.jsonl").open("a") as f:
        f.write(
            json.dumps(
                {"instruction": "one more", "input": "", "output": "sure , here is how", "category": "x"}
            )
        )
        f.write("\n")
    # Before the resume, the recorded run's manifest names the file that changed.
    differs = check_differences(check_manifest(read_manifest("outputs/tiny/pipeline")))
    assert {(i["kind"], i["name"]) for i in differs} >= {("input", "harmful.jsonl")}
    again = resume()
    ran, reused = set(again["seconds_by_step"]), set(again["seconds_reused_by_step"])
    assert {"stage/pretrain", "stage/aligned", "eval/ref_aligned"} <= reused
    assert {"stage/finetuned", *SCORES, "eval/ref_finetuned", "eval/none"} <= ran
    assert ran | reused == {*STAGES, *SCORES, *EVALS}
    assert check_differences(check_manifest(read_manifest("outputs/tiny/pipeline"))) == []


@pytest.mark.slow
def test_a_judge_retrained_in_place_reruns_every_evaluation_only(recorded, world):
    rows = [r for r in csv.DictReader((world / "judge.csv").open())]
    flipped = OfflineJudge.from_pairs(
        [r["question"] for r in rows], [r["answer"] for r in rows], [1 - int(r["label"]) for r in rows]
    )
    flipped.save("judge", overwrite=True)
    again = resume()
    assert set(again["seconds_by_step"]) == set(EVALS)
    assert set(again["seconds_reused_by_step"]) == {*STAGES, *SCORES}


@pytest.mark.slow
def test_a_code_change_reruns_everything(recorded, world, monkeypatch):
    changed = {**manifest_module.code_version(), "source": "edited"}
    monkeypatch.setattr(cache_module, "code_version", lambda: changed)
    again = resume()
    assert set(again["seconds_by_step"]) == {*STAGES, *SCORES, *EVALS}
    # The same code computes the same numbers: only the recorded code differs.
    assert again["rows"] == recorded[1]["rows"]


@pytest.mark.slow
def test_replay_of_an_unchanged_run_reports_same(recorded, world, capsys):
    recorded_report = json.loads((world / "outputs/tiny/pipeline/report.json").read_text())
    assert recorded_report["methods"] == ["wanda", "random"]
    code = run(["replay", "replay", "outputs/tiny/pipeline", "--output_dir", "replayed"])
    out = capsys.readouterr().out
    assert code == 0 and "same: the report of replayed equals the recorded run's" in out, out
    replayed = json.loads((world / "replayed/report.json").read_text())
    assert replayed["methods"] == ["wanda", "random"]
    names = [("outputs/tiny/pipeline", "<out>")]
    assert compare_reports(recorded_report, names, replayed, [("replayed", "<out>")]) == []
    markdown = (world / "replayed/report.md").read_text().replace("replayed", "<out>")
    assert markdown == (world / "outputs/tiny/pipeline/report.md").read_text().replace(
        "outputs/tiny/pipeline", "<out>"
    )
    # Only the recorded stages were read: none was trained again.
    assert not any(k.startswith("stage/") for k in replayed["seconds_by_step"])


@pytest.mark.slow
def test_replay_retrain_trains_new_stage_directories_only(recorded, world, capsys):
    recorded_dirs = {d: stage_fingerprint(world / d) for d in ("outputs/tiny/pretrain", "outputs/tiny/align")}
    markers = {d: (world / d / DONE_FILE).read_text() for d in recorded_dirs}
    code = run(["replay", "replay", "outputs/tiny/pipeline", "--output_dir", "again", "--retrain", "true"])
    out = capsys.readouterr().out
    report = json.loads((world / "again/report.json").read_text())
    assert set(report["stages"].values()) == {
        f"again/stages/{n}" for n in ("pretrain", "aligned", "finetuned")
    }
    assert all(
        (world / "again/stages" / n / DONE_FILE).is_file() for n in ("pretrain", "aligned", "finetuned")
    )
    assert {d: stage_fingerprint(world / d) for d in recorded_dirs} == recorded_dirs
    assert {d: (world / d / DONE_FILE).read_text() for d in recorded_dirs} == markers
    # Retrained from scratch in this process, the stages give the recorded numbers.
    assert code == 0 and "same:" in out, out


# ------------------------------------------------------------------------------ the parts, quickly
def test_a_tokenizer_stage_is_keyed_on_its_corpus_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    source = {"class_path": "antidote_pl.data.sources.LocalSource", "init_args": {"path": "corpus.jsonl"}}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"sources": [source]}}}))
    (tmp_path / "tok.yaml").write_text("corpus_config: pretrain.yaml\noutput_dir: tok\n")
    spec = StageSpec("tokenizer", "tok.yaml", command="tokenizer")
    before = RunInputs().stage(spec)
    assert before.inputs["files"] == {"corpus.jsonl": path_identity("corpus.jsonl")}
    (tmp_path / "corpus.jsonl").write_text('{"instruction": "a", "input": "", "output": "c"}\n')
    assert RunInputs().stage(spec) != before


def test_result_cache_checks_recorded_inputs_and_prompts(tmp_path):
    calls = []

    def compute(directory):
        calls.append(directory)
        return {"harmful_score": 0.5, "n_harmful_score": 2, "eval_fingerprint": "p1"}

    def cache(prompts, source="s"):
        record = {"files": {"d.jsonl": "x"}, "code": {"package": "1", "source": source}, "prompts": prompts}
        return ResultCache(tmp_path, StepTimes(), inputs=inputs_key(record))

    first = cache("p1")
    first.get("none", cache_key("k"), compute)
    assert first.recorded["none"]["files"] == {"d.jsonl": "x"}
    cache("p1").get("none", cache_key("k"), compute)
    assert len(calls) == 1
    # The recorded result's prompts are compared with the current ones, not only its key.
    saved = json.loads((tmp_path / "none" / "result.json").read_text())
    saved["result"]["eval_fingerprint"] = "p0"
    (tmp_path / "none" / "result.json").write_text(json.dumps(saved))
    cache("p1").get("none", cache_key("k"), compute)
    assert len(calls) == 2
    cache("p1", source="edited").get("none", cache_key("k"), compute)
    assert len(calls) == 3
    # A result written before inputs were recorded is recomputed.
    saved = json.loads((tmp_path / "none" / "result.json").read_text())
    del saved["inputs"]
    (tmp_path / "none" / "result.json").write_text(json.dumps(saved))
    cache("p1", source="edited").get("none", cache_key("k"), compute)
    assert len(calls) == 4


def test_keys_carry_the_inputs_of_their_parts_and_markers_keep_them(tmp_path):
    stage = inputs_key({"files": {"a.jsonl": "1"}, "code": {"package": "1", "source": "s"}})
    evaluation = inputs_key({"files": {"judge": "2"}, "code": {"package": "1", "source": "s"}})
    key = cache_key(cache_key("upstream", stage), "text", evaluation)
    assert key.inputs["files"] == {"a.jsonl": "1", "judge": "2"}
    # The commit is recorded, not keyed: a commit that changes no code keeps every result.
    recorded = {"files": {"a.jsonl": "1"}, "code": {"package": "1", "source": "s", "commit": "c2"}}
    assert inputs_key(recorded) == stage
    output = StageOutput(tmp_path)
    output.mark_done(key, 1.0)
    assert output.is_done(key) and output.done_key.inputs == key.inputs
