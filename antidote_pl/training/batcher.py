"""What every training DataModule shares: tokenizer, template and loader settings, and seeded draws.

:class:`SFTBatcher` turns records into tokenised datasets and DataLoaders with one tokenizer,
template and ``max_length``; DataModules use it by composition. :func:`seeded_rng` gives every
seeded draw its own RNG, so that resizing one draw leaves the others unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from antidote_pl.data.records import Record
from antidote_pl.data.templates import get_template
from antidote_pl.data.tokenize import SFTCollator, TokenizedDataset, check_tokenization, tokenize_records
from antidote_pl.errors import bad_value, check_int
from antidote_pl.models import loading


def seeded_rng(seed: int, purpose: str) -> random.Random:
    """A private RNG per purpose: changing one draw's size leaves the other draws unchanged.

    String seeds are hashed with SHA-512 by :mod:`random`, so this is stable across processes
    (unlike ``hash()``, which depends on ``PYTHONHASHSEED``).
    """
    return random.Random(f"{seed}:{purpose}")


class SFTBatcher:
    """Tokenizer, template and loader settings shared by every DataModule (used by composition).

    The DataModules forward their settings here (``**settings``), so each setting, its default and
    its description are written once, in this signature; LightningCLI lists them as the DataModule's
    own arguments (``data.init_args.batch_size``).

    Args:
        tokenizer: Spec for :func:`antidote_pl.models.loading.load_tokenizer` (``"tiny-world"``, a hub
            name or a local directory). An already loaded tokenizer object is accepted too.
        template: A key of :data:`antidote_pl.data.templates.TEMPLATES`.
        max_length: Maximum tokens per sample; longer samples are truncated and counted.
        batch_size: Per-device batch size.
        num_workers: DataLoader workers.
        seed: Seed of the module's draws (benign, harmful, task, realignment), of the validation split
            and of the training shuffle.
        val_size: Number of records held out for validation (0: no validation set); drawn from the
            module's whole training set (for harmful fine-tuning, the mixed set).
        tokenization: ``separate`` (prompt and response tokenised apart, exact boundary) or ``joint``
            (the official code's joint string, for parity); see :mod:`antidote_pl.data.tokenize`.

    Raises:
        ConfigError: on a bad value, before anything is loaded.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str = "alpaca",
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
        val_size: int = 0,
        tokenization: str = "separate",
    ):
        if tokenizer is None or (isinstance(tokenizer, str) and not tokenizer):
            raise bad_value("tokenizer", tokenizer, "'tiny-world', a hub name or a local directory")
        get_template(template)
        check_int("max_length", max_length, 1)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        check_int("val_size", val_size, 0)
        self.tokenization = check_tokenization(tokenization)
        self.tokenizer_spec = tokenizer
        self.template = template
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_size = val_size
        self._tokenizer = None if isinstance(tokenizer, str) else tokenizer

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, loaded on first use (the import stays out of module import time)."""
        if self._tokenizer is None:
            self._tokenizer = loading.load_tokenizer(self.tokenizer_spec, field="data.tokenizer")
        return self._tokenizer

    def split(self, records: Sequence[Record]) -> tuple[list[Record], list[Record]]:
        """Holds out ``val_size`` records, drawn with the seed; the rest keep their order.

        Raises:
            ConfigError: if ``val_size`` leaves no training record.
        """
        if self.val_size == 0:
            return list(records), []
        if self.val_size >= len(records):
            raise bad_value("val_size", self.val_size, f"less than the {len(records)} records available")
        held = set(seeded_rng(self.seed, "val").sample(range(len(records)), self.val_size))
        train = [r for i, r in enumerate(records) if i not in held]
        val = [r for i, r in enumerate(records) if i in held]
        return train, val

    def tokenize(self, records: Sequence[Record], name: str) -> TokenizedDataset:
        """Tokenises records with this batcher's tokenizer, template and ``max_length``."""
        return tokenize_records(
            self.tokenizer, records, self.template, self.max_length, name=name, tokenization=self.tokenization
        )

    def loader(self, dataset: TokenizedDataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        """Builds a DataLoader with :class:`SFTCollator`; shuffling uses a seeded generator."""
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=SFTCollator(self.tokenizer.pad_token_id),
        )
