"""Every command in the README and the docs runs as written, and every link there resolves.

Commands are taken from the fenced ```bash blocks of README.md, BENCHMARKS.md and ``docs/**/*.md``
and from their inline ``python -m antidote_pl ...`` spans, and checked without running the work:

* A page's bash blocks run, in order, in one ``bash`` in which nothing can run: ``PATH`` points
  nowhere, every command is a recorder (functions and ``command_not_found_handle``) and a DEBUG trap
  skips commands named by a path. So variables, loops, quotes and line continuations expand as in
  a reader's shell, and the recorded argument lists are what would run.
* ``python -m antidote_pl <command> ...``: the command is in the dispatcher and its arguments parse:
  the command's own parser (``parse_args``), or for LightningCLI's subcommands ``--print_config``
  (which parses every ``--config`` file and exits; slow test).
* ``python benchmarks/x.py ...``: the script answers ``--help`` and lists every flag used (slow test).
* ``bash x.sh``: the file exists and passes ``bash -n``.
* ``pip install ...``: exactly a line of ``.ci/run`` (``-q`` aside); ``python3 -m venv DIR`` and
  ``. DIR/bin/activate`` are the only other set-up commands.
* Every file of the repository a command names (``configs/``, ``callbacks/``, ``scripts/``,
  ``benchmarks/``, ``tests/``) exists. Paths under ``outputs/`` and ``../shared`` are made by earlier
  runs or the data set-up and are not checked.

Inline spans are command-line text: ``<...>`` stands for one value and ``[--flag value]`` for
optional flags (checked as given). A span that only names a command (``python -m antidote_pl
tokenizer``), a synopsis with ``...`` and ``python -m antidote_pl <command> ...`` are checked for the
command's name alone.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import REPO
from test_commands import PARSERS

from antidote_pl.commands import stages
from antidote_pl.commands.dispatch import COMMANDS
from antidote_pl.stages import tokenizer

PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]
REPO_PATH = re.compile(r"^(configs|callbacks|scripts|benchmarks|tests)/[^\s{}<>*$]+$")
GLOBAL_FLAGS = {"-v", "--verbose", "--debug"}
BY_PATH = "(by path)"  # the recorder's name for a command that the DEBUG trap skipped
BASH_SAID = "(bash)"  # the name of a message of bash's own
BASH = shutil.which("bash")
# A recorder per command: the caller's line and the arguments, NUL-separated, one record per \x1e.
PRELUDE = r"""exec 3>&1 1>/dev/null
_rec() { printf '%s\0' "${BASH_LINENO[1]}" "$@" >&3; printf '\036' >&3; }
for _c in python python3 pip bash cd source; do eval "$_c() { _rec $_c \"\$@\"; }"; done
.() { _rec . "$@"; }
command_not_found_handle() { _rec "$@"; }
_guard() {
  case $BASH_COMMAND in
    /*|./*|'~/'*) printf '%s\0' "${BASH_LINENO[0]}" "@BY_PATH@" "$BASH_COMMAND" >&3; printf '\036' >&3
                  return 1;;
  esac
}
shopt -s extdebug
trap _guard DEBUG
""".replace("@BY_PATH@", BY_PATH)


class Command(NamedTuple):
    """One command of a page: where it is and the argument list that would run."""

    where: str
    argv: list[str]


# --------------------------------------------------------------------------- extraction
def fenced_blocks(text: str) -> Iterator[tuple[str, int, str]]:
    """(language, line of the block's first content line, content) of every fenced block."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*```(\w*)", lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```")), len(lines))
        yield opening.group(1), i + 2, "\n".join(lines[i + 1 : end])
        i = end + 1


def without_code_blocks(text: str) -> str:
    """The text with every fenced block blanked (line numbers kept), for inline spans and links."""
    for _, first, body in fenced_blocks(text):
        lines = text.split("\n")
        count = body.count("\n") + 1 if body else 0
        lines[first - 1 : first - 1 + count] = [""] * count
        text = "\n".join(lines)
    return text


def bash_script(text: str) -> tuple[str, dict[int, int]]:
    """The recorder prelude and the page's bash blocks in order, and each script line's page line."""
    script, origin = PRELUDE.split("\n"), {}
    for lang, first, body in fenced_blocks(text):
        if lang == "bash":
            for k, line in enumerate(body.split("\n")):
                origin[len(script) + 1] = first + k
                script.append(line)
    return "\n".join(script), origin


def bash_commands(page: str, text: str) -> list[Command]:
    """The commands the page's bash blocks would run, expanded by bash with every command recorded;
    whatever bash itself says (a syntax error, a redirection from a file that is not there) too."""
    script, origin = bash_script(text)
    if not origin:
        return []
    syntax = subprocess.run([BASH, "-n"], input=script.encode(), capture_output=True)
    if syntax.returncode:
        return _bash_messages(page, syntax.stderr, origin)
    with tempfile.TemporaryDirectory() as cwd:
        env = {"PATH": "/nonexistent", "HOME": cwd, "LC_ALL": "C"}
        done = subprocess.run(
            [BASH], input=script.encode(), capture_output=True, cwd=cwd, env=env, timeout=60
        )
    commands = []
    for record in done.stdout.split(b"\x1e")[:-1]:
        line, *argv = record.decode().split("\0")[:-1]
        commands.append(Command(f"{page}:{origin.get(int(line), '?')}", argv))
    return commands + _bash_messages(page, done.stderr, origin)


def _bash_messages(page: str, stderr: bytes, origin: dict[int, int]) -> list[Command]:
    messages = []
    for said in stderr.decode().splitlines():
        line = re.match(r"^[^:]*: line (\d+): (.*)", said)
        where = origin.get(int(line.group(1)), "?") if line else "?"
        messages.append(Command(f"{page}:{where}", [BASH_SAID, line.group(2) if line else said]))
    return messages


def inline_commands(page: str, text: str) -> list[Command]:
    """The page's inline ``python -m antidote_pl ...`` spans, read as the module docstring says."""
    prose = without_code_blocks(text)
    commands = []
    for match in re.finditer(r"`(python -m antidote_pl\b[^`]*)`", prose):
        where = f"{page}:{prose.count(chr(10), 0, match.start()) + 1}"
        span = re.sub(r"\[(--[^\]]*)\]", r"\1", re.sub(r"<[^>]*>", "VALUE", " ".join(match.group(1).split())))
        argv = shlex.split(span)
        if argv[3:4] == ["VALUE"]:  # `python -m antidote_pl <command> ...`: about every command
            argv = argv[:3]
        elif "..." in argv or (len(argv) <= 5 and not any(a.startswith("-") for a in argv[4:])):
            argv = [*argv[:4], "..."]  # a synopsis, or the command named in prose: its name is checked
        commands.append(Command(where, argv))
    return commands


def page_commands(path: Path) -> list[Command]:
    """Every command of one page: its bash blocks' and its inline spans'."""
    page, text = str(path.relative_to(REPO)), path.read_text(encoding="utf-8")
    return bash_commands(page, text) + inline_commands(page, text)


# --------------------------------------------------------------------------- checks
def command_problems(command: Command, deep: bool = False) -> list[str]:
    """What is wrong with one command (empty: it runs as written). ``deep`` adds the slow checks."""
    name, args = (command.argv or ["(nothing)"])[0], command.argv[1:]
    problems = [f"{a}: no such file" for a in _repo_paths(args) if not (REPO / a.split("::")[0]).exists()]
    if name in ("python", "python3"):
        problems += _python_problems(args, deep)
    elif name == "pip":
        if _without_quiet(command.argv) not in ci_pip_lines():
            problems.append(f"not a pip line of .ci/run (those are {sorted(ci_pip_lines())})")
    elif name == "bash":
        problems += _bash_script_problems(args)
    elif name == BY_PATH:
        problems.append("runs a program by its path")
    elif name == BASH_SAID:
        problems.append("bash stops here")
    elif name in (".", "source"):
        if len(args) != 1 or not args[0].endswith("/bin/activate"):
            problems.append("only a virtual environment's bin/activate is sourced")
    else:
        problems.append(f"{name}: not a command the docs may use (python, pip, bash, a venv)")
    return [f"{command.where}: {' '.join(command.argv)}: {p}" for p in problems]


def _repo_paths(args: list[str]) -> list[str]:
    values = [a.split("=", 1)[1] if a.startswith("--") and "=" in a else a for a in args]
    return [v for v in values if REPO_PATH.match(v)]


def _without_quiet(argv: list[str]) -> tuple[str, ...]:
    return tuple(a for a in argv if a != "-q")


@functools.cache
def ci_pip_lines() -> frozenset[tuple[str, ...]]:
    """The ``pip install`` lines of ``.ci/run``, without ``-q``."""
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    argvs = [shlex.split(line) for line in lines if line.startswith("pip install")]
    return frozenset(_without_quiet(argv) for argv in argvs)


def _python_problems(args: list[str], deep: bool) -> list[str]:
    if args[:2] == ["-m", "antidote_pl"]:
        return antidote_problems(args[2:], deep)
    if args[:2] == ["-m", "pytest"]:
        return []
    if args[:2] == ["-m", "venv"] and len(args) == 3:
        return []
    if args and args[0].endswith(".py"):
        if not (REPO / args[0]).is_file():
            return []  # reported as a missing file
        return script_flag_problems(args[0], args[1:]) if deep else []
    return ["not python -m antidote_pl, -m pytest, -m venv or a script"]


def _bash_script_problems(args: list[str]) -> list[str]:
    if not args or not args[0].endswith(".sh"):
        return ["bash runs a script file here"]
    script = REPO / args[0]
    if not script.is_file():
        return []  # reported as a missing file
    syntax = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    return [f"bash -n: {syntax.stderr.strip()}"] if syntax.returncode else []


def antidote_problems(argv: list[str], deep: bool) -> list[str]:
    """``python -m antidote_pl`` with ``argv``: the command exists and its arguments parse."""
    argv = [a for a in argv if a not in GLOBAL_FLAGS]
    if not argv or argv[0] in ("-h", "--help"):
        return []
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return [f"{name}: not a command (python -m antidote_pl --help lists {', '.join(COMMANDS)})"]
    if "..." in rest or {"-h", "--help"} & set(rest):
        return []  # a synopsis, or help: the command's existence is what it says
    if name in stages.SUBCOMMANDS:
        return stage_parse_problems(name, rest) if deep else []
    parser = tokenizer.build_parser() if name == "tokenizer" else PARSERS[name]()
    return _parse_problems(lambda: parser.parse_args(rest))


def stage_parse_problems(name: str, rest: list[str]) -> list[str]:
    """A LightningCLI subcommand's arguments, parsed (every ``--config`` file read) by ``--print_config``."""
    return _parse_problems(lambda: stages.main([name, *rest, "--print_config"]), must_exit=True)


def _parse_problems(parse, must_exit: bool = False) -> list[str]:
    quiet = (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))
    with _in_repo(), quiet[0], quiet[1], warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parse()
        except SystemExit as exit_:
            return [] if exit_.code in (0, None) else [f"exits with {exit_.code}"]
        except Exception as err:  # a parse error of any kind is what this check reports
            return [f"does not parse: {type(err).__name__}: {str(err).strip().splitlines()[0]}"]
    return ["--print_config did not exit"] if must_exit else []


@contextlib.contextmanager
def _in_repo() -> Iterator[None]:
    """Commands are run from the repository root (their paths are relative to it)."""
    before = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(before)


@functools.cache
def _script_help(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, script, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    return done.stdout if done.returncode == 0 else ""


def script_flag_problems(script: str, args: list[str]) -> list[str]:
    """A script answers ``--help`` and lists every ``--flag`` of ``args``."""
    help_text = _script_help(script)
    if not help_text:
        return [f"python {script} --help fails"]
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    return [f"{f}: not in its --help" for f in flags if not re.search(rf"{re.escape(f)}\b", help_text)]


# --------------------------------------------------------------------------- links
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for line in without_code_blocks(path.read_text(encoding="utf-8")).split("\n"):
        heading = re.match(r"^#{1,6}\s+(.*)", line)
        if heading:
            base = slug(heading.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def link_problems(path: Path, root: Path = REPO) -> list[str]:
    """Relative links and images of a page that point at no file, or at no heading of it."""
    prose = re.sub(r"`[^`]*`", "", without_code_blocks(path.read_text(encoding="utf-8")))
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{path.relative_to(root)}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{path.relative_to(root)}: {target}: no such heading")
    return problems


# --------------------------------------------------------------------------- the docs
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_runs_as_written(page):
    commands = page_commands(page)
    assert [p for c in commands for p in command_problems(c)] == []


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_stage_and_script_command_parses(page):
    commands = page_commands(page)
    assert [p for c in commands for p in command_problems(c, deep=True)] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(page):
    assert link_problems(page) == []


def test_readme_is_a_short_front_page_linking_every_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    linked = {(REPO / t.split("#")[0]).resolve() for t in re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme)}
    pages = sorted((REPO / "docs").rglob("*.md"))
    notes = [p for p in pages if p.stem.endswith("_notes")]  # appended to their reports
    assert [str(p.relative_to(REPO)) for p in pages if p not in linked and p not in notes] == []
    assert (REPO / "BENCHMARKS.md").resolve() in linked
    # The test command is the one CI runs.
    command = ["python", "-m", "pytest", "-q", "-n", "2"]
    assert " ".join(command) in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in [c.argv for c in bash_commands("README.md", readme)]


def test_the_front_door_table_lists_every_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([\w-]+)` \|", readme, re.MULTILINE)
    assert listed == list(COMMANDS)


# --------------------------------------------------------------------------- the checks can fail
BROKEN = """
Run `python -m antidote_pl rescore --run outputs/x` and `python -m antidote_pl fit --config ...`,
see [the guide](no_such_page.md) and [here](#no-such-heading).

## A heading

```bash
F="--config configs/tiny/align.yaml"
python -m antidote_pl fitt $F
python -m antidote_pl pipeline --config configs/tiny/no_such.yaml
for s in 1 2; do python -m antidote_pl replay check m$s.json \\
    --bogus $s; done
pip install torch
bash scripts/no_such.sh
/usr/bin/touch SHOULD_NOT_EXIST
ls outputs
python -m antidote_pl fit --config configs/paper/<stage>.yaml
```
"""


def test_extraction_expands_as_bash_does():
    commands = page_commands_of(BROKEN)
    assert [c.argv for c in commands][:5] == [
        ["python", "-m", "antidote_pl", "fitt", "--config", "configs/tiny/align.yaml"],
        ["python", "-m", "antidote_pl", "pipeline", "--config", "configs/tiny/no_such.yaml"],
        ["python", "-m", "antidote_pl", "replay", "check", "m1.json", "--bogus", "1"],
        ["python", "-m", "antidote_pl", "replay", "check", "m2.json", "--bogus", "2"],
        ["pip", "install", "torch"],
    ]
    assert [c.where for c in commands][:3] == ["x.md:9", "x.md:10", "x.md:11"]
    assert commands[-2:] == [
        Command("x.md:2", ["python", "-m", "antidote_pl", "rescore", "--run", "outputs/x"]),
        Command("x.md:2", ["python", "-m", "antidote_pl", "fit", "..."]),
    ]


def test_the_checker_finds_every_break(tmp_path):
    problems = [p for c in page_commands_of(BROKEN) for p in command_problems(c)]
    expected = [
        "fitt: not a command",
        "configs/tiny/no_such.yaml: no such file",
        "no_such.yaml: does not parse",
        "m1.json --bogus 1: does not parse",
        "m2.json --bogus 2: does not parse",
        "pip install torch: not a pip line of .ci/run",
        "scripts/no_such.sh: no such file",
        "/usr/bin/touch SHOULD_NOT_EXIST: runs a program by its path",
        "ls outputs: ls: not a command the docs may use",
        "x.md:17: (bash) stage: No such file or directory: bash stops here",
        "--run outputs/x: does not parse",
    ]
    assert len(problems) == len(expected)
    for problem, part in zip(problems, expected):
        assert part in problem
    page = tmp_path / "x.md"
    page.write_text(BROKEN)
    assert link_problems(page, root=tmp_path) == [
        "x.md: no_such_page.md: no such file",
        "x.md: #no-such-heading: no such heading",
    ]


@pytest.mark.slow
def test_the_deep_checks_find_a_bad_key_and_flag():
    argv = ["fit", "--config", "configs/tiny/align.yaml", "--model.init_args.no_such_key", "1"]
    assert antidote_problems(argv, deep=True)[0].startswith("does not parse")
    assert antidote_problems(argv[:3], deep=True) == []
    assert script_flag_problems("benchmarks/bench_generation.py", ["--prompts", "4", "--no-such"]) == [
        "--no-such: not in its --help"
    ]


def page_commands_of(text: str) -> list[Command]:
    """:func:`page_commands` of a page's text (named ``x.md``)."""
    return bash_commands("x.md", text) + inline_commands("x.md", text)
