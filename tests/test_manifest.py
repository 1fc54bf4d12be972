"""Reproducibility manifest: round trip, exact window indices, git state, tamper check."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, TINY_LLAMA, tiny_finetune_data

from antidote_pl.commands.dispatch import run
from antidote_pl.commands.pipeline import build_parser
from antidote_pl.errors import ConfigError
from antidote_pl.evaluation.evaluator import EvalDataModule
from antidote_pl.experiment import run_record
from antidote_pl.experiment.cache import DONE_FILE, ResultCache, StepTimes
from antidote_pl.experiment.manifest import (
    MANIFEST_FILE,
    build_manifest,
    check_differences,
    check_manifest,
    check_table,
    code_version,
    datamodule_from_config,
    file_entries,
    git_state,
    read_manifest,
    window_indices,
    write_manifest,
)
from antidote_pl.experiment.pipeline import Pipeline
from antidote_pl.experiment.replay import compare_reports, relocated, replay
from antidote_pl.experiment.specs import BaselineSpec, RepairSpec, StageSpec, stage_output_dir
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.utils.hashing import path_identity


def _key(r):
    return (r["instruction"], r.get("input", ""), r.get("output", ""))


def test_window_indices_by_content_with_duplicates():
    pool = [{"instruction": s, "input": "", "output": "o"} for s in "abcab"]
    assert window_indices([pool[3], pool[1], pool[0], pool[4]], pool, "w") == [0, 1, 3, 4]
    with pytest.raises(ConfigError, match="not in its source"):
        window_indices([{"instruction": "z"}], pool, "w")
    with pytest.raises(ConfigError, match="not in its source"):
        window_indices([pool[0]] * 3, pool, "w")  # only two "a" records exist


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from antidote_pl.training.sft import CausalLMSFTModule

    root = tmp_path_factory.mktemp("manifest")
    stage = root / "stage"
    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(
        str(stage)
    )
    finetune = tiny_finetune_data(num_samples=40, realignment_size=6, val_size=4)
    evaluation = EvalDataModule(
        harmful=TinyWorldSource("harmful_answer", split="eval", limit=4),
        task=TinyWorldSource("sentiment", split="eval"),
        task_name="sst2",
        template="tiny",
        task_limit=5,
        fa_validation_size=3,
    )
    built = build_manifest(
        configs={
            "finetune": str(REPO / "configs/tiny/finetune.yaml"),
            "evaluation": (str(REPO / "configs/tiny/eval.yaml"), ["--data.init_args.task_limit=5"]),
        },
        datamodules={"finetune": finetune, "evaluation": evaluation},
        stages={"base": str(stage)},
        seeds={"seed_everything": 42, "data": 42},
        extra={"alphas": [0.1]},
    )
    return root, built, finetune


def test_round_trip(manifest):
    root, built, _ = manifest
    path = write_manifest(built, root)
    assert path == root / MANIFEST_FILE
    assert read_manifest(root) == json.loads(json.dumps(built))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # atomic: no temporary left
    cfg = built["configs"]["evaluation"]
    assert cfg["overrides"] == ["--data.init_args.task_limit=5"] and "StageEvaluator" in cfg["text"]
    assert built["libraries"]["torch"] and built["libraries"]["python"] and built["machine"]["cpu_count"]
    assert built["seeds"] == {"seed_everything": 42, "data": 42} and built["alphas"] == [0.1]
    stage = built["stages"]["base"]
    assert stage["kind"] == "full_model" and len(stage["fingerprint"]) == 16
    # How the stage was computed, from its antidote_stage.json (saved here without a Trainer).
    meta = json.loads((root / "stage" / "antidote_stage.json").read_text())
    assert (
        stage["threads"] == meta["threads"] >= 1 and stage["dtype"] == "fp32" and stage["precision"] is None
    )


def test_windows_name_the_exact_records(manifest):
    _, built, finetune = manifest
    data = built["data"]["finetune"]
    pool = TinyWorldSource("harmful_answer").load()
    tasks = TinyWorldSource("sentiment").load()
    w = data["windows"]
    assert [_key(pool[i]) for i in w["realignment"]] == [_key(r) for r in finetune.realignment_records]
    # Mixture order: training records, then the validation tail.
    mixed = finetune.train_records + finetune.val_records
    assert [_key(pool[i]) for i in w["harmful"]] == [_key(r) for r in mixed if r["harmful"]]
    assert [_key(tasks[i]) for i in w["task"]] == [_key(r) for r in mixed if not r["harmful"]]
    assert sum(data["validation_tail"].values()) == 4 and data["counts"]["n_val"] == 4
    assert len(w["harmful"]) + len(w["task"]) == 40
    ev = built["data"]["evaluation"]["windows"]
    assert ev == {"harmful": [0, 1, 2, 3], "task": [0, 1, 2, 3, 4], "task_val": [5, 6, 7]}


def test_tampered_or_foreign_manifest_is_refused(manifest, tmp_path):
    _, built, _ = manifest
    edited = json.loads(json.dumps(built))
    edited["configs"]["finetune"]["text"] += "# edited\n"
    write_manifest(edited, tmp_path / "m.json")
    with pytest.raises(ConfigError, match="sha256"):
        read_manifest(tmp_path / "m.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a run manifest"):
        read_manifest(tmp_path / "x.json")
    with pytest.raises(ConfigError, match="existing config"):
        build_manifest({"x": str(tmp_path / "missing.yaml")})


def test_git_state(tmp_path):
    assert git_state(tmp_path) == {
        "commit": None,
        "dirty": None,
        "note": "not a git repository (or no commit yet)",
    }

    def git(*args):
        subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("commit", "-q", "-m", "c")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "f").write_text("2")
    assert git_state(tmp_path) == {**clean, "dirty": True}


def test_datamodule_from_config_loads_no_model():
    # The config's stage, outputs/tiny/finetune, does not exist here: loading the model would fail.
    dm = datamodule_from_config(
        REPO / "configs/tiny/eval.yaml", ["--data.init_args.harmful_limit=2", "--data.init_args.task_limit=2"]
    )
    assert isinstance(dm, EvalDataModule) and dm.harmful_limit == 2


# ------------------------------------------------------------------------------ check and replay
def _git(repo, *args):
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


def _hand_made(tmp_path, repo_dir):
    """A config and a data file, and the manifest of a run that used them."""
    config, data = tmp_path / "run.yaml", tmp_path / "data.jsonl"
    config.write_text("trainer: {max_epochs: 1}\n")
    data.write_text('{"instruction": "a"}\n')
    built = build_manifest({"run": str(config)}, repo_dir=repo_dir)
    built["data"] = {"finetune": {"files": file_entries([data])}}
    return config, data, write_manifest(built, tmp_path / MANIFEST_FILE)


def _statuses(items):
    return {(i["kind"], i["name"]): i["status"] for i in items}


def test_check_matches_a_fresh_manifest_and_names_an_edited_config(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f").write_text("1")
    _git(repo, "add", "f")
    _git(repo, "commit", "-q", "-m", "c")
    config, data, path = _hand_made(tmp_path, repo)
    items = check_manifest(read_manifest(path), repo_dir=repo)
    assert check_differences(items) == []
    assert _statuses(items)[("config", "run")] == "match"
    assert _statuses(items)[("data", str(data))] == "match"
    assert _statuses(items)[("git", "commit")] == "match"
    assert "OK: everything" in check_table(items)
    config.write_text("trainer: {max_epochs: 2}\n")
    data.write_text('{"instruction": "b"}\n')
    (repo / "f").write_text("2")  # uncommitted code: the tree is dirty now
    items = check_manifest(read_manifest(path), repo_dir=repo)
    assert {(i["kind"], i["name"]) for i in check_differences(items)} == {
        ("config", "run"),
        ("data", str(data)),
        ("git", "commit"),
    }
    table = check_table(items)
    recorded = read_manifest(path)["configs"]["run"]["sha256"]
    assert f"config run: recorded {recorded}, current " in table and "DIFFERS: 3" in table


def test_check_command_exit_codes(tmp_path, capsys):
    config, _, path = _hand_made(tmp_path, tmp_path)  # not a git repository: the commit is unknown
    assert run(["replay", "check", str(path)]) == 0
    assert "OK: everything" in capsys.readouterr().out
    config.write_text("changed: true\n")
    assert run(["replay", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "differs  config   run" in out and "config run: recorded" in out
    edited = read_manifest(path)
    edited["libraries"]["torch"] = "0.0.1"
    write_manifest(edited, path)
    assert run(["replay", "check", str(path)]) == 1
    assert "library torch: recorded 0.0.1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run(["replay", "check", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
    assert "missing.json: missing" in capsys.readouterr().err


@pytest.fixture
def recorded_run(tmp_path, monkeypatch):
    """The manifest ``Pipeline.manifest()`` writes for the tiny pipeline (plus overrides and a
    baseline), with the data modules and stage outputs left out (they are not what is tested).

    The working directory is ``tmp_path``, with the repository's configs linked in, so that the
    stages' (relative) output directories are there; each holds a finished-step marker.
    """
    for name in ("configs", "callbacks"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    init = build_parser().parse_args(["--config", "configs/tiny/pipeline.yaml"])
    init = build_parser().instantiate_classes(init)
    init.repair.overrides = ["--trainer.max_epochs=0"]
    init.repair.method_overrides = {"random": ["--pruner.init_args.seed=3"]}
    own_dir = "--model.init_args.output_dir=outputs/tiny/finetune_vaccine"
    stage = StageSpec("vaccine_ft", "configs/tiny/finetune.yaml", ["--seed_everything=7", own_dir])
    baseline = BaselineSpec("vaccine", [stage], repair_fragment="callbacks/wanda.yaml", repair_alpha=0.05)
    run = dict(stages=init.stages, repair=init.repair, evaluation=init.evaluation, references=init.references)
    run.update(output_dir=str(tmp_path / "run"), baselines=[baseline], durability=init.durability)
    pipe = Pipeline(**run)
    pipe.alphas = list(init.repair.alphas)  # what validate() would set
    pipe.results = ResultCache(tmp_path / "results", StepTimes())  # what run() would set
    pipe.stage_dirs = {s.name: str(tmp_path / s.name) for s in [*pipe.stages, stage]}
    captured = {}

    def fake_build(configs, datamodules, stages, seeds, extra):
        captured.update(configs=configs, extra=extra)

    monkeypatch.setattr(run_record, "datamodule_from_config", lambda *a: None)
    monkeypatch.setattr(run_record, "build_manifest", fake_build)
    pipe.manifest()
    built = build_manifest(captured["configs"], extra=captured["extra"], repo_dir=tmp_path)
    path = write_manifest(built, (tmp_path / "run").mkdir() or tmp_path / "run")
    for spec in [*init.stages, stage]:
        (tmp_path / stage_output_dir(spec, spec.name)).mkdir(parents=True)
        (tmp_path / stage_output_dir(spec, spec.name) / DONE_FILE).write_text('{"key": "k"}')
    return run, path


def test_replay_runs_exactly_the_recorded_specs(recorded_run, tmp_path, capsys):
    run, path = recorded_run
    calls = []
    rows = [{"method": "wanda", "alpha": 0.1, "hs": 0.2, "seconds": 3.0}]

    def runner(**kwargs):
        calls.append(kwargs)
        return {"rows": [{"method": "wanda", "alpha": 0.1, "hs": 0.2, "seconds": 9.0}]}

    new = str(tmp_path / "replayed")
    assert replay(str(path), new, runner=runner) == 0
    assert calls == [{**run, "output_dir": new, "force": False}]
    # The methods run in the recorded order, not the order of the manifest's sorted JSON keys.
    assert list(calls[0]["repair"].methods) == list(run["repair"].methods) != sorted(run["repair"].methods)
    assert isinstance(calls[0]["baselines"][0].stages[0], StageSpec)
    # With the recorded report beside the manifest, the reports are compared (timings excepted).
    (path.parent / "report.json").write_text(json.dumps({"rows": rows}))
    assert replay(str(path), new, runner=runner) == 0
    assert "same: the report of" in capsys.readouterr().out
    rows[0]["hs"] = 0.5
    (path.parent / "report.json").write_text(json.dumps({"rows": rows}))
    assert replay(str(path), new, runner=runner) == 1
    assert "row (wanda, alpha 0.1): hs: recorded 0.5, now 0.2" in capsys.readouterr().out


def test_reports_are_compared_row_by_method_and_alpha():
    old = {
        "rows": [
            {"method": "none", "alpha": 0.0, "hs": 0.9},
            {"method": "wanda", "alpha": 0.1, "hs": 0.2, "stage": "out/a/x"},
            {"method": "random", "alpha": 0.1, "hs": 0.5},
        ],
        "analysis": {"masks": {"anchor": "wanda a0.1"}},
        "seconds_total": 3.0,
    }
    new = {
        "rows": [old["rows"][0], {**old["rows"][1], "stage": "new/b/x"}],
        "analysis": {"masks": {"anchor": "random a0.1"}},
        "seconds_total": 9.0,
    }
    diffs = compare_reports(old, [("out/a", "<out>")], new, [("new/b", "<out>")])
    # A missing row is named, not every later row shifted; every other entry is compared too.
    assert diffs == [
        "row (random, alpha 0.1): recorded, missing now",
        "analysis.masks.anchor: recorded 'wanda a0.1', now 'random a0.1'",
    ]
    same = {**old, "rows": list(reversed(old["rows"]))}
    assert compare_reports(old, [], same, []) == ["rows: the same rows in another order"]
    assert compare_reports(old, [], {**old, "seconds_total": 1.0}, []) == []


def test_replay_refuses_differences_and_its_own_directory(recorded_run, tmp_path, capsys):
    _, path = recorded_run
    calls = []
    edited = read_manifest(path)
    edited["libraries"]["torch"] = "0.0.1"
    write_manifest(edited, path)
    new = str(tmp_path / "replayed")
    assert replay(str(path), new, runner=lambda **kw: calls.append(kw)) == 1 and calls == []
    assert "refusing to replay" in capsys.readouterr().out
    assert replay(str(path), new, check_only=True, force=True, runner=lambda **kw: calls.append(kw)) == 0
    assert calls == []
    assert replay(str(path), new, force=True, runner=lambda **kw: calls.append(kw) or {}) == 0
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="apart from the recorded run"):
        replay(str(path), str(path.parent), runner=lambda **kw: calls.append(kw))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not ours")
    with pytest.raises(ConfigError):
        replay(str(path), str(tmp_path / "foreign"), runner=lambda **kw: calls.append(kw))
    del edited["pipeline"]
    write_manifest(edited, path)
    with pytest.raises(ConfigError, match="no 'pipeline' spec"):
        replay(str(path), new, runner=lambda **kw: calls.append(kw))
    assert len(calls) == 1


def test_a_hand_edited_manifest_is_refused(recorded_run, capsys):
    _, path = recorded_run
    assert run(["replay", "check", str(path)]) == 0
    edited = json.loads(path.read_text())
    edited["pipeline"]["repair"]["alphas"] = [0.5]  # what a replay would run: no longer the run's
    path.write_text(json.dumps(edited))
    with pytest.raises(SystemExit) as exit_info:
        run(["replay", "check", str(path)])
    assert exit_info.value.code == 2
    assert "does not match its manifest_sha256 (edited by hand?)" in capsys.readouterr().err


def test_check_compares_the_inputs_each_result_recorded(tmp_path):
    config, data, path = _hand_made(tmp_path, tmp_path)
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "judge.safetensors").write_bytes(b"weights")
    built = read_manifest(path)
    files = {str(data): path_identity(data), str(judge): path_identity(judge)}
    code = code_version()
    built["inputs"] = {
        "none": {"files": files, "code": code},
        # Computed by an earlier run, from an older version of the data file.
        "wanda_a0.1": {"files": {str(data): "0" * 64}, "code": {**code, "source": "older"}},
    }
    write_manifest(built, path)
    statuses = _statuses(check_manifest(read_manifest(path)))
    assert statuses[("input", f"{data} (1 results)")] == "differs"
    assert statuses[("input", str(judge))] == "match"
    assert statuses[("code", "source (1 results)")] == "differs"
    (judge / "judge.safetensors").write_bytes(b"retrained in place")
    items = check_manifest(read_manifest(path))
    assert ("input", str(judge)) in {(i["kind"], i["name"]) for i in check_differences(items)}


def test_retrain_points_every_stage_and_reference_at_new_directories(recorded_run, tmp_path, capsys):
    run_specs, path = recorded_run
    calls = []
    new = str(tmp_path / "replayed")
    assert replay(str(path), new, runner=lambda **kw: calls.append(kw) or {}, retrain=True) == 0
    assert "retraining every stage under" in capsys.readouterr().out
    got = calls[0]
    stages = [*got["stages"], *(s for b in got["baselines"] for s in b.stages)]
    dirs = {s.name: stage_output_dir(s, s.name) for s in stages}
    assert dirs == {s.name: f"{new}/stages/{s.name}" for s in stages}
    recorded_dirs = {stage_output_dir(s, s.name) for s in run_specs["stages"]}
    assert not recorded_dirs & set(dirs.values())
    # The next stage's base and the repaired adapter are the new stages, not the recorded ones.
    aligned = next(s for s in got["stages"] if s.name == "aligned")
    assert f"--model.init_args.model_name_or_path={new}/stages/pretrain" in aligned.overrides
    assert f"--model.init_args.adapter_path={new}/stages/finetuned" in got["repair"].overrides
    assert f"--model.init_args.model_name_or_path={new}/stages/aligned" in got["repair"].overrides
    assert got["repair"].overrides[-1] == "--trainer.max_epochs=0"  # the user's own, after
    # The baseline stage's own output override is repointed, not left beside a second one.
    vaccine = got["baselines"][0].stages[0]
    assert [a for a in vaccine.overrides if "output_dir" in a] == [
        f"--model.init_args.output_dir={new}/stages/vaccine_ft"
    ]


def test_relocation_refuses_a_stage_directory_it_cannot_reach(tmp_path):
    # Stage files as the parser reads them: the tiny pretraining config with its output moved, and
    # one that names stage a's directory inside a list (a base adapter to merge).
    base = str(REPO / "configs/tiny/pretrain.yaml")
    config = tmp_path / "stage.yaml"
    config.write_text(f"model: {{init_args: {{output_dir: {tmp_path / 'a'}}}}}\n")
    uses = tmp_path / "uses.yaml"
    listed = f"merge_adapters: [{tmp_path / 'a'}]"
    uses.write_text(f"model: {{init_args: {{output_dir: {tmp_path / 'b'}, {listed}}}}}\n")
    specs = {"stages": [StageSpec("a", [base, str(config)]), StageSpec("b", [base, str(uses)])]}
    specs |= {"baselines": [], "repair": RepairSpec(str(config), [0.1], {})}
    with pytest.raises(ConfigError, match="inside a list"):
        relocated(specs, str(tmp_path / "new"))
    specs["stages"] = [StageSpec("a", [base, str(config)]), StageSpec("again", [base, str(config)])]
    with pytest.raises(ConfigError, match="stages write distinct directories"):
        relocated(specs, str(tmp_path / "new"))
