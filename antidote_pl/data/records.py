"""The record schema every source yields, and the :class:`Source` base type.

A record is a plain ``dict`` with at least ``instruction``, ``input`` and ``output`` (strings).
Optional keys carry metadata used by mixing and evaluation:

* ``category``: harm or task category (e.g. ``"fraud"``, ``"sst2"``);
* ``label``: gold answer for task records (e.g. ``"positive"``);
* ``harmful``: ``True`` for records from a harmful pool.

Sources are small classes with primitive constructor arguments, so LightningCLI configs can pick
one with ``class_path``/``init_args``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from antidote_pl.errors import ConfigError

Record = dict[str, Any]
REQUIRED_FIELDS = ("instruction", "input", "output")


class Source(ABC):
    """A named collection of records (harmful pool, task data, refusals, ...).

    Every source remembers the arguments it was built with (see :meth:`spec`), so a stage can
    record where its records came from and a later stage can rebuild the same source.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls).bind(*args, **kwargs)
        except TypeError:
            obj._init_args = None  # the constructor raises the real error next
        else:
            bound.apply_defaults()
            obj._init_args = dict(bound.arguments)
        return obj

    @abstractmethod
    def load(self) -> list[Record]:
        """Returns the records, in a deterministic order.

        Raises:
            antidote_pl.errors.ConfigError: if the source is missing, empty or badly mapped.
        """

    def describe(self) -> dict[str, Any]:
        """Returns the constructor arguments that identify this source (for fingerprints/metadata)."""
        return {
            "class": type(self).__name__,
            **{k: v for k, v in vars(self).items() if not k.startswith("_")},
        }

    def spec(self) -> dict[str, Any] | None:
        """The ``class_path``/``init_args`` that rebuild this source (nested sources included), or
        None when an argument is not plain data (it could not be written to JSON and read back)."""
        args = getattr(self, "_init_args", None)
        if args is None:
            return None
        init_args = {}
        for name, value in args.items():
            value = _plain(value)
            if value is _NOT_PLAIN:
                return None
            init_args[name] = value
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` as JSON data (sources as their specs), or ``_NOT_PLAIN``."""
    if isinstance(value, Source):
        spec = value.spec()
        return _NOT_PLAIN if spec is None else spec
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items.values()) else items
    return _NOT_PLAIN


def source_from_spec(spec: Any, field: str) -> Source:
    """Rebuilds a source from :meth:`Source.spec` output (nested specs become sources too).

    Raises:
        ConfigError: naming ``field`` when the spec is malformed or names no importable source.
    """
    if not isinstance(spec, dict) or set(spec) != {"class_path", "init_args"}:
        raise ConfigError(f"{field}: expected a source spec {{class_path, init_args}}, got {spec!r}")
    module, _, name = str(spec["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{field}: cannot import source class {spec['class_path']!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise ConfigError(f"{field}: {spec['class_path']!r} is not a Source")
    init_args = spec["init_args"]
    if not isinstance(init_args, dict):
        raise ConfigError(f"{field}.init_args: expected a mapping, got {init_args!r}")
    return cls(**{k: _from_plain(v, f"{field}.{k}") for k, v in init_args.items()})


def _from_plain(value: Any, field: str) -> Any:
    if isinstance(value, dict) and set(value) == {"class_path", "init_args"}:
        return source_from_spec(value, field)
    if isinstance(value, list):
        return [_from_plain(v, f"{field}[{i}]") for i, v in enumerate(value)]
    return value


def fingerprint_records(records: list[Record]) -> str:
    """Returns a short content hash of records, stable across runs and processes."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# Input paths, for the output-safety checks (an output must not overwrite an input).
def source_paths(field: str, value: Any) -> dict[str, Any]:
    """Local file paths of a record source or a list of sources, ``field -> paths``, for input checks.

    Takes the ``path`` and ``data_files`` of each :class:`~antidote_pl.data.records.Source`, and those
    of the sources it is built from (a mixture's ``sources`` and ``exclude``, a wrapper's ``source``),
    since loading it reads them too; anything else in ``value`` is ignored.
    """

    items = list(enumerate(value)) if isinstance(value, list | tuple) else [(None, value)]
    found: dict[str, Any] = {}
    for i, source in items:
        if not isinstance(source, Source):
            continue
        where = field if i is None else f"{field}[{i}]"
        for attr in ("path", "data_files"):
            files = _flatten(getattr(source, attr, None))
            if files:
                found[f"{where}.{attr}"] = files if len(files) > 1 else files[0]
        for attr, inner in vars(source).items():
            if not attr.startswith("_"):
                found.update(source_paths(f"{where}.{attr}", inner))
    return found


def data_input_paths(datamodule: Any) -> dict[str, Any]:
    """Local file paths of a DataModule's record sources (its attributes), ``field -> paths``."""
    found: dict[str, Any] = {}
    for name, value in vars(datamodule).items():
        found.update(source_paths(f"data.{name}", value))
    return found


def _flatten(value: Any) -> list[Any]:
    """A path, a list of paths or a split -> path(s) mapping as one flat list."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [p for v in value for p in _flatten(v)]
    return [value]
