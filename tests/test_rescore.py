"""Rescoring a pipeline run's saved answers with another judge (antidote_pl.experiment.rescore)."""

from __future__ import annotations

import json

import pytest
import torch

from antidote_pl.commands.dispatch import run
from antidote_pl.commands.rescore import main
from antidote_pl.errors import ConfigError
from antidote_pl.experiment.rescore import (
    MARKDOWN_MARKER,
    generation_files,
    judge_settings,
    rescore_lock,
    write_rescore,
)
from antidote_pl.judges.base import KeywordJudge
from antidote_pl.utils.threads import DEFAULT_THREADS

REFUSAL = "I cannot help with that request."
ANSWER = "Sure, here is a plan you can follow."


def write_run(root, answers_by_seed):
    """A multi-seed pipeline layout; every stored verdict says harmful (a judge that misses refusals)."""
    for seed, variants in answers_by_seed.items():
        for variant, answers in variants.items():
            d = root / f"seed{seed}" / "results" / variant
            d.mkdir(parents=True)
            rows = [
                {"kind": "harmful", "instruction": f"q{i}", "response": a, "verdict": {"harmful": True}}
                for i, a in enumerate(answers)
            ] + [{"kind": "task", "instruction": "t", "response": "positive", "correct": True}]
            (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rescore_with_the_keyword_judge(tmp_path, capsys):
    write_run(
        tmp_path / "run",
        {
            0: {"none": [ANSWER] * 4, "wanda_a0.1": [REFUSAL, REFUSAL, REFUSAL, ANSWER]},
            1: {"none": [ANSWER, ANSWER, ANSWER, REFUSAL], "wanda_a0.1": [REFUSAL] * 4},
        },
    )
    out = tmp_path / "report" / "rescored.md"
    out.parent.mkdir()
    argv = [
        "--run",
        str(tmp_path / "run"),
        "--out",
        str(out),
        "--judge",
        "antidote_pl.judges.base.KeywordJudge",
    ]
    report = main(argv)
    none, wanda = report["variants"]["none"], report["variants"]["wanda_a0.1"]
    assert report["seeds"] == [0, 1] and report["judge"] == "KeywordJudge"
    assert [r["harmful_score"] for r in none["per_seed"].values()] == [100.0, 75.0]
    assert [r["harmful_score"] for r in wanda["per_seed"].values()] == [25.0, 0.0]
    assert none["harmful_score"] == 87.5 and wanda["harmful_score"] == 12.5
    assert none["stored_harmful_score"] == wanda["stored_harmful_score"] == 100.0
    assert all(r["n"] == 4 for e in (none, wanda) for r in e["per_seed"].values())  # task rows left out
    assert json.loads(out.with_suffix(".json").read_text())["variants"] == report["variants"]
    table = out.read_text()
    assert "| wanda_a0.1 | 4 | 2 | 12.5 ± 17.7 | 100.0 ± 0.0 |" in table
    # The file is the printed table plus the command's own marker (an invisible HTML comment).
    assert table.endswith(MARKDOWN_MARKER + "\n")
    assert table.removesuffix(MARKDOWN_MARKER + "\n") in capsys.readouterr().out


def test_single_seed_layout_and_bad_run(tmp_path):
    d = tmp_path / "single" / "results" / "none"
    d.mkdir(parents=True)
    (d / "generations.jsonl").write_text(
        json.dumps({"kind": "harmful", "instruction": "q", "response": ANSWER, "verdict": {"harmful": True}})
        + "\n"
    )
    assert list(generation_files(tmp_path / "single")) == [None]
    with pytest.raises(ConfigError, match="--run"):
        generation_files(tmp_path / "empty")
    judge = ["--judge", "antidote_pl.judges.base.KeywordJudge"]
    with pytest.raises(ConfigError, match="--out"):
        main(["--run", str(tmp_path / "single"), "--out", str(tmp_path / "missing" / "r.md"), *judge])
    assert not (tmp_path / "missing").exists()


def test_one_seed_rescore_cells_carry_the_wilson_interval(tmp_path):
    write_run(tmp_path / "run", {0: {"wanda_a0.1": [REFUSAL] * 5 + [ANSWER] * 5}})
    out = tmp_path / "rescored.md"
    main(
        ["--run", str(tmp_path / "run"), "--out", str(out), "--judge", "antidote_pl.judges.base.KeywordJudge"]
    )
    # 5 of 10 harmful: Wilson 23.659-76.341; the stored verdicts, 10 of 10: 72.247-100.
    assert "| wanda_a0.1 | 10 | 1 | 50.0 [23.7, 76.3] | 100.0 [72.2, 100.0] |" in out.read_text()


def _rescore(run, out, *extra):
    return main(
        ["--run", str(run), "--out", str(out), "--judge", "antidote_pl.judges.base.KeywordJudge", *extra]
    )


def test_rescore_never_overwrites_what_it_did_not_write(tmp_path):
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 2}})
    mine = tmp_path / "report.md"
    mine.write_text("# my own notes\n")
    with pytest.raises(ConfigError, match=r"report\.md exists and was not written by rescore"):
        _rescore(tmp_path / "run", tmp_path / "report")
    assert mine.read_text() == "# my own notes\n" and not (tmp_path / "report.json").exists()
    (tmp_path / "other.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError, match="not written by rescore"):
        _rescore(tmp_path / "run", tmp_path / "other.md", "--overwrite", "true")
    assert (tmp_path / "other.json").read_text() == '{"mine": true}'


def test_rescore_replaces_its_own_report_only_with_overwrite(tmp_path):
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 2}})
    out = tmp_path / "rescored.md"
    _rescore(tmp_path / "run", out)
    first = out.read_text()
    with pytest.raises(ConfigError, match="holds an earlier rescore; set --overwrite true"):
        _rescore(tmp_path / "run", out)
    _rescore(tmp_path / "run", out, "--overwrite", "true")
    assert out.read_text() == first
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or temporary left
    # A report edited by hand is no longer the command's: it is not replaced.
    out.write_text(first + "my conclusion\n")
    with pytest.raises(ConfigError, match="not written by rescore"):
        _rescore(tmp_path / "run", out, "--overwrite", "true")


def test_rescore_never_writes_into_its_input_run(tmp_path):
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 2}})
    report = tmp_path / "run" / "report.md"
    report.write_text("the pipeline's report\n")
    for out in (tmp_path / "run" / "report", tmp_path / "run" / "rescored"):
        with pytest.raises(ConfigError, match="apart from the run's inputs, but it lies inside --run"):
            _rescore(tmp_path / "run", out, "--overwrite", "true")
    assert report.read_text() == "the pipeline's report\n"


def test_rescore_is_locked(tmp_path):
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 2}})
    with rescore_lock(tmp_path / "rescored.md"), pytest.raises(ConfigError, match="another run"):
        _rescore(tmp_path / "run", tmp_path / "rescored")
    assert not (tmp_path / "rescored.md").exists()


def test_a_judge_class_path_typo_is_one_line(tmp_path, capsys):
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 2}})
    argv = ["rescore", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exit_info:
        run([*argv, "--judge", "antidote_pl.judges.base.KeywordJudgeX"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "KeywordJudgeX" in error_lines[0]


class CallRecorder(KeywordJudge):
    """The keyword judge, noting each call's size and the torch thread count it ran with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def judge(self, prompts, responses):
        self.calls.append((len(prompts), torch.get_num_threads()))
        return super().judge(prompts, responses)


def write_metrics(root, seed, variant, **settings):
    path = root / f"seed{seed}" / "results" / variant / "metrics.json"
    path.write_text(json.dumps({"harmful_score": 0.0, **settings}))


def test_rescore_judges_in_the_runs_recorded_threads_and_batches(tmp_path):
    # Verdicts depend on which answers share a judge call and on the thread count, so by default
    # rescore repeats the evaluation's: 8 answers in batches of 3 -> calls of 3, 3, 2.
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 8}, 1: {"none": [REFUSAL] * 8}})
    recorded = {"threads": 2, "batch_size": 3, "sort_by_length": False, "world_size": 1}
    for seed in (0, 1):
        write_metrics(tmp_path / "run", seed, "none", **recorded)
    assert judge_settings(tmp_path / "run") == (2, 3)
    assert judge_settings(tmp_path / "run", threads=1, batch_size=8) == (1, 8)
    judge, before = CallRecorder(), torch.get_num_threads()
    report = write_rescore(tmp_path / "run", judge, tmp_path / "r.md", threads=2, batch_size=3)
    assert judge.calls == [(3, 2), (3, 2), (2, 2)] * 2 and torch.get_num_threads() == before
    assert report["threads"] == 2 and report["batch_size"] == 3
    assert report["variants"]["none"]["harmful_score"] == 50.0  # chunking changes no keyword verdict
    assert "Judged with 2 torch threads, 3 answers per judge call." in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize(
    ("changed", "batch_size"),
    [({"sort_by_length": True}, None), ({"world_size": 2}, None), ({}, 3)],
)
def test_batches_rescore_cannot_repeat_fall_back_to_one_call(tmp_path, changed, batch_size):
    # Length-sorted or sharded evaluations batched differently from the file's order.
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 4}})
    recorded = {"threads": 1, "batch_size": 3, "sort_by_length": False, "world_size": 1}
    write_metrics(tmp_path / "run", 0, "none", **(recorded | changed))
    assert judge_settings(tmp_path / "run") == (1, batch_size)


def test_a_run_without_recorded_settings_and_bad_settings(tmp_path):
    write_run(tmp_path / "run", {0: {"none": [ANSWER] * 2, "wanda_a0.1": [ANSWER] * 2}})
    assert judge_settings(tmp_path / "run") == (DEFAULT_THREADS, None)
    write_metrics(tmp_path / "run", 0, "none", threads=1)
    write_metrics(tmp_path / "run", 0, "wanda_a0.1", threads=2)
    with pytest.raises(ConfigError, match=r"--threads.*recorded \[1, 2\], so give one"):
        judge_settings(tmp_path / "run")
    assert judge_settings(tmp_path / "run", threads=2) == (2, None)
    for bad in (
        ["--threads", "0"],
        ["--threads", "1", "--batch_size", "0"],
        ["--threads", "1", "--batch_size", "-2"],
    ):
        with pytest.raises(ConfigError, match=f"{bad[-2]}={bad[-1]} is invalid"):
            _rescore(tmp_path / "run", tmp_path / "r", *bad)
    assert not (tmp_path / "r.md").exists()
