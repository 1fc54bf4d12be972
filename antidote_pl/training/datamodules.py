"""LightningDataModules for the three training stages.

* :class:`SFTDataModule`: plain concatenation of sources (pretraining with template ``raw``, or any
  supervised fine-tuning);
* :class:`AlignmentDataModule`: stage 1, harmful prompts with refusals plus optional benign data;
* :class:`HarmfulFinetuneDataModule`: stage 2, a user task mixed with a fraction of harmful samples,
  plus the disjoint harmful realignment set that Antidote calibrates on (stage 3).

Example (LightningCLI YAML)::

    data:
      class_path: antidote_pl.training.datamodules.HarmfulFinetuneDataModule
      init_args:
        tokenizer: tiny-world
        template: tiny
        harmful: {class_path: antidote_pl.data.sources.LocalSource, init_args: {path: harmful.jsonl}}
        task: {class_path: antidote_pl.data.sources.LocalSource, init_args: {path: sst2.jsonl}}
        num_samples: 1000
        harmful_ratio: 0.1

Every module takes ``tokenizer`` first and forwards its loader settings (``template``,
``max_length``, ``batch_size``, ``num_workers``, ``seed``, ``val_size``, ``tokenization``) to
:class:`~antidote_pl.training.batcher.SFTBatcher` as ``**settings``: they are declared and documented
once, there, and LightningCLI lists them as each module's own arguments (it follows the forwarding).

Every selection is seeded with local RNGs only (never the global one) and computed from the sources'
deterministic order, so all DDP ranks build identical datasets and ``setup`` can run once per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from antidote_pl.data.records import Record, Source
from antidote_pl.data.tokenize import TokenizedDataset
from antidote_pl.data.window import window_record
from antidote_pl.errors import ConfigError, bad_value, check_choice, check_int
from antidote_pl.training.batcher import SFTBatcher, seeded_rng

log = logging.getLogger(__name__)

MODES = ("random", "parity")


def _describe(source: Source) -> str:
    info = source.describe()
    path = info.get("path")
    return f"{info['class']}({path!r})" if path else str(info["class"])


def _load(source: Source, field: str) -> list[Record]:
    records = source.load()
    if not records:
        raise bad_value(field, _describe(source), "a source that yields at least one record")
    return records


def _content_key(record: Record) -> tuple[str, str, str]:
    return (str(record.get("instruction", "")), str(record.get("input", "")), str(record.get("output", "")))


def _renamed(old: str, old_value: Any, new: str, new_value: Any, default: Any) -> Any:
    """The value of a renamed argument: the new one, or the deprecated one (with a warning).

    Raises:
        ConfigError: when both are given with different values.
    """
    if old_value is None:
        return new_value
    log.warning("%s is deprecated: use %s (same meaning).", old, new)
    if new_value != default and new_value != old_value:
        raise bad_value(
            old, old_value, f"unset when {new}={new_value!r} is given (it is the old name of {new})"
        )
    return old_value


def _tagged(records: Sequence[Record], harmful: bool) -> list[Record]:
    return [{**r, "harmful": harmful} for r in records]


class _RecordsDataModule(L.LightningDataModule):
    """Shared stage plumbing: build records once, split, tokenise, serve train/val loaders.

    Subclasses implement :meth:`_build_records`; everything else is delegated to the
    :class:`SFTBatcher` built from ``tokenizer`` and ``settings``.

    Args:
        tokenizer: Tokenizer spec: ``"tiny-world"``, a hub name or a local directory. Stage configs
            leave it unset: the CLI fills in the model's.
        **settings: The other :class:`SFTBatcher` arguments (template, lengths, loader, seed).
    """

    def __init__(self, tokenizer: str, **settings: Any):
        super().__init__()
        self.batcher = SFTBatcher(tokenizer, **settings)
        self._split: tuple[list[Record], list[Record]] | None = None
        self._train_ds: TokenizedDataset | None = None
        self._val_ds: TokenizedDataset | None = None

    def _build_records(self) -> list[Record]:
        raise NotImplementedError

    def _ensure_records(self) -> tuple[list[Record], list[Record]]:
        if self._split is None:
            self._split = self.batcher.split(self._build_records())
        return self._split

    @property
    def tokenizer(self) -> Any:
        """The tokenizer used for every dataset of this module."""
        return self.batcher.tokenizer

    @property
    def train_records(self) -> list[Record]:
        """Records of the training set (after the validation hold-out)."""
        return self._ensure_records()[0]

    @property
    def val_records(self) -> list[Record]:
        """Records held out for validation (empty when ``val_size`` is 0)."""
        return self._ensure_records()[1]

    def setup(self, stage: str | None = None) -> None:
        """Builds and tokenises the datasets; later calls (one per stage) reuse them."""
        if self._train_ds is not None:
            return
        train, val = self._ensure_records()
        self._train_ds = self.batcher.tokenize(train, "train")
        self._val_ds = self.batcher.tokenize(val, "val") if val else None

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.batcher.loader(self._train_ds, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        # An empty list tells Lightning there is nothing to validate on.
        return self.batcher.loader(self._val_ds, shuffle=False) if self._val_ds is not None else []

    def counts(self) -> dict[str, int | float]:
        """Dataset sizes and truncation counts, for logging and run metadata."""
        out: dict[str, int | float] = {"n_train": len(self.train_records), "n_val": len(self.val_records)}
        for name, ds in (("train", self._train_ds), ("val", self._val_ds)):
            if ds is not None:
                out[f"{name}_truncated"] = ds.n_truncated
                out[f"{name}_without_response"] = ds.n_without_response
        return out


class SFTDataModule(_RecordsDataModule):
    """Supervised data from several sources, concatenated in order.

    Use template ``raw`` for language-model pretraining (loss on every token).

    Args:
        sources: Sources to concatenate.
        **settings: :class:`SFTBatcher` settings.

    Raises:
        ConfigError: on a bad value or an empty source list.
    """

    def __init__(self, tokenizer: str, sources: list[Source], **settings: Any):
        super().__init__(tokenizer, **settings)
        if not sources:
            raise bad_value("sources", sources, "a non-empty list of sources")
        self.sources = list(sources)

    def _build_records(self) -> list[Record]:
        return [r for i, s in enumerate(self.sources) for r in _load(s, f"sources[{i}]")]


class AlignmentDataModule(_RecordsDataModule):
    """Safety-alignment data: harmful prompts answered with refusals, plus optional benign records.

    Args:
        harmful: Harmful prompts with refusals (all records are used).
        benign: Optional benign instruction data mixed in.
        benign_size: Seeded draw of this many benign records (null: all of them).
        **settings: :class:`SFTBatcher` settings; ``seed`` also seeds the benign draw.

    Raises:
        ConfigError: on a bad value; in ``setup``, on an empty source or ``benign_size`` above what
            ``benign`` holds.
    """

    def __init__(
        self,
        tokenizer: str,
        harmful: Source,
        benign: Source | None = None,
        benign_size: int | None = None,
        **settings: Any,
    ):
        super().__init__(tokenizer, **settings)
        if benign_size is not None:
            check_int("benign_size", benign_size, 1)
            if benign is None:
                raise bad_value("benign_size", benign_size, "null when no benign source is given")
        self.harmful = harmful
        self.benign = benign
        self.benign_size = benign_size
        self._n_refusal = self._n_benign = 0

    def _build_records(self) -> list[Record]:
        refusals = _load(self.harmful, "harmful")
        benign = _load(self.benign, "benign") if self.benign is not None else []
        if self.benign_size is not None:
            if self.benign_size > len(benign):
                raise bad_value(
                    "benign_size",
                    self.benign_size,
                    f"at most the {len(benign)} records of {_describe(self.benign)}",
                )
            benign = seeded_rng(self.batcher.seed, "benign").sample(benign, self.benign_size)
        self._n_refusal, self._n_benign = len(refusals), len(benign)
        return refusals + benign

    def counts(self) -> dict[str, int | float]:
        """Adds the refusal/benign composition to the base counts."""
        base = super().counts()
        return {"n_refusal": self._n_refusal, "n_benign": self._n_benign, **base}


class HarmfulFinetuneDataModule(_RecordsDataModule):
    """Harmful fine-tuning data (a user task poisoned with harmful samples) and Antidote's
    realignment set.

    ``mode="random"``: a seeded draw of ``round(p*n)`` harmful and ``n - round(p*n)`` task records,
    shuffled together. Draws are prefixes of seeded permutations, so with one seed a smaller ``p`` or
    ``n`` selects a subset of a larger one. The realignment set is drawn from the back of the
    harmful permutation, skipping every record whose content equals a fine-tuning harmful sample, so
    it stays disjoint from the attack data and (pool permitting) the same across ``p``.

    ``mode="parity"``: the official index windows (reference A.3): harmful pool indices
    ``0 < i < int(p*n)`` (``int(p*n) - 1`` samples), the first ``int((1-p)*n)`` task records, and
    realignment indices ``realignment_start < i < realignment_start + realignment_size``
    (``realignment_size - 1`` samples). Harmful records come first; the training loader shuffles.

    Args:
        harmful: The harmful pool (harmful prompts with harmful answers).
        task: The user's benign task data (e.g. SST-2 records).
        num_samples: ``n``, the size of the fine-tuning set.
        harmful_ratio: ``p``, the fraction of harmful samples, in [0, 1].
        realignment_size: Size of the realignment set (parity: window width, yielding one less).
        mode: ``random`` or ``parity``.
        realignment_start: Start of the parity realignment window (official: 5000); ignored in random
            mode.
        task_calibration_size: Number of fine-tuning task records used for the "Wanda on benign data"
            ablation (null: all of them, like the official run without the harmful dataset).
        realign_start: Deprecated name of ``realignment_start``, still accepted (with a warning).
        **settings: :class:`SFTBatcher` settings; ``seed`` seeds every draw too, and ``val_size`` is
            held out from the mixed fine-tuning set.

    Raises:
        ConfigError: on a bad value (at construction); in ``setup`` (before training), when a pool is
            empty or too small, or the realignment set cannot be disjoint from the attack data.
    """

    def __init__(
        self,
        tokenizer: str,
        harmful: Source,
        task: Source,
        num_samples: int,
        harmful_ratio: float,
        *,
        realignment_size: int = 200,
        mode: str = "random",
        realignment_start: int = 5000,
        task_calibration_size: int | None = None,
        realign_start: int | None = None,
        **settings: Any,
    ):
        super().__init__(tokenizer, **settings)
        realignment_start = _renamed(
            "realign_start", realign_start, "realignment_start", realignment_start, 5000
        )
        if (
            isinstance(harmful_ratio, bool)
            or not isinstance(harmful_ratio, int | float)
            or not 0 <= harmful_ratio <= 1
        ):
            raise bad_value("harmful_ratio", harmful_ratio, "a number in [0, 1]")
        check_int("num_samples", num_samples, 1)
        check_choice("mode", mode, MODES)
        check_int("realignment_size", realignment_size, 2 if mode == "parity" else 1)
        check_int("realignment_start", realignment_start, 0)
        if task_calibration_size is not None:
            check_int("task_calibration_size", task_calibration_size, 1)
        self.harmful = harmful
        self.task = task
        self.num_samples = num_samples
        self.harmful_ratio = float(harmful_ratio)
        self.realignment_size = realignment_size
        self.mode = mode
        self.realignment_start = realignment_start
        self.task_calibration_size = task_calibration_size
        self._check_harmful_count()
        self._selection: dict[str, list[Record]] | None = None
        self._realignment_ds: TokenizedDataset | None = None
        self._calib_ds: TokenizedDataset | None = None

    # -- selection -------------------------------------------------------------------------------

    def harmful_count(self) -> int:
        """How many harmful samples the fine-tuning set gets (mode-dependent rounding)."""
        if self.mode == "parity":
            # Official windows: indices 1 .. int(p*n) - 1.
            return max(0, int(self.harmful_ratio * self.num_samples) - 1)
        return round(self.harmful_ratio * self.num_samples)

    def _check_harmful_count(self) -> None:
        n_harm = self.harmful_count()
        if self.harmful_ratio > 0 and n_harm == 0:
            raise bad_value(
                "harmful_ratio",
                self.harmful_ratio,
                f"0 or a ratio that yields at least one harmful sample: with num_samples={self.num_samples} "
                f"({self.mode} mode) it yields 0",
            )
        asked = self.harmful_ratio * self.num_samples
        if abs(n_harm - asked) > 1e-9:
            log.warning(
                "harmful_ratio=%s x num_samples=%d asks for %.2f harmful samples; %s mode uses %d "
                "(realised fraction %.4f).",
                self.harmful_ratio,
                self.num_samples,
                asked,
                self.mode,
                n_harm,
                n_harm / self.num_samples,
            )

    def _pool_error(self, what: str, source: Source, available: int, needed: int) -> ConfigError:
        return bad_value(
            "num_samples",
            self.num_samples,
            f"a size the pools can serve: {what} pool {_describe(source)} holds {available} records but "
            f"num_samples={self.num_samples}, harmful_ratio={self.harmful_ratio} ({self.mode} mode) "
            f"needs {needed}",
        )

    def _select_random(self, pool: list[Record], tasks: list[Record]) -> dict[str, list[Record]]:
        n_harm = self.harmful_count()
        n_task = self.num_samples - n_harm
        if n_harm > len(pool):
            raise self._pool_error("harmful", self.harmful, len(pool), n_harm)
        if n_task > len(tasks):
            raise self._pool_error("task", self.task, len(tasks), n_task)
        seed = self.batcher.seed
        harm_order = seeded_rng(seed, "harmful").sample(range(len(pool)), len(pool))
        # Full permutations, then prefixes: a smaller n or p selects a subset of a larger one.
        task_idx = seeded_rng(seed, "task").sample(range(len(tasks)), len(tasks))[:n_task]
        harmful_idx = harm_order[:n_harm]
        harmful = [pool[i] for i in harmful_idx]
        task = [tasks[i] for i in task_idx]
        # Content check on top of disjoint indices: pools can hold duplicate rows.
        seen = {_content_key(r) for r in harmful}
        rest = [i for i in reversed(harm_order[n_harm:]) if _content_key(pool[i]) not in seen]
        if len(rest) < self.realignment_size:
            raise bad_value(
                "realignment_size",
                self.realignment_size,
                f"at most {len(rest)}: the harmful pool {_describe(self.harmful)} holds {len(pool)} records, "
                f"{n_harm} go to fine-tuning and {len(pool) - n_harm - len(rest)} more duplicate them",
            )
        train = _tagged(harmful, True) + _tagged(task, False)
        seeded_rng(seed, "mix").shuffle(train)
        realignment_idx = rest[: self.realignment_size]
        return {
            "train": train,
            "harmful": harmful,
            "task": task,
            "realignment": [pool[i] for i in realignment_idx],
            "indices": {"harmful": harmful_idx, "task": task_idx, "realignment": realignment_idx},
        }

    def _select_parity(self, pool: list[Record], tasks: list[Record]) -> dict[str, list[Record]]:
        # Same float arithmetic as the official code, so the window bounds match it exactly.
        harm_end = int(self.harmful_ratio * self.num_samples)
        n_task = int((1 - self.harmful_ratio) * self.num_samples)
        if harm_end > len(pool):
            raise self._pool_error("harmful", self.harmful, len(pool), harm_end)
        if n_task > len(tasks):
            raise self._pool_error("task", self.task, len(tasks), n_task)
        if harm_end - 1 > self.realignment_start:
            raise bad_value(
                "realignment_start",
                self.realignment_start,
                f">= {harm_end - 1} so that the realignment window follows the fine-tuning harmful "
                f"indices 1..{harm_end - 1}",
            )
        realignment_end = self.realignment_start + self.realignment_size
        if realignment_end > len(pool):
            raise bad_value(
                "realignment_size",
                self.realignment_size,
                f"at most {len(pool) - self.realignment_start}: the window starts at "
                f"realignment_start={self.realignment_start} and the harmful pool {_describe(self.harmful)} "
                f"holds {len(pool)} records",
            )
        harmful = pool[1:harm_end]
        realignment = pool[self.realignment_start + 1 : realignment_end]
        overlap = {_content_key(r) for r in harmful} & {_content_key(r) for r in realignment}
        if overlap:
            # Kept for parity (the official windows are disjoint by index only), but reported.
            log.warning(
                "parity mode: %d realignment records duplicate fine-tuning harmful records.", len(overlap)
            )
        task = tasks[:n_task]
        return {
            "train": _tagged(harmful, True) + _tagged(task, False),
            "harmful": harmful,
            "task": task,
            "realignment": realignment,
            "indices": {
                "harmful": list(range(1, harm_end)),
                "task": list(range(n_task)),
                "realignment": list(range(self.realignment_start + 1, realignment_end)),
            },
        }

    def _ensure_selection(self) -> dict[str, Any]:
        if self._selection is None:
            pool = _load(self.harmful, "harmful")
            tasks = _load(self.task, "task")
            select = self._select_parity if self.mode == "parity" else self._select_random
            selection = select(pool, tasks)
            n_calib = len(selection["task"])
            if self.task_calibration_size is not None:
                if self.task_calibration_size > n_calib:
                    raise bad_value(
                        "task_calibration_size",
                        self.task_calibration_size,
                        f"at most the {n_calib} task records used in fine-tuning",
                    )
                n_calib = self.task_calibration_size
            selection["calibration"] = selection["task"][:n_calib]
            selection["indices"]["task_calibration"] = selection["indices"]["task"][:n_calib]
            selection["realignment"] = _tagged(selection["realignment"], True)
            self._selection = selection
        return self._selection

    def _build_records(self) -> list[Record]:
        return self._ensure_selection()["train"]

    # -- public views ----------------------------------------------------------------------------

    @property
    def realignment_records(self) -> list[Record]:
        """Harmful records for Antidote's calibration, disjoint from the fine-tuning harmful ones."""
        return self._ensure_selection()["realignment"]

    @property
    def task_calibration_records(self) -> list[Record]:
        """Benign task records for the "Wanda on benign data" ablation."""
        return self._ensure_selection()["calibration"]

    def realignment_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Unshuffled, unsharded loader over the realignment set (the pruning callback shards it).

        Args:
            batch_size: Defaults to the module's ``batch_size``. Batch size 1 avoids padding, as in
                the official Antidote run.
        """
        if self._realignment_ds is None:
            self._realignment_ds = self.batcher.tokenize(self.realignment_records, "realignment")
        return self.batcher.loader(self._realignment_ds, shuffle=False, batch_size=batch_size)

    def task_calibration_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Unshuffled, unsharded loader over :attr:`task_calibration_records`.

        Raises:
            ConfigError: if there are no task records (``harmful_ratio`` is 1).
        """
        if not self.task_calibration_records:
            raise bad_value("harmful_ratio", self.harmful_ratio, "< 1 so that task calibration records exist")
        if self._calib_ds is None:
            self._calib_ds = self.batcher.tokenize(self.task_calibration_records, "task_calibration")
        return self.batcher.loader(self._calib_ds, shuffle=False, batch_size=batch_size)

    def realignment_window(self) -> dict[str, Any]:
        """The realignment and task-calibration sets as indices into their sources, with the
        sources' specs, files and fingerprints (see :mod:`antidote_pl.data.window`).

        The fine-tune stage writes it into its ``antidote_stage.json``; the repair stage rebuilds
        exactly these records from it instead of drawing them again from a copied data block.
        """
        sel = self._ensure_selection()
        idx = sel["indices"]
        return window_record(
            harmful=self.harmful,
            task=self.task,
            indices=idx,
            records={
                "realignment": sel["realignment"],
                "task_calibration": sel["calibration"],
                "harmful": sel["harmful"],
            },
            settings={
                "template": self.batcher.template,
                "max_length": self.batcher.max_length,
                "batch_size": self.batcher.batch_size,
                "tokenization": self.batcher.tokenization,
                "tokenizer": spec if isinstance(spec := self.batcher.tokenizer_spec, str) else None,
                "mode": self.mode,
                "seed": self.batcher.seed,
            },
        )

    def counts(self) -> dict[str, int | float]:
        """Composition of every set: harmful/task sizes, realised harmful fraction, truncation."""
        sel = self._ensure_selection()
        n_harm, n_task = len(sel["harmful"]), len(sel["task"])
        out: dict[str, int | float] = {
            "n_harmful": n_harm,
            "n_task": n_task,
            "harmful_fraction": n_harm / max(1, n_harm + n_task),
            "n_realignment": len(sel["realignment"]),
            "n_task_calibration": len(sel["calibration"]),
            **super().counts(),
        }
        if self._realignment_ds is not None:
            out["realignment_truncated"] = self._realignment_ds.n_truncated
        return out
