"""Reproducibility manifest: round trip, exact window indices, git state, tamper check."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO, TINY_LLAMA, tiny_finetune_data

from antidote_pl.errors import ConfigError
from antidote_pl.eval.evaluator import EvalDataModule
from antidote_pl.manifest import (
    MANIFEST_FILE,
    build_manifest,
    datamodule_from_config,
    git_state,
    read_manifest,
    window_indices,
    write_manifest,
)
from antidote_pl.tinyworld.world import TinyWorldSource


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
    from antidote_pl.models.sft import CausalLMSFTModule

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
