"""Entry point: ``python -m antidote_pl <command>`` (``python -m antidote_pl --help`` lists them)."""

import os

# Fast tokenizers warn (and may deadlock) when forked by DataLoader workers after use.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from antidote_pl.commands.dispatch import main

if __name__ == "__main__":
    raise SystemExit(main())
