"""Memory a finished pipeline step freed goes back to the operating system (issue #26)."""

from __future__ import annotations

import pytest
import torch

from antidote_pl.experiment import cache
from antidote_pl.utils import memory


def test_release_returns_freed_heap_pages():
    if memory._malloc_trim() is None or memory.resident_bytes() is None:
        pytest.skip("the C library has no malloc_trim (not glibc) or /proc is missing")
    blocks = [torch.ones(1000) for _ in range(50_000)]  # about 200 MB in small heap allocations
    # The last block stays in use at the heap's top, so free() alone cannot shrink the heap.
    del blocks[:-1]
    before = memory.resident_bytes()
    assert memory.release_freed_memory()
    assert memory.resident_bytes() < before - 100e6, (before, memory.resident_bytes())
    assert blocks[0].sum().item() == 1000.0  # what is still in use is untouched


def test_release_is_a_no_op_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release_freed_memory() is False


def test_every_timed_step_releases_after_it_finishes(monkeypatch):
    calls = []
    monkeypatch.setattr(cache, "release_freed_memory", lambda: calls.append("release"))
    times = cache.StepTimes()
    with times.timed("scores/wanda"):
        calls.append("step")
    assert calls == ["step", "release"] and "scores/wanda" in times.ran
    with pytest.raises(RuntimeError), times.timed("eval/none"):
        raise RuntimeError("a failed step")
    assert calls == ["step", "release"] and "eval/none" not in times.ran
