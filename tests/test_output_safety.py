"""No command loses a user's data: output markers, overwrite, inputs vs outputs, locks, parents,
leftovers and permissions, for every writer (stages, callbacks, tokenizer, judge, evaluation,
pipeline). Each refused case leaves the disk exactly as it was."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TINY_LLAMA, quiet_trainer_kwargs, tiny_finetune_data

from antidote_pl.errors import ConfigError, run_entry_point
from antidote_pl.pruning.apply import save_tensors
from antidote_pl.training.sft import CausalLMSFTModule
from antidote_pl.utils.files import STAGE_FILE
from antidote_pl.utils.io import (
    OUTPUT_MARKER,
    STAGE_MARKER,
    OutputLock,
    atomic_dir,
    atomic_write_text,
    check_output_dir,
    claim_output_dir,
    launch_rank_is_zero,
    overlap,
    writable_dir,
)

FILES_KEY = "output_files"  # the marker key listing what a write wrote (utils.ownership)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (hidden ones included) with its kind, size and mtime."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return found


def stage(**kw) -> CausalLMSFTModule:
    args = {"model_config": TINY_LLAMA, "tokenizer": "tiny-world", "lora_r": 4, "lora_alpha": 8}
    return CausalLMSFTModule(**{**args, **kw})


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """A tiny full-model stage and a LoRA adapter on it, saved once for the whole module."""
    root = tmp_path_factory.mktemp("stages")
    stage(finetuning="full").save_stage(str(root / "base"))
    on_base = {"model_name_or_path": str(root / "base"), "model_config": None, "tokenizer": None}
    stage(**on_base).save_stage(str(root / "adapter"))
    return {"root": root, "base": root / "base", "adapter": root / "adapter", "on_base": on_base}


@pytest.fixture
def no_load(monkeypatch):
    """Any tokenizer or model load fails: proves the output checks come first."""

    def loaded(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the output was checked")

    monkeypatch.setattr("antidote_pl.training.sft.load_tokenizer", loaded)
    monkeypatch.setattr("antidote_pl.training.sft.load_causal_lm", loaded)
    monkeypatch.setattr("antidote_pl.models.loading.load_stage", loaded)


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A directory of a user's own files (and a sub-directory), with no project marker."""
    d = tmp_path / "mine"
    (d / "notes").mkdir(parents=True)
    (d / "results.csv").write_text("a,b\n1,2\n")
    (d / "notes" / "todo.txt").write_text("keep me\n")
    return d


def refused(match: str, root: Path, make, *args, **kwargs) -> ConfigError:
    """``make(*args, **kwargs)`` raises a ConfigError matching ``match`` and changes nothing."""
    before = snapshot(root)
    with pytest.raises(ConfigError, match=match) as info:
        make(*args, **kwargs)
    assert snapshot(root) == before
    return info.value


# --------------------------------------------------------------------------- stages
@pytest.mark.parametrize("overwrite", [False, True])
def test_unmarked_directory_is_never_replaced(user_dir, tmp_path, no_load, overwrite):
    msg = refused(
        rf"model.output_dir='{user_dir}'.*no {STAGE_FILE}",
        tmp_path,
        stage,
        output_dir=str(user_dir),
        overwrite=overwrite,
    )
    assert "is never written into" in str(msg)


def test_parent_of_stages_is_never_replaced(stages, tmp_path, no_load):
    # The case: output_dir naming the parent of pretrain/align/finetune.
    refused("holds files but no", stages["root"], stage, output_dir=str(stages["root"]), overwrite=True)


def test_save_stage_refuses_an_unmarked_directory(user_dir, tmp_path):
    m = stage()
    refused("no antidote_stage.json", tmp_path, m.save_stage, str(user_dir))


def test_earlier_stage_needs_overwrite_then_is_replaced(stages, tmp_path, no_load):
    out = tmp_path / "stage"
    out.mkdir()
    (out / STAGE_FILE).write_text("{}")
    (out / "old_weights.bin").write_text("x")
    refused(r"set model.init_args.overwrite true", tmp_path, stage, output_dir=str(out))


def test_overwrite_replaces_an_earlier_stage_and_cleans_leftovers(tmp_path):
    out = tmp_path / "stage"
    # A file the earlier run wrote (listed in its marker), which the new output does not have.
    stage().save_stage(str(out), extra_files=lambda d: (d / "stale.txt").write_text("from the earlier run"))
    # Leftovers of an interrupted save, and another output's temporary directory.
    for leftover in (".stage.tmp-abc123", ".stage.old-99", ".other.tmp-1"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "weights").write_text("partial")
    m = stage(output_dir=str(out), overwrite=True)
    m.save_stage(str(out))
    m.release_output()
    assert (out / STAGE_FILE).is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", "stage"]


def test_empty_existing_directory_is_written(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    m = stage(output_dir=str(out))
    m.save_stage(str(out))
    m.release_output()
    assert (out / STAGE_FILE).is_file() and (out / "adapter_model.safetensors").is_file()


def test_nested_output_blocks_overwrite(tmp_path, no_load):
    out = tmp_path / "stage"
    (out / "inner").mkdir(parents=True)
    (out / STAGE_FILE).write_text("{}")
    (out / "inner" / STAGE_FILE).write_text("{}")
    refused(r"but .*inner is one", tmp_path, stage, output_dir=str(out), overwrite=True)


@pytest.mark.parametrize(
    ("output", "field", "relation"),
    [
        ("base", "model.model_name_or_path", "is"),
        ("base/sub", "model.model_name_or_path", "lies inside"),
        (".", "model.model_name_or_path", "contains"),
        ("adapter", "model.adapter_path", "is"),
        ("adapter", "model.merge_adapters[0]", "is"),
    ],
)
def test_output_overlapping_an_input_is_refused_before_loading(stages, no_load, output, field, relation):
    kwargs = dict(stages["on_base"])
    if field == "model.adapter_path":
        kwargs["adapter_path"] = str(stages["adapter"])
    if field == "model.merge_adapters[0]":
        kwargs["merge_adapters"] = [str(stages["adapter"])]
    out = stages["root"] / output
    refused(
        rf"model.output_dir=.* a path apart from the run's inputs, but it {relation} {re.escape(field)}=",
        stages["root"],
        stage,
        **kwargs,
        output_dir=str(out),
        overwrite=True,
    )


def test_output_equal_to_tokenizer_dir_is_refused(stages, tmp_path, no_load):
    refused(
        r"it is model.tokenizer=",
        stages["root"],
        stage,
        tokenizer=str(stages["base"]),
        output_dir=str(stages["base"]),
        overwrite=True,
    )


def test_output_under_a_file_is_refused_before_loading(tmp_path, no_load):
    (tmp_path / "file").write_text("x")
    refused(
        r"model.output_dir=.*expected a directory path, but .*file is a file",
        tmp_path,
        stage,
        output_dir=str(tmp_path / "file" / "out"),
    )
    refused(
        r"expected a directory, but it is an existing file",
        tmp_path,
        stage,
        output_dir=str(tmp_path / "file"),
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_parent_is_refused_before_loading(tmp_path, no_load):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    try:
        refused(r"is not writable", tmp_path, stage, output_dir=str(locked / "a" / "b"))
    finally:
        locked.chmod(0o755)


def test_unwritable_parent_message(tmp_path, no_load, monkeypatch):
    # Root passes os.access everywhere, so the check's refusal is also shown with access denied.
    monkeypatch.setattr("antidote_pl.utils.io.os.access", lambda *a: False)
    refused(
        rf"model.output_dir=.*a writable location, but {tmp_path} is not writable",
        tmp_path,
        stage,
        output_dir=str(tmp_path / "a" / "b"),
    )


def test_data_file_inside_the_output_is_refused_before_training(tmp_path):
    from antidote_pl.data.sources import LocalSource
    from antidote_pl.tinyworld.world import TinyWorldSource
    from antidote_pl.training.datamodules import SFTDataModule

    out = tmp_path / "stage"
    rows = "".join(json.dumps(r) + "\n" for r in TinyWorldSource("sentiment", limit=8).load())
    # A file of the earlier output itself (a user's file there is refused before anything loads).
    stage().save_stage(str(out), extra_files=lambda d: (d / "my_data.jsonl").write_text(rows))
    data_file = out / "my_data.jsonl"
    m = stage(output_dir=str(out), overwrite=True)
    data = SFTDataModule("tiny-world", [LocalSource(str(data_file))], template="tiny", batch_size=4)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path / "logs", max_steps=1))
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"contains data.sources\[0\].path="):
        trainer.fit(m, datamodule=data)
    m.release_output()
    assert snapshot(out) == before


def test_fit_writes_the_stage_and_releases_its_lock(tmp_path):
    out = tmp_path / "out"
    m = stage(output_dir=str(out))
    assert (tmp_path / ".out.lock").is_file()
    L.Trainer(**quiet_trainer_kwargs(tmp_path / "logs", max_steps=1)).fit(m, datamodule=tiny_finetune_data())
    assert (out / STAGE_FILE).is_file()
    assert not (tmp_path / ".out.lock").exists()


# --------------------------------------------------------------------------- locks
def test_second_writer_is_refused_until_the_first_releases(tmp_path):
    out = tmp_path / "out"
    first = stage(output_dir=str(out))
    msg = refused(r"being written by another run", tmp_path, stage, output_dir=str(out))
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(msg)
    first.release_output()
    second = stage(output_dir=str(out))
    second.release_output()
    assert list(tmp_path.iterdir()) == []


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)
    lock_file = tmp_path / ".out.lock"
    lock_file.write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "token": "x"}))
    lock = OutputLock(tmp_path / "out", "output_dir")
    lock.acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()


def test_lock_of_another_host_is_respected(tmp_path):
    lock_file = tmp_path / ".out.lock"
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x"}))
    refused(r"pid 1 on elsewhere", tmp_path, OutputLock(tmp_path / "out", "output_dir").acquire)


def test_only_the_launch_rank_zero_takes_output_locks(monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    for key in ("NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert launch_rank_is_zero()
    # Lightning's rank: a Trainer's global rank, or the launcher's at import (below).
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert not launch_rank_is_zero()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    monkeypatch.setenv("NODE_RANK", "1")  # local rank 0 of a second node
    assert not launch_rank_is_zero()
    code = "from antidote_pl.utils.io import launch_rank_is_zero; print(launch_rank_is_zero())"
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "GROUP_RANK", "RANK")}
    for local_rank, expected in (("0", "True"), ("1", "False")):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env={**env, "LOCAL_RANK": local_rank},
            capture_output=True,
            text=True,
        )
        assert proc.stdout.strip() == expected, proc.stderr[-2000:]


def test_lock_survives_pickling_for_spawned_ranks(tmp_path):
    import pickle

    lock = OutputLock(tmp_path / "out", "output_dir")
    lock.acquire()
    copy = pickle.loads(pickle.dumps(lock))
    assert copy.held  # a spawned rank-0 worker writes under its parent's lock
    with atomic_dir(tmp_path / "out", lock=copy, kind="test") as tmp:
        (tmp / "f").write_text("x")
    assert lock.held
    lock.release()
    assert not copy.held and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- io helpers
def test_overlap_relations(tmp_path):
    assert overlap(tmp_path / "a", tmp_path / "a/") == "is"
    assert overlap(tmp_path, tmp_path / "a" / "b") == "contains"
    assert overlap(tmp_path / "a" / "b", tmp_path / "a") == "lies inside"
    assert overlap(tmp_path / "a", tmp_path / "ab") is None


def test_created_files_and_directories_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out", kind="test") as tmp:
            (tmp / "data.txt").write_text("x")
        atomic_write_text(tmp_path / "note.txt", "x")
        save_tensors(tmp_path / "mask.safetensors", {"m": torch.zeros(2, dtype=torch.bool)})
        m = stage(output_dir=str(tmp_path / "stage"))
        m.save_stage(str(tmp_path / "stage"))
        m.release_output()
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / OUTPUT_MARKER).stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "note.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "mask.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "stage").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "stage" / STAGE_MARKER).stat().st_mode & 0o777 == 0o640


def test_failed_write_leaves_no_created_parents(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a" / "b" / "out", kind="test"):
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- tokenizer
def _records(path: Path) -> str:
    rows = [{"instruction": f"Say something about item {i}.", "output": "The cat sat."} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def never_trained(monkeypatch):
    def trained(*a, **k):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr("antidote_pl.data.bpe.train_bpe_tokenizer", trained)


def test_tokenizer_refuses_unmarked_and_input_dirs(user_dir, tmp_path, never_trained):
    from antidote_pl.commands.tokenizer import main

    data = _records(user_dir / "data.jsonl")
    sources = json.dumps(
        [{"class_path": "antidote_pl.data.sources.LocalSource", "init_args": {"path": data}}]
    )
    args = ["--sources", sources, "--vocab_size", "300"]
    refused("no antidote_output.json", tmp_path, main, [*args, "--output_dir", str(user_dir / "notes")])
    refused(
        r"output_dir=.*contains sources\[0\].path=",
        tmp_path,
        main,
        [*args, "--output_dir", str(user_dir), "--overwrite", "true"],
    )


def test_tokenizer_overwrite_needs_the_flag(tmp_path):
    from antidote_pl.commands.tokenizer import main

    data = _records(tmp_path / "data.jsonl")
    sources = json.dumps(
        [{"class_path": "antidote_pl.data.sources.LocalSource", "init_args": {"path": data}}]
    )
    args = ["--sources", sources, "--vocab_size", "300", "--output_dir", str(tmp_path / "tok")]
    main(args)
    assert json.loads((tmp_path / "tok" / OUTPUT_MARKER).read_text())["kind"] == "tokenizer"
    refused(r"output_dir=.*set --overwrite true", tmp_path, main, args)
    main([*args, "--overwrite", "true"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "tok"]


# --------------------------------------------------------------------------- judge
def _labelled_csv(path: Path) -> str:
    rows = ["question,answer,label"]
    rows += [f"q{i},{'sure here is how' if i % 2 else 'I cannot help'} {i},{i % 2}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_judge_refuses_before_training_and_needs_overwrite(user_dir, tmp_path, monkeypatch):
    from antidote_pl.commands import train_judge
    from antidote_pl.judges import offline as offline_judge

    train = _labelled_csv(tmp_path / "train.csv")
    with monkeypatch.context() as patched:
        patched.setattr(offline_judge.OfflineJudge, "fit", lambda *a, **k: pytest.fail("trained"))
        refused(
            r"--output_dir=.*no antidote_output.json",
            tmp_path,
            train_judge.main,
            ["ngram", "--train_csv", train, "--output_dir", str(user_dir), "--overwrite", "true"],
        )
        refused(
            r"--output_dir=.*contains train_csv=",
            tmp_path,
            train_judge.main,
            ["ngram", "--train_csv", train, "--output_dir", str(tmp_path)],
        )
        refused(
            r"path=.*no antidote_output.json",
            tmp_path,
            offline_judge.OfflineJudge,
            path=str(user_dir),
            train_csv=train,
        )
    out = tmp_path / "judge"
    train_judge.main(["ngram", "--train_csv", train, "--output_dir", str(out)])
    judge = offline_judge.OfflineJudge(path=str(out))
    refused(r"path=.*set overwrite true", tmp_path, judge.save, out)
    judge.save(out, overwrite=True)
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "judge"


# --------------------------------------------------------------------------- evaluation
def _eval_data():
    from antidote_pl.evaluation.evaluator import EvalDataModule
    from antidote_pl.tinyworld.world import TinyWorldSource

    return EvalDataModule(harmful=TinyWorldSource("harmful_answer", limit=2), template="tiny", batch_size=2)


def test_evaluation_output_rules(stages, user_dir, tmp_path):
    from antidote_pl.evaluation.evaluator import StageEvaluator

    base = str(stages["base"])
    refused(
        r"model.output_dir=.*no antidote_output.json",
        tmp_path,
        StageEvaluator,
        base,
        output_dir=str(user_dir),
        overwrite=True,
    )
    refused(r"model.output_dir=.*it is model.stage=", stages["root"], StageEvaluator, base, output_dir=base)
    out = tmp_path / "eval"

    def evaluate(**kw):
        ev = StageEvaluator(base, harmful_max_new_tokens=2, output_dir=str(out), **kw)
        L.Trainer(**quiet_trainer_kwargs(tmp_path / "logs")).test(ev, datamodule=_eval_data(), verbose=False)

    evaluate()
    assert {p.name for p in out.iterdir()} == {OUTPUT_MARKER, "generations.jsonl", "metrics.json"}
    refused(r"set model.init_args.overwrite true", tmp_path, evaluate)
    evaluate(overwrite=True)
    assert not list(tmp_path.glob(".*.lock"))


# --------------------------------------------------------------------------- pipeline
def _pipeline_args(out: str):
    from antidote_pl.experiment.specs import RepairSpec, StageSpec

    stage_spec = StageSpec("pretrain", str(REPO / "configs/tiny/pretrain.yaml"))
    repair = RepairSpec(
        str(REPO / "configs/tiny/repair.yaml"), [0.1], {"wanda": str(REPO / "callbacks/wanda.yaml")}
    )
    return [stage_spec], repair, str(REPO / "configs/tiny/eval.yaml"), out


@pytest.fixture
def no_stage_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "antidote_pl.experiment.pipeline._run_command", lambda spec: pytest.fail("a stage ran")
    )


def test_pipeline_refuses_unmarked_output_and_stage_dirs(user_dir, tmp_path, no_stage_runs):
    from antidote_pl.experiment.pipeline import run_pipeline

    refused(r"^output_dir=.*no antidote_output.json", tmp_path, run_pipeline, *_pipeline_args(str(user_dir)))
    inside = "outputs/tiny/pretrain/report"
    refused(r"outside stage pretrain's output", tmp_path, run_pipeline, *_pipeline_args(inside))
    with OutputLock(tmp_path / "pipe", "output_dir"):
        refused(r"being written by another run", tmp_path, run_pipeline, *_pipeline_args("pipe"))


def test_pipeline_passes_overwrite_to_its_own_stages(monkeypatch):
    from antidote_pl.experiment import pipeline
    from antidote_pl.experiment.specs import StageSpec

    calls = []
    monkeypatch.setattr(pipeline, "run_fit", lambda configs, values, args: calls.append((values, args)))
    monkeypatch.setattr(pipeline, "run_tokenizer", lambda *a: calls.append(a))
    pipeline._run_command(StageSpec("a", "a.yaml", ["--trainer.max_steps=1"]))
    pipeline._run_command(StageSpec("t", "t.yaml", command="tokenizer"))
    assert calls == [
        ({"model.init_args.overwrite": True}, ["--trainer.max_steps=1"]),
        (["t.yaml"], [], {"overwrite": True}),
    ]


# --------------------------------------------------------------------------- files of the user (issue #25)
def test_stage_marker_lists_the_files_written(tmp_path):
    out = tmp_path / "stage"
    stage().save_stage(str(out))
    listed = json.loads((out / STAGE_FILE).read_text())[FILES_KEY]
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert listed == on_disk and STAGE_FILE in listed and "adapter_model.safetensors" in listed


def test_overwrite_refuses_an_output_holding_files_of_the_user(tmp_path):
    out = tmp_path / "repair"
    stage().save_stage(str(out))
    (out / "NOTES.txt").write_text("why alpha 0.1 looked odd\n")
    (out / "my_plots").mkdir()
    (out / "my_plots" / "hs.png").write_bytes(b"png")
    err = refused(
        r"model.output_dir=.*repair'.*also holds NOTES.txt, my_plots/, which replacing it would delete",
        tmp_path,
        stage,
        output_dir=str(out),
        overwrite=True,
    )
    assert "\n" not in str(err)
    # The write itself checks again (e.g. a callback saving into the directory).
    refused("also holds NOTES.txt", tmp_path, stage(overwrite=True).save_stage, str(out))


def test_overwrite_refuses_an_output_written_before_files_were_listed(tmp_path, no_load):
    out = tmp_path / "stage"
    out.mkdir()
    (out / STAGE_FILE).write_text(json.dumps({"kind": "adapter"}))
    (out / "adapter_model.safetensors").write_bytes(b"x")
    refused(r"written before outputs recorded them", tmp_path, stage, output_dir=str(out), overwrite=True)


def test_files_the_pipeline_adds_are_listed_and_replaced(tmp_path):
    from antidote_pl.experiment.cache import DONE_FILE, StageOutput

    out = tmp_path / "stage"
    stage().save_stage(str(out))
    StageOutput(out).mark_done("key", 1.0)
    assert DONE_FILE in json.loads((out / STAGE_FILE).read_text())[FILES_KEY]
    m = stage(output_dir=str(out), overwrite=True)  # the pipeline re-running its own stage
    m.save_stage(str(out))
    m.release_output()
    assert not (out / DONE_FILE).exists()


def test_an_output_of_another_kind_is_named_as_such(tmp_path):
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / OUTPUT_MARKER).write_text(json.dumps({"kind": "evaluation"}))
    (evaluation / "metrics.json").write_text("{}")
    err = refused(
        r"an earlier stage output: it is an antidote_pl evaluation output \(antidote_output.json\)",
        tmp_path,
        stage,
        output_dir=str(evaluation),
        overwrite=True,
    )
    assert "not an output of antidote_pl" not in str(err)
    tokenizer = atomic_dir(evaluation, overwrite=True, kind="tokenizer")
    refused(r"an earlier tokenizer output: it is an antidote_pl evaluation", tmp_path, tokenizer.__enter__)
    stage().save_stage(str(tmp_path / "stage"))
    judge = atomic_dir(tmp_path / "stage", overwrite=True, kind="judge")
    refused(r"earlier judge output: it is an antidote_pl stage output", tmp_path, judge.__enter__)


def test_every_writer_takes_the_same_output_rules_and_refuses_unknown_ones(tmp_path):
    """The writers share one set of keyword rules (OutputRules); a misspelt rule, or one a writer
    fixes itself, is a TypeError that touches nothing."""
    out = tmp_path / "out"
    with pytest.raises(TypeError, match="overwite"):
        check_output_dir(out, "f", overwite=True)
    with pytest.raises(TypeError, match="overwite"):
        claim_output_dir(out, "f", overwite=True, take_lock=True)
    with pytest.raises(TypeError, match="replace"), atomic_dir(out, replace=False):
        pass
    with pytest.raises(TypeError, match="marker"), writable_dir(out, kind="test", marker=STAGE_MARKER):
        pass
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out, kind="test") as tmp:
        (tmp / "f").write_text("x")
    rules = {"overwrite": True, "flag": "--again", "inputs": {"data": str(tmp_path / "data")}}
    assert check_output_dir(out, "f", kind="test", **rules) == out.resolve()
    refused(r"set --again true", tmp_path, check_output_dir, out, "f", kind="test", flag="--again")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_a_stage_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    m = stage(output_dir=str(out))
    monkeypatch.setattr(CausalLMSFTModule, "_write_weights", _no_space)

    def save(args):
        try:
            m.save_stage(str(out))
        finally:
            m.release_output()

    with pytest.raises(SystemExit):
        run_entry_point(save, [])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{out}: could not be written (No space left on device)" in err
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_a_first_evaluation_write_leaves_no_bare_marker(stages, tmp_path, monkeypatch):
    from antidote_pl.evaluation.evaluator import StageEvaluator

    out = tmp_path / "eval"
    monkeypatch.setattr("antidote_pl.evaluation.evaluator.write_generations_jsonl", _no_space)
    ev = StageEvaluator(str(stages["base"]), harmful_max_new_tokens=2, output_dir=str(out))
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path / "logs"))
    with pytest.raises(ConfigError, match=rf"^{out}: could not be written \(No space left on device\)"):
        trainer.test(ev, datamodule=_eval_data(), verbose=False)
    assert not out.exists() and not list(tmp_path.glob(".*.lock"))
