"""Evaluation building blocks: batched generation, task parsers, harmfulness judges and metrics.

* :mod:`~antidote_pl.eval.generation`: left-padded batched greedy generation, DDP sharding helpers,
  JSONL output.
* :mod:`~antidote_pl.eval.parsers`: SST-2 / AG News / GSM8K answer parsers (reference C.2).
* :mod:`~antidote_pl.eval.judges`: keyword, classifier (beaver-dam parity), guard and tiny-world
  judges.
* :mod:`~antidote_pl.eval.offline_judge`: a hub-free judge trained on labelled pairs in seconds.
* :mod:`~antidote_pl.eval.metrics`: torchmetrics counters (harmful score, accuracy, per category).

Names are resolved lazily, so importing one piece (e.g. the parsers) does not import torchmetrics
or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "generation": (
        "generate",
        "generate_one_by_one",
        "generate_distributed",
        "shard_for_rank",
        "gather_objects",
        "write_generations_jsonl",
    ),
    "parsers": (
        "PARSERS",
        "get_parser",
        "is_correct",
        "parse_sst2",
        "parse_agnews",
        "parse_gsm8k",
        "gsm8k_gold",
    ),
    "judges": ("Judge", "Verdict", "KeywordJudge", "ClassifierJudge", "GuardJudge", "TinyWorldJudge"),
    "offline_judge": ("OfflineJudge",),
    "lm_judge": ("LMJudge",),
    "metrics": ("HarmfulScore", "TaskAccuracy", "RateByCategory"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
