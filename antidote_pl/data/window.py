"""The realignment window: which records a fine-tune stage set aside for the repair stage.

Antidote calibrates on a *realignment* set of harmful samples that must be disjoint from the harmful
samples the attack trained on. The fine-tune stage draws both from one harmful pool, so it records
the draw in its ``antidote_stage.json`` (key :data:`~antidote_pl.utils.files.REALIGNMENT_WINDOW_KEY`)
and the repair stage rebuilds exactly those records from the record instead of drawing them again
from a hand-copied data block::

    {"version": 1,
     "settings": {"template": ..., "max_length": ..., "batch_size": ..., "tokenization": ...,
                  "tokenizer": ..., "mode": ..., "seed": ...},
     "realignment": {"source": {class_path, init_args}, "indices": [...], "fingerprint": "...",
                     "files": [...]},
     "task_calibration": {...},   # the benign task records of the "Wanda on benign data" ablation
     "harmful": {...}}            # the attack's harmful records, kept to check disjointness

``indices`` are positions in the source's deterministic ``load()`` order; ``fingerprint`` is
:func:`~antidote_pl.data.records.fingerprint_records` of the records as served (realignment records
carry ``harmful: true``), so a source whose data changed since the fine-tune is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidote_pl.data.records import Record, Source, fingerprint_records, source_from_spec, source_paths
from antidote_pl.errors import ConfigError
from antidote_pl.utils.files import REALIGNMENT_WINDOW_KEY, STAGE_FILE, read_stage_metadata

WINDOW_VERSION = 1
#: The record sets of a window and the data module source each is drawn from.
SET_SOURCES = {"realignment": "harmful", "task_calibration": "task", "harmful": "harmful"}
SETTINGS = ("template", "max_length", "batch_size", "tokenization", "tokenizer", "mode", "seed")


def tag_realignment(records: list[Record]) -> list[Record]:
    """Realignment records as served to the pruner: marked ``harmful: true``."""
    return [{**r, "harmful": True} for r in records]


def window_record(
    harmful: Source,
    task: Source,
    indices: dict[str, list[int]],
    records: dict[str, list[Record]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """The JSON record of a fine-tune stage's window (see the module docstring).

    Args:
        harmful: The harmful pool the attack and the realignment set are drawn from.
        task: The task source the calibration ablation's records come from.
        indices: ``realignment``, ``task_calibration`` and ``harmful`` positions in their sources.
        records: The same sets' records as served, for their fingerprints.
        settings: The tokenisation settings the repair stage reuses (see :data:`SETTINGS`).
    """
    sources = {"harmful": harmful, "task": task}
    out: dict[str, Any] = {"version": WINDOW_VERSION, "settings": {k: settings.get(k) for k in SETTINGS}}
    for name, source_name in SET_SOURCES.items():
        source = sources[source_name]
        out[name] = {
            "source": source.spec(),
            "indices": [int(i) for i in indices[name]],
            "fingerprint": fingerprint_records(records[name]),
            "files": _local_files(source),
        }
    return out


def _local_files(source: Source) -> list[str]:
    files: list[str] = []
    for value in source_paths("source", source).values():
        for f in value if isinstance(value, list) else [value]:
            p = Path(str(f)).expanduser()
            files.append(str(p.resolve()) if p.exists() else str(f))
    return files


@dataclass(frozen=True)
class RecordWindow:
    """One record set of a window: a source, positions in it, and the records' fingerprint."""

    source: dict[str, Any] | None
    indices: list[int]
    fingerprint: str
    files: list[str]

    @classmethod
    def from_json(cls, data: Any, where: str) -> RecordWindow:
        """Checks and reads one set of a window record.

        Raises:
            ConfigError: naming ``where`` when a field is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        indices, fingerprint = data.get("indices"), data.get("fingerprint")
        if not isinstance(indices, list) or not all(isinstance(i, int) and i >= 0 for i in indices):
            raise ConfigError(f"{where}.indices: expected a list of non-negative integers")
        if not isinstance(fingerprint, str):
            raise ConfigError(f"{where}.fingerprint: expected a string, got {fingerprint!r}")
        return cls(data.get("source"), indices, fingerprint, list(data.get("files") or []))

    def records(self, source: Source, where: str, tag: bool) -> list[Record]:
        """The set's records from ``source``, checked against the recorded fingerprint.

        Raises:
            ConfigError: when the source is now shorter than the recorded positions or its records
                differ from the recorded ones.
        """
        pool = source.load()
        if self.indices and max(self.indices) >= len(pool):
            raise ConfigError(
                f"{where}: position {max(self.indices)} is recorded but the source now holds {len(pool)} "
                "records; its data changed since the fine-tune stage, re-run that stage."
            )
        picked = [pool[i] for i in self.indices]
        picked = tag_realignment(picked) if tag else picked
        if fingerprint_records(picked) != self.fingerprint:
            raise ConfigError(
                f"{where}: the records rebuilt from {self.files or self.source} do not match the recorded "
                "fingerprint; the source data changed since the fine-tune stage, re-run that stage."
            )
        return picked


@dataclass(frozen=True)
class RealignmentWindow:
    """A fine-tune stage's recorded window, read back by the repair stage.

    Attributes:
        origin: The ``antidote_stage.json`` it was read from (named in every error).
        settings: Tokenisation settings of the fine-tune data (template, max_length, ...).
        sets: ``realignment``, ``task_calibration`` and ``harmful`` record sets.
    """

    origin: str
    settings: dict[str, Any]
    sets: dict[str, RecordWindow]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any, origin: str) -> RealignmentWindow:
        """Checks a window record (layout, version, disjoint realignment and attack positions).

        Raises:
            ConfigError: naming ``origin`` on a malformed record or overlapping sets.
        """
        where = f"{origin}: {REALIGNMENT_WINDOW_KEY}"
        if not isinstance(data, dict) or data.get("version") != WINDOW_VERSION:
            got = str(data)[:200]
            raise ConfigError(f"{where}: expected a version-{WINDOW_VERSION} window record, got {got}")
        settings = data.get("settings")
        if not isinstance(settings, dict):
            raise ConfigError(f"{where}.settings: expected a mapping")
        sets = {name: RecordWindow.from_json(data.get(name), f"{where}.{name}") for name in SET_SOURCES}
        overlap = set(sets["realignment"].indices) & set(sets["harmful"].indices)
        if overlap:
            raise ConfigError(
                f"{where}: {len(overlap)} realignment positions are also fine-tuning harmful positions "
                f"(e.g. {sorted(overlap)[:5]}); the two windows must be disjoint."
            )
        return cls(origin, settings, sets, data)

    def source(self, name: str) -> Source:
        """Rebuilds the source of the record set ``name`` from its recorded spec.

        Raises:
            ConfigError: when the spec is missing (the source had arguments that are not plain data)
                or does not build.
        """
        spec = self.sets[name].source
        where = f"{self.origin}: {REALIGNMENT_WINDOW_KEY}.{name}.source"
        if spec is None:
            raise ConfigError(
                f"{where}: not recorded (the source's arguments are not plain data), so it cannot be rebuilt"
            )
        return source_from_spec(spec, where)

    def records(self, name: str, source: Source) -> list[Record]:
        """The records of set ``name`` from ``source``, checked (see :meth:`RecordWindow.records`)."""
        where = f"{self.origin}: {REALIGNMENT_WINDOW_KEY}.{name}"
        return self.sets[name].records(source, where, tag=name == "realignment")


def read_window(stage_dir: str, field: str = "data.adapter_path") -> RealignmentWindow:
    """Reads the realignment window a fine-tune stage recorded in its ``antidote_stage.json``.

    Raises:
        ConfigError: when ``stage_dir`` is not a stage output, or its metadata records no window
            (written by an older version or by a stage that draws none): the message names the file
            and says to re-run the fine-tune stage.
    """
    meta = read_stage_metadata(stage_dir, field)
    meta_file = Path(stage_dir).expanduser() / STAGE_FILE
    if meta.get(REALIGNMENT_WINDOW_KEY) is None:
        raise ConfigError(
            f"{meta_file}: records no realignment window ({REALIGNMENT_WINDOW_KEY}); the repair stage reads "
            "its calibration records from there. Re-run the fine-tune stage that wrote "
            f"{stage_dir} (a HarmfulFinetuneDataModule stage) with this version of antidote_pl."
        )
    return RealignmentWindow.from_json(meta[REALIGNMENT_WINDOW_KEY], str(meta_file))
