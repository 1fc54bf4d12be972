"""The front door: ``python -m antidote_pl <command>`` (or ``antidote-pl <command>``) runs one command.

:data:`COMMANDS` names every command with its one-line description; ``python -m antidote_pl --help``
lists them and ``python -m antidote_pl <command> --help`` shows one command's options. Every command
runs through :func:`antidote_pl.errors.run_entry_point` (bad input: one line on stderr, exit code 2;
``--debug`` shows the traceback), and ``-v``/``--verbose`` anywhere keeps the libraries' own output.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from antidote_pl.commands import (
    check,
    compare,
    pipeline,
    posthoc,
    replay,
    report,
    rescore,
    stages,
    tokenizer,
    train_judge,
)
from antidote_pl.errors import DEBUG_ENV, DEBUG_FLAG, bad_value, run_entry_point
from antidote_pl.utils import console

PROG = "antidote_pl"
HELP_FLAGS = ("-h", "--help")


class Command(NamedTuple):
    """A command: what runs it (on the arguments after its name) and its one-line description."""

    run: Callable[[list[str]], Any]
    help: str


def _stage(name: str) -> Command:
    return Command(lambda argv: stages.main([name, *argv]), stages.SUBCOMMANDS[name])


#: Every command, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {
    **{name: _stage(name) for name in stages.SUBCOMMANDS},
    "pipeline": Command(pipeline.main, pipeline.HELP),
    "tokenizer": Command(tokenizer.main, tokenizer.HELP),
    "train-judge": Command(train_judge.main, train_judge.HELP),
    "rescore": Command(rescore.main, rescore.HELP),
    "replay": Command(replay.main, replay.HELP),
    "report": Command(report.main, report.HELP),
    "check": Command(check.main, check.HELP),
    "posthoc": Command(posthoc.main, posthoc.HELP),
    "compare": Command(compare.main, compare.HELP),
}


def help_text() -> str:
    """The front door's ``--help``: every command with its description, and the global flags."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=16, width=110),
        description="Antidote (arXiv 2408.09600): safety repair of LLMs after harmful fine-tuning.",
        epilog=(
            f"Run `{PROG} <command> --help` for a command's options. Anywhere on the line, -v/--verbose "
            f"keeps the libraries' own output and {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows tracebacks."
        ),
    )
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help)
    return parser.format_help()


def _dispatch(argv: list[str]) -> Any:
    if not argv:
        raise bad_value("command", None, f"one of {', '.join(COMMANDS)} (see {PROG} --help)")
    name, rest = argv[0], argv[1:]
    if name in HELP_FLAGS:
        console.print_result(help_text().rstrip("\n"))
        return 0
    if name in COMMANDS:
        return COMMANDS[name].run(rest)
    if name.startswith("-"):
        # LightningCLI's own top-level options (e.g. --print_config before a subcommand).
        return stages.main(argv)
    raise bad_value("command", name, f"one of {', '.join(COMMANDS)} (see {PROG} --help)")


def run(argv: Sequence[str] | None = None) -> Any:
    """Runs one command from command-line arguments and returns its result (e.g. a pipeline report).

    Args:
        argv: The arguments after the program name (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: with code 2 after a one-line message, for bad input (unless debugging).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, verbose = console.split_verbose(list(sys.argv[1:] if argv is None else argv))
    console.configure(verbose)
    return run_entry_point(_dispatch, args, prog=PROG)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script ``antidote-pl`` and ``python -m antidote_pl``: :func:`run`, as an exit code.

    A command that returns an int (``replay``: 1 when something differs) sets the exit code; any
    other result means success (0).
    """
    result = run(argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
