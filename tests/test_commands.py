"""The front door: every command behind ``python -m antidote_pl``, listed, with one flag style."""

from __future__ import annotations

import argparse
import re

import pytest
from conftest import REPO

from antidote_pl.commands import check, compare, pipeline, posthoc, replay, report, rescore, train_judge
from antidote_pl.commands.dispatch import COMMANDS, Command, main, run

EXPECTED = {
    "fit",
    "validate",
    "test",
    "predict",
    "pipeline",
    "tokenizer",
    "train-judge",
    "rescore",
    "replay",
    "report",
    "check",
    "posthoc",
    "compare",
}
#: Commands whose parser is the project's own (the LightningCLI ones and the tokenizer stage's
#: parser are checked by their own tests).
PARSERS = {
    "pipeline": pipeline.build_parser,
    "train-judge": train_judge.build_parser,
    "rescore": rescore.build_parser,
    "replay": replay.build_parser,
    "report": report.build_parser,
    "check": check.build_parser,
    "posthoc": posthoc.build_parser,
    "compare": compare.build_parser,
}
SNAKE_FLAG = re.compile(r"--[a-z][a-z0-9_.]*\+?")


def test_help_lists_every_command_with_a_description(capsys):
    assert set(COMMANDS) == EXPECTED
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert re.search(rf"^\s+{re.escape(name)}\b", out, re.MULTILINE), name
        assert command.help.split()[0] in out


@pytest.mark.parametrize(
    "argv",
    [[name, "--help"] for name in sorted(EXPECTED)]
    + [["train-judge", kind, "--help"] for kind in ("lm", "ngram")]
    + [["replay", sub, "--help"] for sub in ("check", "replay")],
    ids=" ".join,
)
def test_every_command_answers_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 0
    assert "usage: antidote_pl" in capsys.readouterr().out


def test_unknown_or_missing_command_is_one_line_and_exit_2(capsys):
    for argv in (["no-such-command"], []):
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "command=" in err and "pipeline" in err and len(err.strip().splitlines()) == 1


def test_exit_code_is_an_int_result_else_0(monkeypatch):
    monkeypatch.setitem(COMMANDS, "check", Command(lambda argv: {"rows": argv}, "a result"))
    assert main(["check", "x"]) == 0
    monkeypatch.setitem(COMMANDS, "check", Command(lambda argv: 1, "something differs"))
    assert main(["check"]) == 1


def test_a_bad_value_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["train-judge", "lm", "--output_dir", "x", "--head", "bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "head" in err and "tuned" in err and "usage:" not in err


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices[sub], argparse.ArgumentParser):
                yield from _actions(action.choices[sub])


def flag_style_problems(parser: argparse.ArgumentParser) -> list[str]:
    """Long flags that are not snake_case and flags that take no value (other than --help)."""
    problems = []
    for action in _actions(parser):
        flags = [f for f in action.option_strings if f.startswith("--")]
        problems += [f"{f}: not snake_case" for f in flags if not SNAKE_FLAG.fullmatch(f)]
        # --help, and jsonargparse's --<key>.help of a class-typed option, print and exit.
        if flags and action.nargs == 0 and not flags[0].endswith("help"):
            problems.append(f"{flags[0]}: takes no value (booleans take one: --flag true)")
    return problems


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_one_flag_style(name):
    assert flag_style_problems(PARSERS[name]()) == []


def test_flag_style_check_can_fail():
    bad = argparse.ArgumentParser()
    bad.add_argument("--check-only", action="store_true")
    assert flag_style_problems(bad) == [
        "--check-only: not snake_case",
        "--check-only: takes no value (booleans take one: --flag true)",
    ]


def test_no_submodule_entry_point_is_documented_or_left():
    """Every command is ``python -m antidote_pl <command>``; no ``python -m antidote_pl.<module>``."""
    texts = [REPO / "README.md", REPO / "BENCHMARKS.md"]
    for folder, pattern in (
        ("docs", "*.md"),
        ("scripts", "*.sh"),
        ("configs", "*.yaml"),
        ("benchmarks", "*.py"),
    ):
        texts += sorted((REPO / folder).rglob(pattern))
    texts += sorted((REPO / "antidote_pl").rglob("*.py"))
    found = [
        str(p.relative_to(REPO)) for p in texts if "python -m antidote_pl." in p.read_text(encoding="utf-8")
    ]
    assert found == []
    mains = [
        str(p.relative_to(REPO))
        for p in (REPO / "antidote_pl").rglob("*.py")
        if '__name__ == "__main__"' in p.read_text(encoding="utf-8")
    ]
    assert mains == ["antidote_pl/__main__.py"]


def test_check_prints_one_row_per_stage(monkeypatch, capsys):
    rates = {"harmful": 12.5, "refused": 80.0, "benign_refused": 2.0, "sentiment_accuracy": 95.25}
    monkeypatch.setattr(check, "check_stage", lambda stage, seed: {"stage": stage, "seed": seed, **rates})
    rows = run(["check", "out/a", "out/b", "--seed", "3"])
    assert [(r["stage"], r["seed"]) for r in rows] == [("out/a", 3), ("out/b", 3)]
    assert capsys.readouterr().out.splitlines() == [
        "| stage | harmful % | refused % | benign refused % | sentiment acc % |",
        "|---|---|---|---|---|",
        "| out/a | 12.5 | 80.0 | 2.0 | 95.2 |",
        "| out/b | 12.5 | 80.0 | 2.0 | 95.2 |",
    ]
    run(["check", "out/a", "--json", "true"])
    assert '"sentiment_accuracy": 95.25' in capsys.readouterr().out
