"""Command-line front door: every ``python -m antidote_pl <command>``."""
