"""Entry point: ``python -m antidote_pl <command>`` (``python -m antidote_pl --help`` lists them)."""

from antidote_pl.commands.dispatch import main

if __name__ == "__main__":
    raise SystemExit(main())
