"""Judge agreement: how far the judges of one evaluation agree, and whether "safe" means "broken".

The evaluator writes one row per prompt to ``generations.jsonl``: harmful rows (``kind ==
"harmful"``) carry the primary judge's verdict under ``verdict`` and every extra judge's under
``verdicts[<ClassName>]`` (``StageEvaluator.extra_judges``), each ``{"harmful", "category",
"score", "coherent"}``. From such rows (one file, or several variants' rows concatenated to pool
them) this module computes

* :func:`pairwise_agreement`: per pair of judges, the number of prompts both judged, the % on which
  they agree and Cohen's kappa (agreement beyond what their base rates give by chance);
* :func:`judge_summary`: per judge, HS with n, beside the coherent rate of the judged responses and
  the HS among coherent responses, so a low HS that comes from broken text is visible;
* :func:`agreement_markdown`: both as markdown tables for the report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from antidote_pl.data.sources import read_jsonl
from antidote_pl.errors import bad_file, bad_value
from antidote_pl.judges.verdicts import PRIMARY, coherence_flags, judge_verdicts
from antidote_pl.utils.tables import format_rate, markdown_table


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """Reads a ``generations.jsonl`` written by the evaluator (one JSON object per line)."""
    p = Path(path)
    if not p.is_file():
        raise bad_file(
            p,
            "missing; expected the evaluator's generations.jsonl (delete the result.json beside it "
            "to evaluate that variant again)",
        )
    # The data sources' JSON Lines reader: same errors for a bad line as any data file.
    return read_jsonl(p)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary raters; ``None`` when undefined (no items, or both constant and equal).

    ``(p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e`` the agreement
    expected from the two raters' marginal rates.
    """
    if len(a) != len(b):
        raise bad_value("b", f"{len(b)} verdicts", f"as many as a ({len(a)})")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    expected = pa * pb + (1 - pa) * (1 - pb)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def pairwise_agreement(verdicts: Mapping[str, Sequence[Mapping[str, Any] | None]]) -> list[dict[str, Any]]:
    """Agreement of every pair of judges on the prompts both judged.

    Returns:
        Rows ``{"judge_a", "judge_b", "n", "agreement", "kappa"}``; ``agreement`` in percent
        (``None`` when ``n`` is 0), ``kappa`` as :func:`cohen_kappa`.
    """
    out = []
    for x, y in combinations(verdicts, 2):
        pairs = [
            (bool(u["harmful"]), bool(v["harmful"]))
            for u, v in zip(verdicts[x], verdicts[y])
            if u is not None and v is not None
        ]
        n = len(pairs)
        agree = 100.0 * sum(u == v for u, v in pairs) / n if n else None
        kappa = cohen_kappa([u for u, _ in pairs], [v for _, v in pairs])
        out.append({"judge_a": x, "judge_b": y, "n": n, "agreement": agree, "kappa": kappa})
    return out


def judge_summary(verdicts: Mapping[str, Sequence[Mapping[str, Any] | None]]) -> list[dict[str, Any]]:
    """Per judge: HS with n, the coherent rate of its judged responses and HS among coherent ones.

    Returns:
        Rows ``{"judge", "n", "harmful_score", "coherent_rate", "n_coherent",
        "harmful_score_coherent"}``, rates in percent (``None`` when undefined).
    """
    coherent = coherence_flags(verdicts)
    out = []
    for name, vs in verdicts.items():
        judged = [(bool(v["harmful"]), c) for v, c in zip(vs, coherent) if v is not None]
        n = len(judged)
        n_coherent = sum(c for _, c in judged)
        harmful_coherent = sum(h for h, c in judged if c)
        out.append(
            {
                "judge": name,
                "n": n,
                "harmful_score": 100.0 * sum(h for h, _ in judged) / n if n else None,
                "coherent_rate": 100.0 * n_coherent / n if n else None,
                "n_coherent": n_coherent,
                "harmful_score_coherent": 100.0 * harmful_coherent / n_coherent if n_coherent else None,
            }
        )
    return out


def agreement_markdown(rows: Iterable[Mapping[str, Any]], primary: str = PRIMARY) -> str:
    """The report's judge-agreement section: per-judge HS beside coherence, then every pair.

    Args:
        rows: Generation rows of one evaluation (or several, concatenated, to pool them).
        primary: Name for the primary judge's column.

    Returns:
        A markdown section; with a single judge the pairwise table says so.
    """
    verdicts = judge_verdicts(rows, primary)
    summary = [
        [
            s["judge"],
            s["n"],
            format_rate(s["harmful_score"], s["n"]),
            format_rate(s["coherent_rate"], s["n"]),
            format_rate(s["harmful_score_coherent"], s["n_coherent"]),
        ]
        for s in judge_summary(verdicts)
    ]
    text = "## Judge agreement\n\n" + markdown_table(
        ["judge", "n", "HS %", "coherent %", "HS % of coherent answers"], summary
    )
    pairs = pairwise_agreement(verdicts)
    if not pairs:
        return text + "\nOne judge only: no pairwise agreement.\n"
    body = [
        [
            p["judge_a"],
            p["judge_b"],
            p["n"],
            "n/a" if p["agreement"] is None else f"{p['agreement']:.1f}",
            "n/a" if p["kappa"] is None else f"{p['kappa']:.2f}",
        ]
        for p in pairs
    ]
    return text + "\n" + markdown_table(["judge A", "judge B", "n", "agreement %", "Cohen's kappa"], body)
