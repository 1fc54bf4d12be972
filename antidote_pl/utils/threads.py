"""The torch CPU thread count a stage runs with: one fixed number, not "all cores".

CPU kernels split their sums over threads, so a result is bit-reproducible for a given thread count
(on the same CPU type) but changes with it: a stage that used every core would give another result
on a machine with more or fewer cores. Every stage and evaluation therefore sets its own count (the
``threads`` key of a stage config, :data:`DEFAULT_THREADS` unless given) before any model work and
records it beside its result (``antidote_stage.json``, ``metrics.json``).

Only the intra-op pool is set. The inter-op pool runs TorchScript forks, which no model here uses,
and torch allows setting it only once per process, before any parallel work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from antidote_pl.errors import bad_value

#: The default: one thread, the setting the committed tiny-world results were measured with.
DEFAULT_THREADS = 1


def check_threads(value: object, field: str = "threads") -> int:
    """``value`` as a thread count (an int >= 1; a string of digits from a command line is accepted).

    Raises:
        ConfigError: naming ``field`` for anything else (0, -1, "x", 2.5, True).
    """
    allowed = "an int >= 1 (torch CPU threads of the stage)"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(field, value, allowed)
    return value


def set_threads(threads: int) -> int:
    """Sets torch's intra-op CPU thread count; returns the previous count (to restore it).

    Raises:
        ConfigError: for a bad ``threads`` (see :func:`check_threads`).
    """
    threads = check_threads(threads)
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    return previous


@contextlib.contextmanager
def pinned_threads(threads: int | None = None) -> Iterator[None]:
    """Runs a block with torch's thread count set to ``threads`` (``None``: left as the block sets
    it) and restores the caller's count after, also on error."""
    previous = torch.get_num_threads()
    if threads is not None:
        set_threads(threads)
    try:
        yield
    finally:
        set_threads(previous)
