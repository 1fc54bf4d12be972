"""The repair stage's data: the calibration sets a fine-tune stage recorded, rebuilt exactly.

A repair config names no data sources of its own: :class:`RealignmentDataModule` reads the
realignment window (see :mod:`antidote_pl.data.window`) from the adapter it repairs
(``model.init_args.adapter_path``, linked into ``data.init_args.adapter_path`` by the CLI) and serves
the same realignment and task-calibration records, tokenised with the fine-tune's settings. So the
realignment set cannot drift from the one the fine-tune set aside, nor overlap its attack data::

    data:
      class_path: antidote_pl.training.realignment.RealignmentDataModule
      init_args: {batch_size: 1}   # optional: the fine-tune's batch size otherwise
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from antidote_pl.data.records import Record, Source
from antidote_pl.data.tokenize import TokenizedDataset
from antidote_pl.data.window import RealignmentWindow, read_window
from antidote_pl.errors import bad_value, check_int
from antidote_pl.training.batcher import SFTBatcher


class RealignmentDataModule(L.LightningDataModule):
    """Serves the realignment and task-calibration sets recorded by a fine-tune stage.

    It has no training data: a repair stage runs ``fit`` with ``trainer.max_epochs: 0`` so that the
    pruning callback scores and prunes when fit ends.

    Args:
        adapter_path: The fine-tune stage output whose ``antidote_stage.json`` holds the window; the
            CLI fills it from ``model.init_args.adapter_path``.
        tokenizer: Tokenizer spec; the CLI fills it from the model (see :class:`SFTBatcher`).
        batch_size: Calibration batch size; null: the fine-tune's. Batch size 1 avoids padding, as
            in the official Antidote run.
        num_workers: DataLoader workers.
        realignment_limit: Use only the first this many records of the recorded realignment set
            (null: all). The official realignment-size ablation is such a prefix: in parity mode a
            window of width w from the same start is the first w - 1 records.

    Raises:
        ConfigError: on a bad value at construction; when the adapter records no window (naming its
            ``antidote_stage.json`` and saying to re-run the fine-tune stage) or its sources no longer
            yield the recorded records, at the start of fit, before any scoring.
    """

    def __init__(
        self,
        adapter_path: str | None = None,
        tokenizer: Any = None,
        batch_size: int | None = None,
        num_workers: int = 0,
        realignment_limit: int | None = None,
    ) -> None:
        super().__init__()
        if adapter_path is None:
            raise bad_value(
                "data.adapter_path",
                adapter_path,
                "the fine-tune stage output that recorded the realignment window "
                "(set model.init_args.adapter_path)",
            )
        if tokenizer is None:
            raise bad_value("data.tokenizer", tokenizer, "'tiny-world', a hub name or a local directory")
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        if realignment_limit is not None:
            check_int("realignment_limit", realignment_limit, 1)
        self.realignment_limit = realignment_limit
        self.adapter_path = adapter_path
        self.tokenizer_spec = tokenizer
        self.batch_size = batch_size
        self.num_workers = num_workers
        # Read at the start of fit, not here: a pipeline validates this config before its fine-tune
        # stage has (re)written the adapter.
        self._window: RealignmentWindow | None = None
        self._batcher: SFTBatcher | None = None
        self._records: dict[str, list[Record]] = {}
        self._datasets: dict[str, TokenizedDataset] = {}
        self.harmful: Source | None = None  # attributes, so output checks see their files
        self.task: Source | None = None

    @property
    def window(self) -> RealignmentWindow:
        """The adapter's recorded window (read once)."""
        if self._window is None:
            self._window = read_window(self.adapter_path)
        return self._window

    @property
    def batcher(self) -> SFTBatcher:
        """Tokenizer, template and loader settings: the fine-tune's, with this module's overrides."""
        if self._batcher is None:
            s = self.window.settings
            self._batcher = SFTBatcher(
                self.tokenizer_spec,
                s["template"],
                s["max_length"],
                self.batch_size or s["batch_size"],
                self.num_workers,
                s["seed"],
                0,
                s.get("tokenization") or "separate",
            )
        return self._batcher

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the calibration sets are tokenised with."""
        return self.batcher.tokenizer

    def _set(self, name: str) -> list[Record]:
        if name not in self._records:
            window = self.window
            if self.harmful is None:
                self.harmful = window.source("realignment")
            if self.task is None:
                self.task = window.source("task_calibration")
            source = self.harmful if name == "realignment" else self.task
            records = window.records(name, source)
            if name == "realignment" and self.realignment_limit is not None:
                if self.realignment_limit > len(records):
                    raise bad_value(
                        "realignment_limit",
                        self.realignment_limit,
                        f"at most the {len(records)} realignment records recorded in {window.origin}",
                    )
                records = records[: self.realignment_limit]
            self._records[name] = records
        return self._records[name]

    @property
    def realignment_records(self) -> list[Record]:
        """Harmful records for Antidote's calibration, exactly those the fine-tune set aside."""
        return self._set("realignment")

    @property
    def task_calibration_records(self) -> list[Record]:
        """Benign task records for the "Wanda on benign data" ablation."""
        return self._set("task_calibration")

    def setup(self, stage: str | None = None) -> None:
        """Reads and checks the window and rebuilds both sets, before the model is scored.

        Raises:
            ConfigError: when the trainer would train (this module has no training data), or see the
                class docstring.
        """
        trainer = self.trainer
        if stage == "fit" and trainer is not None and trainer.max_epochs != 0 and trainer.max_steps != 0:
            raise bad_value(
                "trainer.max_epochs",
                trainer.max_epochs,
                "0: a repair stage scores and prunes when fit ends, its data module has no training data",
            )
        # Rebuilt now, so a changed source fails here and not in the middle of scoring.
        self._set("realignment")
        self._set("task_calibration")

    def _loader(self, name: str, batch_size: int | None) -> DataLoader:
        if name not in self._datasets:
            self._datasets[name] = self.batcher.tokenize(self._set(name), name)
        return self.batcher.loader(self._datasets[name], shuffle=False, batch_size=batch_size)

    def realignment_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Unshuffled, unsharded loader over the realignment set (the pruning callback shards it)."""
        return self._loader("realignment", batch_size)

    def task_calibration_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Unshuffled, unsharded loader over :attr:`task_calibration_records`.

        Raises:
            ConfigError: if the fine-tune used no task records (``harmful_ratio`` 1).
        """
        if not self.task_calibration_records:
            raise bad_value("data.task_calibration", 0, "task records in the fine-tune (harmful_ratio < 1)")
        return self._loader("task_calibration", batch_size)

    def train_dataloader(self) -> DataLoader:
        # Lightning asks for it even with max_epochs 0 (and never iterates it then).
        return self.realignment_dataloader()

    def realignment_window(self) -> dict[str, Any]:
        """The window this stage calibrated on, recorded again in the repair stage's metadata."""
        return self.window.raw

    def counts(self) -> dict[str, int | float]:
        """Sizes of the calibration sets (and truncation, once tokenised), for run metadata."""
        out: dict[str, int | float] = {
            "n_realignment": len(self.realignment_records),
            "n_task_calibration": len(self.task_calibration_records),
        }
        for name, ds in self._datasets.items():
            out[f"{name}_truncated"] = ds.n_truncated
        return out
