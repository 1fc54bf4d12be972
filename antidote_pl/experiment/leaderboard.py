"""The repair leaderboard: which repair, at which setting, for what FA loss, and does it last.

One row per repair method and FA budget, over every seed of a run: the knob each seed's *validation*
split chose under the budget (:mod:`antidote_pl.experiment.budget`), that setting's *test* HS under the
primary judge and every extra judge, its test FA and coherent rate, and its HS after ``reattack_step``
more steps of the attack (the re-attack from the budget's choice, when the run did one). A seed where
no setting stays within the budget contributes nothing to the figures and is counted in "within
budget".

Methods are ranked by mean HS under the primary judge (seeds within budget only; a method with none
ranks last). The rank is recomputed under each extra judge, and a method whose rank changes is marked:
a conclusion about it holds only where the judges agree.

Cells are ``mean ± std`` over the seeds within budget, or, for one seed, the value with its 95%
Wilson interval over that seed's prompts/questions (:func:`antidote_pl.utils.intervals.rate_interval`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from antidote_pl.experiment.budget import DEFAULT_BUDGETS
from antidote_pl.experiment.sections import variant_name
from antidote_pl.utils.intervals import rate_interval
from antidote_pl.utils.tables import format_pm, markdown_table, mean_std

#: Attack steps after the repair whose HS the leaderboard reports (the issue's "10 more steps").
REATTACK_STEP = 10
HS = "harmful_score"


def _row(report: Mapping[str, Any], method: str, value: float) -> Mapping[str, Any] | None:
    """The report row of ``method`` at knob ``value`` (not a reference row)."""
    for row in report["rows"]:
        if row.get("method") == method and row.get("alpha") == value and not row.get("reference"):
            return row
    return None


def _choice(report: Mapping[str, Any], method: str, budget: float) -> Mapping[str, Any] | None:
    """The seed's budget selection for ``method`` (``None`` when the run made none)."""
    for s in report.get("analysis", {}).get("fa_budget") or []:
        if s["method"] == method and s["fa_budget"] == budget:
            return s
    return None


def _reattack_hs(report: Mapping[str, Any], method: str, value: float, step: int) -> tuple | None:
    """``(HS, n)`` at ``step`` of the re-attack from ``method`` at ``value``, if the run did it."""
    curve = (report.get("analysis", {}).get("reattack") or {}).get(variant_name(method, value)) or []
    for point in curve:
        if point.get("step") == step:
            return point[HS], point.get(f"n_{HS}")
    return None


def judges_of(report: Mapping[str, Any]) -> list[str]:
    """Extra judges' names, as in the rows' ``harmful_score/<judge>`` keys (sorted)."""
    return sorted({k.split("/", 1)[1] for r in report["rows"] for k in r if k.startswith(f"{HS}/")})


def _seed_entry(report, method: str, budget: float, judges: Sequence[str], step: int) -> dict | None:
    """One seed's figures for (method, budget), or ``None`` when no setting is within budget."""
    choice = _choice(report, method, budget)
    if choice is None or choice.get("alpha") is None:
        return None
    value = choice["alpha"]
    row = _row(report, method, value) or {}
    entry = {
        "value": value,
        "knob": row.get("knob", "alpha"),
        HS: (row.get(HS), row.get(f"n_{HS}")),
        "finetune_accuracy": (row.get("finetune_accuracy"), row.get("n_finetune_accuracy")),
        "coherent_rate": (row.get("coherent_rate"), row.get("n_coherent_rate")),
        "reattack": _reattack_hs(report, method, value, step),
    }
    for judge in judges:
        entry[f"{HS}/{judge}"] = (row.get(f"{HS}/{judge}"), row.get(f"n_{HS}/{judge}"))
    return entry


def summarise(pairs: Sequence[tuple[float | None, int | None] | None]) -> dict[str, Any] | None:
    """Mean, std and count over seeds of ``(value, n)`` pairs (``None`` pairs and values skipped)."""
    got = [p for p in pairs if p is not None and p[0] is not None]
    if not got:
        return None
    mean, std = mean_std([float(v) for v, _ in got])
    return {"mean": mean, "std": std, "n_seeds": len(got), "n": got[0][1] if len(got) == 1 else None}


def format_summary(cell: Mapping[str, Any] | None) -> str:
    """``mean ± std`` over seeds; one seed: the value and its Wilson interval; none: ``-``."""
    if cell is None:
        return "-"
    if cell["n_seeds"] > 1:
        return format_pm(cell["mean"], cell["std"])
    interval = rate_interval(cell["mean"], cell["n"])
    if interval is None:
        return f"{cell['mean']:.1f} (1 seed)"
    return f"{cell['mean']:.1f} [{interval[0]:.1f}, {interval[1]:.1f}]"


def leaderboard(
    reports: Mapping[Any, Mapping[str, Any]],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    step: int = REATTACK_STEP,
) -> dict[str, Any]:
    """The leaderboard of a run's seeds (see the module docstring).

    Args:
        reports: Seed -> that seed's pipeline report (``report.json``: rows, methods, analysis).
        budgets: FA budgets in points.
        step: Re-attack step whose HS is reported.

    Returns:
        ``{"judges", "budgets", "step", "rows"}``; each row: ``method``, ``fa_budget``, ``knob``,
        ``seeds_within`` / ``seeds``, ``values`` (the chosen knob per seed, ``None`` outside budget),
        summaries (mean/std/n_seeds) of HS per judge, FA, coherent rate and re-attack HS, ``rank``
        and ``rank/<judge>``, and ``standing_changes`` (the judges under which the rank differs).
    """
    first = next(iter(reports.values()))
    judges = judges_of(first)
    rows = []
    for budget in budgets:
        block = [_method_row(reports, m, budget, judges, step) for m in first["methods"]]
        _rank(block, judges)
        rows.extend(block)
    return {"judges": judges, "budgets": list(budgets), "step": step, "rows": rows}


def _method_row(reports, method: str, budget: float, judges: Sequence[str], step: int) -> dict[str, Any]:
    entries = {seed: _seed_entry(r, method, budget, judges, step) for seed, r in reports.items()}
    within = [e for e in entries.values() if e is not None]
    row = {
        "method": method,
        "fa_budget": budget,
        "knob": within[0]["knob"] if within else None,
        "seeds": len(entries),
        "seeds_within": len(within),
        "values": {str(s): (e["value"] if e else None) for s, e in entries.items()},
    }
    keys = [HS, *(f"{HS}/{j}" for j in judges), "finetune_accuracy", "coherent_rate", "reattack"]
    for key in keys:
        row[key] = summarise([e[key] for e in within])
    return row


def _rank(block: list[dict[str, Any]], judges: Sequence[str]) -> None:
    """Ranks a budget's rows by mean HS per judge (1 = lowest; ties share a rank, as in 1, 1, 3)
    and lists, per row, the judges under which its rank differs from the primary judge's."""
    for key, name in [(HS, "rank"), *((f"{HS}/{j}", f"rank/{j}") for j in judges)]:
        means = [r[key]["mean"] for r in block if r[key] is not None]
        for row in block:
            cell = row[key]
            row[name] = None if cell is None else 1 + sum(m < cell["mean"] for m in means)
    for row in block:
        row["standing_changes"] = [j for j in judges if row[f"rank/{j}"] != row["rank"]]


def leaderboard_markdown(board: Mapping[str, Any], primary: str = "primary judge") -> str:
    """The leaderboard section: one table per FA budget, ranked by HS under the primary judge."""
    judges, step = board["judges"], board["step"]
    parts = [
        "## Repair leaderboard\n",
        "Per repair method and FA budget: the knob each seed's validation split chose (the strongest "
        "setting whose validation FA drop stays within the budget), that setting's test HS under "
        f"the {primary} (rank) and the other judges, test FA, coherent rate, and HS after {step} more "
        "attack steps from it. Cells: mean ± std over the seeds within budget, or one seed's value "
        "with its 95% Wilson interval. † marks a method whose rank changes under another judge: "
        "conclusions about it hold only where the judges agree.\n",
    ]
    headers = ["rank", "method", "knob chosen (per seed)", "seeds within budget", f"HS % ({primary})"]
    headers += [f"HS % ({j})" for j in judges] + ["FA %", "coherent %", f"HS % after +{step} steps"]
    for budget in board["budgets"]:
        table = []
        for row in sorted((r for r in board["rows"] if r["fa_budget"] == budget), key=_order):
            mark = " †" if row["standing_changes"] else ""
            values = ", ".join("-" if v is None else f"{v:g}" for v in row["values"].values())
            knob = f"{row['knob']}: {values}" if row["knob"] else values
            cells = [format_summary(row[HS]), *(format_summary(row[f"{HS}/{j}"]) for j in judges)]
            cells += [format_summary(row[k]) for k in ("finetune_accuracy", "coherent_rate", "reattack")]
            rank = "-" if row["rank"] is None else str(row["rank"])
            within = f"{row['seeds_within']} of {row['seeds']}"
            table.append([rank, row["method"] + mark, knob, within, *cells])
        parts.append(f"### FA budget {budget:g} points\n\n" + markdown_table(headers, table))
    return "\n".join(parts)


def _order(row: Mapping[str, Any]) -> tuple:
    return (row["rank"] is None, row["rank"] or 0, row["method"])
