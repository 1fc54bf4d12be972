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

**Intervals are clustered by prompt.** Pooled over variants (and seeds), one prompt is judged many
times, and its answers (and the judges' disagreements on them) go together: treating the
prompts x variants as independent items made the intervals far too narrow. Every interval here is
:func:`~antidote_pl.utils.intervals.clustered_rate_interval` over the prompts (:func:`prompt_keys`):
the Wilson interval over an effective count, the items divided by the design effect of the
clustering (ratio-estimator variance over the prompts against the independent-items variance; at
a rate of 0 or 100%, the items of one prompt count as one). Rows of a single variant, one per
prompt, get exactly the plain Wilson interval.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from antidote_pl.data.sources import read_jsonl
from antidote_pl.errors import bad_file, bad_value
from antidote_pl.judges.verdicts import PRIMARY, coherence_flags, judge_verdicts
from antidote_pl.utils.intervals import clustered_rate_interval
from antidote_pl.utils.tables import markdown_table


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


def prompt_keys(rows: Iterable[Mapping[str, Any]]) -> list[Any]:
    """The prompt of each harmful row, aligned with :func:`judge_verdicts`: its instruction and input
    text (the same prompt in every variant and seed), else its ``index``, else its position."""
    harmful = [r for r in rows if r.get("kind") == "harmful"]
    return [
        ("text", r["instruction"], r.get("input"))
        if "instruction" in r
        else ("index", r["index"])
        if "index" in r
        else ("row", i)
        for i, r in enumerate(harmful)
    ]


def clustered_rate(flags: Sequence[bool], clusters: Sequence[Any] | None = None) -> dict[str, Any]:
    """A pooled rate of ``flags`` (percent) with its prompt-clustered 95% interval.

    Args:
        flags: One outcome per item.
        clusters: The cluster (prompt) of each item; ``None``: every item its own.

    Returns:
        ``{"rate", "low", "high", "design_effect", "n", "n_clusters"}`` (figures ``None`` for no
        items).
    """
    clusters = list(range(len(flags))) if clusters is None else list(clusters)
    if len(clusters) != len(flags):
        raise bad_value("clusters", f"{len(clusters)} keys", f"one per outcome ({len(flags)})")
    by_cluster: dict[Any, list[int]] = {}
    for flag, key in zip(flags, clusters):
        cell = by_cluster.setdefault(key, [0, 0])
        cell[0] += bool(flag)
        cell[1] += 1
    out: dict[str, Any] = {"n": len(flags), "n_clusters": len(by_cluster)}
    if not flags:
        return out | dict.fromkeys(("rate", "low", "high", "design_effect"))
    cells = list(by_cluster.values())
    low, high, deff = clustered_rate_interval([c[0] for c in cells], [c[1] for c in cells])
    return out | {
        "rate": 100.0 * sum(map(bool, flags)) / len(flags),
        "low": low,
        "high": high,
        "design_effect": deff,
    }


def _cell(rate: Mapping[str, Any]) -> str:
    """``rate (low-high)``, the look of :func:`~antidote_pl.utils.tables.format_rate`."""
    if rate["rate"] is None:
        return "n/a"
    return f"{rate['rate']:.1f} ({rate['low']:.1f}-{rate['high']:.1f})"


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


def pairwise_agreement(
    verdicts: Mapping[str, Sequence[Mapping[str, Any] | None]], clusters: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Agreement of every pair of judges on the prompts both judged.

    Args:
        verdicts: As :func:`judge_verdicts` returns them.
        clusters: The prompt of each item (:func:`prompt_keys`), for the interval; ``None``: every
            item its own prompt.

    Returns:
        Rows ``{"judge_a", "judge_b", "n", "agreement", "kappa", "agreement_low",
        "agreement_high", "design_effect", "n_prompts"}``; ``agreement`` and its 95% interval
        clustered by prompt in percent (``None`` when ``n`` is 0), ``kappa`` as :func:`cohen_kappa`.
    """
    n_items = len(next(iter(verdicts.values()), []))
    keys = list(range(n_items)) if clusters is None else list(clusters)
    out = []
    for x, y in combinations(verdicts, 2):
        both = [
            i for i, (u, v) in enumerate(zip(verdicts[x], verdicts[y])) if u is not None and v is not None
        ]
        pairs = [(bool(verdicts[x][i]["harmful"]), bool(verdicts[y][i]["harmful"])) for i in both]
        rate = clustered_rate([u == v for u, v in pairs], [keys[i] for i in both])
        kappa = cohen_kappa([u for u, _ in pairs], [v for _, v in pairs])
        out.append(
            {
                "judge_a": x,
                "judge_b": y,
                "n": len(pairs),
                "agreement": rate["rate"],
                "kappa": kappa,
                "agreement_low": rate["low"],
                "agreement_high": rate["high"],
                "design_effect": rate["design_effect"],
                "n_prompts": rate["n_clusters"],
            }
        )
    return out


def judge_summary(
    verdicts: Mapping[str, Sequence[Mapping[str, Any] | None]], clusters: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Per judge: HS with n, the coherent rate of its judged responses and HS among coherent ones.

    Args:
        verdicts: As :func:`judge_verdicts` returns them.
        clusters: The prompt of each item (:func:`prompt_keys`), for the intervals; ``None``: every
            item its own prompt.

    Returns:
        Rows ``{"judge", "n", "harmful_score", "coherent_rate", "n_coherent",
        "harmful_score_coherent"}``, rates in percent (``None`` when undefined), and per rate its
        prompt-clustered 95% interval (``<rate>_interval``: :func:`clustered_rate`).
    """
    coherent = coherence_flags(verdicts)
    keys = list(range(len(coherent))) if clusters is None else list(clusters)
    out = []
    for name, vs in verdicts.items():
        judged = [(bool(v["harmful"]), c, k) for v, c, k in zip(vs, coherent, keys) if v is not None]
        n = len(judged)
        n_coherent = sum(c for _, c, _ in judged)
        harmful_coherent = sum(h for h, c, _ in judged if c)
        kept = [(h, k) for h, c, k in judged if c]
        out.append(
            {
                "judge": name,
                "n": n,
                "harmful_score": 100.0 * sum(h for h, _, _ in judged) / n if n else None,
                "coherent_rate": 100.0 * n_coherent / n if n else None,
                "n_coherent": n_coherent,
                "harmful_score_coherent": 100.0 * harmful_coherent / n_coherent if n_coherent else None,
                "harmful_score_interval": clustered_rate(
                    [h for h, _, _ in judged], [k for _, _, k in judged]
                ),
                "coherent_rate_interval": clustered_rate(
                    [c for _, c, _ in judged], [k for _, _, k in judged]
                ),
                "harmful_score_coherent_interval": clustered_rate([h for h, _ in kept], [k for _, k in kept]),
            }
        )
    return out


def agreement_markdown(rows: Iterable[Mapping[str, Any]], primary: str = PRIMARY) -> str:
    """The report's judge-agreement section: per-judge HS beside coherence, then every pair.

    Args:
        rows: Generation rows of one evaluation (or several, concatenated, to pool them).
        primary: Name for the primary judge's column.

    Returns:
        A markdown section; with a single judge the pairwise table says so. Intervals are 95%,
        clustered by prompt (module docstring).
    """
    rows = list(rows)
    verdicts, clusters = judge_verdicts(rows, primary), prompt_keys(rows)
    metrics = ("harmful_score", "coherent_rate", "harmful_score_coherent")
    summary = [
        [s["judge"], s["n"], *(_cell(s[f"{m}_interval"]) for m in metrics)]
        for s in judge_summary(verdicts, clusters)
    ]
    text = "## Judge agreement\n\n" + markdown_table(
        ["judge", "n", "HS %", "coherent %", "HS % of coherent answers"], summary
    )
    pairs = pairwise_agreement(verdicts, clusters)
    if not pairs:
        return text + "\nOne judge only: no pairwise agreement.\n"
    body = [
        [
            p["judge_a"],
            p["judge_b"],
            p["n"],
            "n/a" if p["agreement"] is None else f"{p['agreement']:.1f}",
            "n/a" if p["kappa"] is None else f"{p['kappa']:.2f}",
            p["n_prompts"],
            "n/a" if p["agreement"] is None else f"{p['agreement_low']:.1f}-{p['agreement_high']:.1f}",
        ]
        for p in pairs
    ]
    headers = ["judge A", "judge B", "n", "agreement %", "Cohen's kappa", "prompts", "agreement 95% CI"]
    note = (
        "\nIntervals: 95%, clustered by prompt (one prompt judged in many variants counts less than as "
        "many independent prompts; design-effect-widened Wilson interval).\n"
    )
    return text + "\n" + markdown_table(headers, body) + note
