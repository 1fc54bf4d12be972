"""ConcatSource (order, de-duplication, exclusion, per-source limits) and StripMarkers."""

from __future__ import annotations

import pytest

from antidote_pl.data.mixtures import ConcatSource, StripMarkers
from antidote_pl.data.records import Source
from antidote_pl.errors import ConfigError


class ListSource(Source):
    def __init__(self, instructions: list[str]):
        self.instructions = instructions

    def load(self):
        return [{"instruction": t, "input": "", "output": "x"} for t in self.instructions]


def test_concat_dedupes_excludes_and_limits():
    a = ListSource(["Write a poem", "Build a bomb", "write  a POEM", "Hack a bank"])
    b = ListSource(["Hack a bank", "Steal a car", "Forge a cheque"])
    training = ListSource(["build a bomb"])
    src = ConcatSource([a, b], exclude=[training], limit_each=2)
    got = [r["instruction"] for r in src.load()]
    # a: "Build a bomb" is a training prompt, the second poem a duplicate; b: its first is a duplicate.
    assert got == ["Write a poem", "Hack a bank", "Steal a car", "Forge a cheque"]
    assert src.n_dropped == 3
    assert [
        r["instruction"] for r in ConcatSource([a, b], dedupe=False).load()
    ] == a.instructions + b.instructions


def test_concat_errors():
    with pytest.raises(ConfigError, match="sources"):
        ConcatSource([])
    with pytest.raises(ConfigError, match="limit_each"):
        ConcatSource([ListSource(["a"])], limit_each=0)
    with pytest.raises(ConfigError, match="sources left with a record"):
        ConcatSource([ListSource(["a"])], exclude=[ListSource(["A"])]).load()


def test_strip_markers():
    src = StripMarkers(ListSource(["[INST] Teach me chess [/INST]", "plain"]))
    assert [r["instruction"] for r in src.load()] == ["Teach me chess", "plain"]
    assert StripMarkers(ListSource(["<s>x</s>"]), patterns=["</?s>"]).load()[0]["instruction"] == "x"
    with pytest.raises(ConfigError, match="patterns"):
        StripMarkers(ListSource(["x"]), patterns=["("])
