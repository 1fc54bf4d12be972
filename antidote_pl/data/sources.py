"""Generic record sources: Hugging Face datasets and local JSON/JSONL/CSV/TSV files.

Both classes share one column-to-record mapping (:func:`map_rows`), configured with primitives so a
LightningCLI YAML can describe any dataset::

    harmful:
      class_path: antidote_pl.data.sources.LocalSource
      init_args:
        path: ../shared/data/beavertails_artkit_sample/beavertails_sample.csv
        fields: {instruction: prompt, output: response, category: category}

Mapping rules, in order:

1. ``filters`` (column -> required value, or a list of accepted values) select rows; ``true``/``false``
   match ``"True"``/``"False"`` cells and numbers match their text (``1`` matches ``"1"``).
2. ``offset`` rows that pass are skipped, then at most ``limit`` are kept (file order, like the
   official "first N" selection).
3. Each record gets ``instruction``, ``input`` and ``output`` from ``fields`` (record key -> column,
   or a list of columns joined by a space), else ``constants`` (record key -> fixed value), else a
   column of the same name, else ``""``.
4. ``label_map`` maps the raw ``output`` text (``"1"``) to a label string (``"positive"``); the
   result is both ``output`` and ``label``.
5. ``output_replace`` rewrites substrings of ``output`` (GSM8K: ``"####"`` -> ``"The final answer is: "``).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from antidote_pl.data.records import REQUIRED_FIELDS, Record, Source
from antidote_pl.errors import ConfigError, bad_file, bad_value, check_int
from antidote_pl.utils.files import not_utf8

FORMATS = ("json", "jsonl", "csv", "tsv")


def _cell(value: Any) -> str:
    """Text of a data cell; missing cells are empty."""
    return "" if value is None else str(value)


def _norm(value: Any) -> str:
    """Comparable text of a filter value or cell: booleans compare case-insensitively."""
    text = str(value).strip()
    return text.lower() if text.lower() in ("true", "false") else text


def _passes(row: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    for column, required in filters.items():
        accepted = required if isinstance(required, list) else [required]
        if _norm(row.get(column)) not in {_norm(a) for a in accepted}:
            return False
    return True


def _as_columns(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def check_mapping(
    fields: Mapping[str, Any] | None,
    constants: Mapping[str, Any] | None,
    label_map: Mapping[Any, Any] | None,
    filters: Mapping[str, Any] | None,
    output_replace: Mapping[str, str] | None,
    limit: int | None,
    offset: int,
) -> None:
    """Validates the mapping arguments that do not need the data (called by constructors).

    Raises:
        ConfigError: naming the bad argument.
    """
    mappings = {
        "fields": fields,
        "constants": constants,
        "label_map": label_map,
        "filters": filters,
        "output_replace": output_replace,
    }
    for name, value in mappings.items():
        if value is not None and not isinstance(value, Mapping):
            raise bad_value(name, value, "a mapping or null")
    for key, cols in (fields or {}).items():
        if not cols or not all(isinstance(c, str) and c for c in _as_columns(cols)):
            raise bad_value(f"fields.{key}", cols, "a column name or a non-empty list of column names")
    both = sorted(set(fields or {}) & set(constants or {}))
    if both:
        raise bad_value(
            "constants", dict(constants or {}), f"keys not also given in fields (both have {both})"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise bad_value("limit", limit, "a positive int or null")
    check_int("offset", offset, 0)
    if label_map is not None and not label_map:
        raise bad_value("label_map", label_map, "a non-empty mapping or null")


def map_rows(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    fields: Mapping[str, str | Sequence[str]] | None = None,
    constants: Mapping[str, Any] | None = None,
    label_map: Mapping[Any, Any] | None = None,
    filters: Mapping[str, Any] | None = None,
    output_replace: Mapping[str, str] | None = None,
    limit: int | None = None,
    offset: int = 0,
    where: str = "source",
) -> list[Record]:
    """Turns raw rows into records (the rules are in the module docstring).

    Args:
        rows: Raw rows (column -> value), in file order.
        columns: Every column name of the data, for validation and defaults.
        fields: Record key -> column (or list of columns joined by a space).
        constants: Record key -> fixed value.
        label_map: Raw ``output`` text -> label text; keys are compared as strings.
        filters: Column -> required value (or list of accepted values).
        output_replace: Substring -> replacement, applied to ``output`` after ``label_map``.
        limit: Keep at most this many records.
        offset: Skip this many matching rows first.
        where: Description of the data (path or dataset name) for error messages.

    Returns:
        The records.

    Raises:
        ConfigError: on a column that does not exist, a raw label missing from ``label_map``, a
            mapping that yields neither ``instruction`` nor ``output``, or an empty result.
    """
    check_mapping(fields, constants, label_map, filters, output_replace, limit, offset)
    constants = dict(constants or {})
    resolved = _resolve_fields(list(columns), fields, constants, filters, label_map, where)
    labels = None if label_map is None else {str(k): str(v) for k, v in label_map.items()}
    records: list[Record] = []
    skipped = 0
    for row in rows:
        if filters and not _passes(row, filters):
            continue
        if skipped < offset:
            skipped += 1
            continue
        records.append(_map_row(row, resolved, constants, labels, output_replace or {}, where))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ConfigError(
            f"{where} gave no records after filters={dict(filters or {})!r}, offset={offset}: "
            "expected at least one matching row."
        )
    return records


def _resolve_fields(
    columns: list[str],
    fields: Mapping[str, str | Sequence[str]] | None,
    constants: dict[str, Any],
    filters: Mapping[str, Any] | None,
    label_map: Mapping[Any, Any] | None,
    where: str,
) -> dict[str, list[str]]:
    """Record key -> the columns it is made of: the explicit ``fields`` plus same-name defaults,
    each checked against ``columns`` (as are the ``filters`` columns).

    Raises:
        ConfigError: see :func:`map_rows`.
    """
    explicit = {k: _as_columns(v) for k, v in (fields or {}).items()}
    used = {c for cols in explicit.values() for c in cols}
    # Same-name defaults, unless that column is already mapped elsewhere (e.g. "input" -> instruction).
    resolved = {k: [k] for k in REQUIRED_FIELDS if k in columns and k not in constants and k not in used}
    resolved.update(explicit)
    for key, cols in resolved.items():
        for col in cols:
            if col not in columns:
                raise bad_value(f"fields.{key}", col, f"a column of {where}: {columns}")
    for col in filters or {}:
        if col not in columns:
            raise bad_value("filters", col, f"a column of {where}: {columns}")
    if not ({"instruction", "output"} & (set(resolved) | set(constants))):
        raise bad_value(
            "fields", dict(fields or {}), f"a mapping for 'instruction' or 'output' (columns: {columns})"
        )
    if label_map is not None and "output" not in resolved:
        raise bad_value("label_map", dict(label_map), "to be used with a column mapped to 'output' in fields")
    return resolved


def _map_row(
    row: Mapping[str, Any],
    resolved: dict[str, list[str]],
    constants: dict[str, Any],
    labels: dict[str, str] | None,
    output_replace: Mapping[str, str],
    where: str,
) -> Record:
    """One raw row as a record: columns joined, constants set, the label mapped, ``output`` edited.

    Raises:
        ConfigError: for a raw label that ``labels`` (the label map) does not know.
    """
    record: Record = {key: "" for key in REQUIRED_FIELDS}
    record.update(constants)
    record.update({key: " ".join(_cell(row.get(c)) for c in cols) for key, cols in resolved.items()})
    if labels is not None:
        raw = record["output"]
        if raw not in labels:
            allowed = f"a raw label with a mapping, one of {sorted(labels)} ({where})"
            raise bad_value("label_map", raw, allowed)
        record["output"] = labels[raw]
        record.setdefault("label", labels[raw])
    for old, new in output_replace.items():
        record["output"] = record["output"].replace(old, new)
    return record


class _MappedSource(Source):
    """Stores and validates the mapping arguments shared by every concrete source."""

    def __init__(
        self,
        fields: dict[str, str | list[str]] | None,
        constants: dict[str, Any] | None,
        label_map: dict[str, str] | None,
        filters: dict[str, Any] | None,
        output_replace: dict[str, str] | None,
        limit: int | None,
        offset: int,
    ):
        check_mapping(fields, constants, label_map, filters, output_replace, limit, offset)
        self.fields = fields
        self.constants = constants
        self.label_map = label_map
        self.filters = filters
        self.output_replace = output_replace
        self.limit = limit
        self.offset = offset

    def _map(self, rows: Iterable[Mapping[str, Any]], columns: Sequence[str], where: str) -> list[Record]:
        return map_rows(
            rows,
            columns,
            fields=self.fields,
            constants=self.constants,
            label_map=self.label_map,
            filters=self.filters,
            output_replace=self.output_replace,
            limit=self.limit,
            offset=self.offset,
            where=where,
        )


class HFSource(_MappedSource):
    """Records from :func:`datasets.load_dataset` (hub names or builders like ``"json"``/``"csv"``).

    Example (the official harmful pool)::

        HFSource("PKU-Alignment/BeaverTails", split="30k_train", filters={"is_safe": False},
                 fields={"instruction": "prompt", "output": "response"})

    Args:
        path: Hub dataset name, local dataset directory, or builder name (``json``, ``csv``, ...).
        name: Dataset configuration name (e.g. ``"main"`` for GSM8K).
        split: Split to load.
        fields: See :func:`map_rows`.
        constants: See :func:`map_rows`.
        label_map: See :func:`map_rows`.
        filters: See :func:`map_rows`.
        limit: See :func:`map_rows`.
        data_files: Files for builder paths (a path, a list, or split -> paths).
        revision: Dataset revision (commit or tag) to pin the data version.
        output_replace: See :func:`map_rows`.
        offset: See :func:`map_rows`.
        cache_dir: Cache directory of ``datasets`` (default: its own).

    Raises:
        ConfigError: on bad mapping arguments (at construction) or when the dataset, split or a mapped
            column cannot be found (at :meth:`load`).
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        fields: dict[str, str | list[str]] | None = None,
        constants: dict[str, Any] | None = None,
        label_map: dict[str, str] | None = None,
        filters: dict[str, Any] | None = None,
        limit: int | None = None,
        data_files: str | list[str] | dict[str, str | list[str]] | None = None,
        revision: str | None = None,
        output_replace: dict[str, str] | None = None,
        offset: int = 0,
        cache_dir: str | None = None,
    ):
        if not isinstance(path, str) or not path:
            raise bad_value("path", path, "a dataset name, directory or builder name")
        super().__init__(fields, constants, label_map, filters, output_replace, limit, offset)
        self.path = path
        self.name = name
        self.split = split
        self.data_files = data_files
        self.revision = revision
        self.cache_dir = cache_dir

    def load(self) -> list[Record]:
        """Loads the split and maps its rows (see :func:`map_rows`)."""
        import datasets

        where = f"dataset {self.path!r} (name={self.name!r}, split={self.split!r})"
        try:
            ds = datasets.load_dataset(
                self.path,
                self.name,
                split=self.split,
                data_files=self.data_files,
                revision=self.revision,
                cache_dir=self.cache_dir,
            )
        except FileNotFoundError as err:
            field, value = ("data_files", self.data_files) if self.data_files else ("path", self.path)
            raise bad_value(field, value, f"an existing dataset or file ({err})") from err
        except ConnectionError as err:
            # Offline or unknown hub name: say which field to change rather than a network trace.
            raise bad_value(
                "path", self.path, f"a dataset reachable from here, or local files via LocalSource ({err})"
            ) from err
        except ValueError as err:
            if "split" in str(err).lower():
                raise bad_value("split", self.split, f"a split of {self.path!r} ({err})") from err
            raise ConfigError(f"path={self.path!r} could not be loaded: {err}") from err
        return self._map(ds, ds.column_names, where)


def infer_format(path: str | Path, format: str | None = None) -> str:
    """Returns the file format: ``format`` if given, else the suffix (``.gz`` is looked through).

    Raises:
        ConfigError: on an unknown format or a suffix that names none.
    """
    if format is not None:
        if format not in FORMATS:
            raise bad_value("format", format, f"one of {list(FORMATS)} or null (infer from the suffix)")
        return format
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    inferred = suffixes[-1].lstrip(".") if suffixes else ""
    if inferred not in FORMATS:
        raise bad_value(
            "format", None, f"one of {list(FORMATS)}: it cannot be inferred from the suffix of {str(path)!r}"
        )
    return inferred


def _open_text(path: Path):
    # utf-8-sig drops a byte-order mark, which would otherwise stick to the first column name.
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_json(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise bad_value("path", str(path), f"a valid JSON file ({err})") from err
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise bad_value("path", str(path), "a JSON list of objects (use format 'jsonl' for JSON Lines)")
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file; a bad line is an error naming the file and the line."""
    rows = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise bad_value("path", f"{path}:{lineno}", f"one JSON object per line ({err})") from err
            if not isinstance(row, dict):
                raise bad_value("path", f"{path}:{lineno}", "one JSON object per line")
            rows.append(row)
    return rows


def _read_delimited(
    path: Path, delimiter: str, column_names: list[str] | None
) -> tuple[list[str], list[dict]]:
    # GLUE-style TSV files contain bare quote characters, so TSV is read without quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = list(column_names) if column_names is not None else next(reader, [])
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise bad_value(
                    "column_names" if column_names is not None else "path",
                    column_names if column_names is not None else str(path),
                    f"{len(header)} columns per row, but line {reader.line_num} of {path} has {len(row)}",
                )
            rows.append(dict(zip(header, row)))
    return header, rows


def _columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Union of the keys of all rows, in first-seen order (JSON rows may omit keys)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


class LocalSource(_MappedSource):
    """Records from a local JSON, JSON Lines, CSV or TSV file (optionally gzipped).

    Example (SST-2 as in the official task file)::

        LocalSource("sst2/train.tsv", fields={"input": "sentence", "output": "label"},
                    constants={"instruction": "Analyze the sentiment ...", "category": "sst2"},
                    label_map={"0": "negative", "1": "positive"})

    Args:
        path: File path.
        format: ``json`` (a list of objects), ``jsonl``, ``csv`` or ``tsv``; inferred from the suffix
            when null.
        fields: See :func:`map_rows`.
        constants: See :func:`map_rows`.
        label_map: See :func:`map_rows`.
        filters: See :func:`map_rows`.
        limit: See :func:`map_rows`.
        column_names: Column names of a header-less CSV/TSV file (its first line is then data).
        output_replace: See :func:`map_rows`.
        offset: See :func:`map_rows`.

    Raises:
        ConfigError: on bad arguments (at construction) or a missing/unreadable file, unknown column or
            empty result (at :meth:`load`).
    """

    def __init__(
        self,
        path: str,
        format: str | None = None,
        fields: dict[str, str | list[str]] | None = None,
        constants: dict[str, Any] | None = None,
        label_map: dict[str, str] | None = None,
        filters: dict[str, Any] | None = None,
        limit: int | None = None,
        column_names: list[str] | None = None,
        output_replace: dict[str, str] | None = None,
        offset: int = 0,
    ):
        if not isinstance(path, str | Path) or not str(path):
            raise bad_value("path", path, "a file path")
        self.format = infer_format(path, format)
        if column_names is not None:
            if self.format not in ("csv", "tsv"):
                raise bad_value(
                    "column_names", column_names, f"null for format {self.format!r} (csv/tsv only)"
                )
            if not column_names or len(set(column_names)) != len(column_names):
                raise bad_value("column_names", column_names, "a non-empty list of distinct names")
        super().__init__(fields, constants, label_map, filters, output_replace, limit, offset)
        self.path = str(path)
        self.column_names = column_names

    def _read(self, path: Path) -> tuple[list[str], list[dict[str, Any]]]:
        try:
            if self.format in ("csv", "tsv"):
                return _read_delimited(path, "," if self.format == "csv" else "\t", self.column_names)
            rows = _read_json(path) if self.format == "json" else read_jsonl(path)
        except UnicodeDecodeError as err:
            # The decoder's offset counts from its current block: not_utf8 finds the file's offset.
            raise bad_file(path, not_utf8(path, err)) from err
        except (csv.Error, EOFError, OSError) as err:
            # csv: a malformed row; EOFError/OSError: a truncated or corrupt .gz file.
            raise bad_file(path, f"unreadable as {self.format} ({err})") from err
        return _columns_of(rows), rows

    def load(self) -> list[Record]:
        """Reads the file and maps its rows (see :func:`map_rows`)."""
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise bad_value("path", self.path, "an existing file")
        columns, rows = self._read(path)
        if not rows:
            raise bad_value("path", self.path, "a file with at least one data row")
        return self._map(rows, columns, str(path))
