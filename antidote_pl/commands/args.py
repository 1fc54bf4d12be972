"""The one parser style every command uses: jsonargparse, snake_case flags, values for booleans.

Like LightningCLI's own options: ``--output_dir DIR``, ``--force true``, lists as ``--layers
[12,15,18]`` (or ``--layers+ 12`` repeated), choices as ``Literal`` types so ``--help`` lists them.
Parse errors are raised, not printed with the usage text, so the entry point reports them in one
line with exit code 2 (:func:`antidote_pl.errors.run_entry_point`).
"""

from __future__ import annotations

from jsonargparse import ArgumentParser


def command_parser(command: str, description: str) -> ArgumentParser:
    """A command's parser, named ``antidote_pl <command>`` in its usage line."""
    # Descriptions come from docstrings: their reST literal markers are noise in a terminal.
    text = description.replace("``", "")
    return ArgumentParser(prog=f"antidote_pl {command}", description=text, exit_on_error=False)


def subcommand_parser(description: str) -> ArgumentParser:
    """A subcommand's parser (``replay check``, ``train-judge lm``), added to its command's parser."""
    return ArgumentParser(description=description.replace("``", ""), exit_on_error=False)
