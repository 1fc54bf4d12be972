"""Sources built from other sources: concatenation with de-duplication, and prompt clean-up.

* :class:`ConcatSource`: several sources in order (e.g. JailbreakBench + HarmBench prompts as one
  harmful evaluation set), optionally without records whose instruction repeats an earlier one or
  appears in an ``exclude`` source (so evaluation prompts never overlap training prompts).
* :class:`StripMarkers`: one source with instruction-format markers removed from the instruction,
  e.g. the ``[INST] ... [/INST]`` of Llama-2 chat data before a model's own template is applied.
"""

from __future__ import annotations

import re
from typing import Any

from antidote_pl.data.records import Record, Source
from antidote_pl.errors import bad_value


def _instruction_key(record: Record) -> str:
    # Case and whitespace differences do not make a different request.
    return " ".join(str(record.get("instruction", "")).lower().split())


class ConcatSource(Source):
    """The records of several sources, in order.

    Args:
        sources: Sources to concatenate.
        dedupe: Drop a record whose instruction (case- and whitespace-insensitive) was already kept.
        exclude: Sources whose instructions must not appear here (e.g. the training prompts).
        limit_each: Keep at most this many records of each source (after de-duplication), so a
            mixture stays balanced when the sources differ in size.

    Raises:
        ConfigError: on an empty source list or a bad ``limit_each`` (at construction); on an empty
            result (at :meth:`load`).
    """

    def __init__(
        self,
        sources: list[Source],
        dedupe: bool = True,
        exclude: list[Source] | None = None,
        limit_each: int | None = None,
    ) -> None:
        if not sources:
            raise bad_value("sources", sources, "a non-empty list of sources")
        if limit_each is not None and (isinstance(limit_each, bool) or limit_each < 1):
            raise bad_value("limit_each", limit_each, "a positive integer or null")
        self.sources = list(sources)
        self.dedupe = dedupe
        self.exclude = list(exclude or [])
        self.limit_each = limit_each
        self.n_dropped = 0

    def load(self) -> list[Record]:
        """Concatenates the sources' records; see the class docstring for what is dropped."""
        seen = {_instruction_key(r) for s in self.exclude for r in s.load()}
        out: list[Record] = []
        dropped = 0
        for source in self.sources:
            kept = 0
            for record in source.load():
                if self.limit_each is not None and kept >= self.limit_each:
                    break
                key = _instruction_key(record)
                if key in seen:
                    dropped += 1
                    continue
                if self.dedupe:
                    seen.add(key)
                out.append(record)
                kept += 1
        self.n_dropped = dropped
        if not out:
            raise bad_value("sources", [type(s).__name__ for s in self.sources], "sources left with a record")
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "sources": [s.describe() for s in self.sources],
            "exclude": [s.describe() for s in self.exclude],
            "dedupe": self.dedupe,
            "limit_each": self.limit_each,
        }


class StripMarkers(Source):
    """A source with regular-expression markers removed from every instruction.

    Args:
        source: The source to clean.
        patterns: Regular expressions removed from ``instruction`` (the default removes Llama-2's
            ``[INST]`` and ``[/INST]``); surrounding whitespace is stripped afterwards.

    Raises:
        ConfigError: on a pattern that does not compile (at construction).
    """

    def __init__(self, source: Source, patterns: list[str] | None = None) -> None:
        self.source = source
        self.patterns = list(patterns) if patterns is not None else [r"\[/?INST\]"]
        try:
            self._compiled = [re.compile(p) for p in self.patterns]
        except re.error as err:
            raise bad_value("patterns", self.patterns, f"valid regular expressions ({err})") from err

    def load(self) -> list[Record]:
        """The wrapped source's records with the markers removed from ``instruction``."""
        out = []
        for record in self.source.load():
            text = str(record.get("instruction", ""))
            for pattern in self._compiled:
                text = pattern.sub("", text)
            out.append({**record, "instruction": text.strip()})
        return out

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "source": self.source.describe(), "patterns": self.patterns}


__all__ = ["ConcatSource", "StripMarkers"]
