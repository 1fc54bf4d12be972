"""A Lightning callback that times every training step in CPU and wall seconds (shared by benchmarks)."""

from __future__ import annotations

import time

import lightning as L


class StepTimer(L.Callback):
    """Appends ``(cpu_seconds, wall_seconds)`` of each training batch to :attr:`times`.

    CPU time is reported beside wall time because the benchmarks often run on a shared machine,
    where wall time also counts waiting for the cores.
    """

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = (time.process_time(), time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append((time.process_time() - self._start[0], time.perf_counter() - self._start[1]))
