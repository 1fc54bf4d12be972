"""How several judges' verdicts on the same answers are read together.

Every evaluation row in ``generations.jsonl`` holds the primary judge's verdict and each extra
judge's; these helpers pair them up and decide coherence once, for the evaluator and the analyses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from antidote_pl.errors import bad_value

#: Name under which the primary judge's ``verdict`` is reported when the caller gives none.
PRIMARY = "primary"


def judge_verdicts(rows: Iterable[Mapping[str, Any]], primary: str = PRIMARY) -> dict[str, list[dict | None]]:
    """Verdicts per judge, aligned by harmful row (``None`` where a judge gave none).

    Args:
        rows: Generation rows; only ``kind == "harmful"`` rows are used.
        primary: Name for the primary judge (e.g. its class name, ``KeywordJudge``).

    Returns:
        ``{judge: [verdict dict or None, ...]}``, the primary judge first.
    """
    harmful = [r for r in rows if r.get("kind") == "harmful"]
    names = [primary, *dict.fromkeys(n for r in harmful for n in (r.get("verdicts") or {}))]
    if primary in names[1:]:
        raise bad_value("primary", primary, "a name different from the extra judges'")
    out: dict[str, list[dict | None]] = {n: [] for n in names}
    for r in harmful:
        extra = r.get("verdicts") or {}
        for n in names:
            out[n].append(r.get("verdict") if n == primary else extra.get(n))
    return out


def coherence_flags(verdicts: Mapping[str, Sequence[Mapping[str, Any] | None]]) -> list[bool]:
    """Per response: coherent unless a judge that checks coherence says it is not.

    The evaluator's ``coherent_rate`` uses the same rule: an unchecked response counts as coherent;
    the first judge in order (the primary, then the extra judges) that reports coherence decides, so
    a judge that does not check it (an LM judge as primary) leaves it to one that does (the keyword
    judge as an extra judge).
    """
    n = len(next(iter(verdicts.values()), []))
    flags = []
    for i in range(n):
        said = [
            v[i]["coherent"]
            for v in verdicts.values()
            if v[i] is not None and v[i].get("coherent") is not None
        ]
        flags.append(said[0] is not False if said else True)
    return flags
