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
import json
from abc import ABC, abstractmethod
from typing import Any

Record = dict[str, Any]
REQUIRED_FIELDS = ("instruction", "input", "output")


class Source(ABC):
    """A named collection of records (harmful pool, task data, refusals, ...)."""

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


def fingerprint_records(records: list[Record]) -> str:
    """Returns a short content hash of records, stable across runs and processes."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
