"""Two finished multi-seed runs of one pipeline compared cell by cell (e.g. fp32 against bf16).

Issue #26 makes bf16 a world's default only if every reported cell of the bf16 run agrees with the
fp32 run's over the same seeds. A *cell* is one figure of the report: every metric of every variant
in the all-cells table (HS under each judge, FA, coherent rate), every re-attack point (HS and FA),
and the knob each seed's validation split chose per method and FA budget (the leaderboard's input).

Agreement rule (one, for every rate): each run's mean lies inside the other run's interval, where a
cell's interval is the one the report shows (mean ± std over seeds) widened to at least the 95% Wilson
interval over one seed's items. The widening is there because a cell whose seeds all share one model
(the aligned stage) has std 0, yet the same model judged on another draw of its 80 prompts would move
by the Wilson width: that is the variation a user meets. Per-seed differences (same seed, same data,
only the compared setting changed) are kept beside, so a shift in one direction shows even where
every cell agrees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from antidote_pl.errors import bad_value
from antidote_pl.experiment.report import format_knob
from antidote_pl.experiment.seeds import COUNT_KEYS
from antidote_pl.utils.files import read_json_file
from antidote_pl.utils.intervals import rate_interval
from antidote_pl.utils.io import atomic_write_json, atomic_write_text, save_png
from antidote_pl.utils.tables import format_over_seeds, markdown_table, mean_std

#: The rates of the all-cells table besides the judges' HS columns.
TASK_METRICS = ("finetune_accuracy", "coherent_rate")


def load_run(run: str | Path, field: str) -> dict[str, Any]:
    """A multi-seed run's ``report.json`` (``<run>/report.json``), refused with ``field`` named when
    the directory holds no across-seed report."""
    path = Path(run) / "report.json"
    if not path.is_file():
        raise bad_value(field, str(run), "a multi-seed pipeline's output_dir (holding report.json)")
    report = read_json_file(path)
    if not isinstance(report, dict) or "rows" not in report or "seeds" not in report:
        raise bad_value(
            field, str(run), "a multi-seed run's output_dir (its report.json has no rows and seeds)"
        )
    return report


def user_interval(mean: float, std: float | None, count: int | None) -> tuple[float, float]:
    """``mean ± std`` widened to at least the 95% Wilson interval over ``count`` items (module doc),
    within [0, 100]."""
    low, high = mean - (std or 0.0), mean + (std or 0.0)
    wilson = rate_interval(mean, count)
    if wilson is not None:
        low, high = min(low, wilson[0]), max(high, wilson[1])
    return max(low, 0.0), min(high, 100.0)  # rates: the spread cannot leave [0, 100]


def compare_cell(
    base: Sequence[float], other: Sequence[float], count: int | None, **where: Any
) -> dict[str, Any]:
    """One cell of both runs: means, stds, intervals, per-seed differences (other - base), agreement.

    Args:
        base: The base run's per-seed values (percent), in seed order.
        other: The other run's values for the same seeds, in the same order.
        count: Items behind one seed's value (prompts or questions), for the Wilson widening.
        **where: What the cell is (table, variant, metric...), copied into the result.
    """
    if len(base) != len(other) or not base:
        raise bad_value("values", f"{len(base)} vs {len(other)}", "the same seeds in both runs")
    (m0, s0), (m1, s1) = mean_std(base), mean_std(other)
    i0, i1 = user_interval(m0, s0, count), user_interval(m1, s1, count)
    agrees = i1[0] <= m0 <= i1[1] and i0[0] <= m1 <= i0[1]
    diffs = [b - a for a, b in zip(base, other, strict=True)]
    return {
        **where,
        "count": count,
        "base": {"mean": m0, "std": s0, "interval": list(i0), "values": list(base)},
        "other": {"mean": m1, "std": s1, "interval": list(i1), "values": list(other)},
        "differences": diffs,
        "mean_difference": m1 - m0,
        "agrees": agrees,
    }


def _rate_metrics(row: Mapping[str, Any]) -> list[str]:
    """The rates a row carries per seed: every judge's HS, then FA and the coherent rate."""
    judges = sorted(
        k[: -len("_values")] for k in row if k.startswith("harmful_score") and k.endswith("_values")
    )
    return [*judges, *(m for m in TASK_METRICS if f"{m}_values" in row)]


def _row_key(row: Mapping[str, Any]) -> str:
    """A row's name: the method, then its knob setting where it has one (``wanda 0.05``)."""
    knob = format_knob(dict(row))
    return row["method"] if knob == "-" or row["method"] == "none" else f"{row['method']} {knob}"


def compare_rows(base: Mapping[str, Any], other: Mapping[str, Any]) -> tuple[list[dict], list[str]]:
    """Every (variant, rate) cell of the all-cells tables, and the variants only one run has."""
    others = {_row_key(r): r for r in other["rows"]}
    cells, unmatched = [], []
    for row in base["rows"]:
        match = others.pop(_row_key(row), None)
        if match is None:
            unmatched.append(_row_key(row))
            continue
        for metric in _rate_metrics(row):
            values0, values1 = row.get(f"{metric}_values") or [], match.get(f"{metric}_values") or []
            if not values0 or len(values0) != len(values1):
                continue
            count = row.get(COUNT_KEYS.get(metric.split("/")[0], ""))
            cells.append(
                compare_cell(values0, values1, count, table="cells", variant=_row_key(row), metric=metric)
            )
    return cells, unmatched + list(others)


def _reattack_points(report: Mapping[str, Any]) -> dict[tuple[str, int], dict[str, Mapping[str, Any]]]:
    """Every re-attack point per (variant, step), by seed."""
    points: dict[tuple[str, int], dict[str, Mapping[str, Any]]] = {}
    for seed, analysis in (report.get("analysis") or {}).items():
        for variant, curve in ((analysis or {}).get("reattack") or {}).items():
            for point in curve:
                points.setdefault((variant, point["step"]), {})[str(seed)] = point
    return points


def compare_reattack(base: Mapping[str, Any], other: Mapping[str, Any]) -> tuple[list[dict], list[str]]:
    """Every re-attack (variant, step, HS or FA) cell over the seeds both runs have it for, and the
    points one run lacks (a repair whose chosen setting differs between the runs)."""
    points0, points1 = _reattack_points(base), _reattack_points(other)
    cells, unmatched = [], []
    for (variant, step), by_seed in sorted(points0.items()):
        seeds = sorted(set(by_seed) & set(points1.get((variant, step), {})))
        if not seeds:
            unmatched.append(f"{variant} +{step}")
            continue
        for metric in ("harmful_score", "finetune_accuracy"):
            values0 = [by_seed[s].get(metric) for s in seeds]
            values1 = [points1[(variant, step)][s].get(metric) for s in seeds]
            if None in values0 or None in values1:
                continue
            count = by_seed[seeds[0]].get(f"n_{metric}")
            where = {"table": "reattack", "variant": f"{variant} +{step}", "metric": metric, "seeds": seeds}
            cells.append(compare_cell(values0, values1, count, **where))
    unmatched += [f"{v} +{s}" for (v, s) in points1 if (v, s) not in points0]
    return cells, unmatched


def compare_choices(base: Mapping[str, Any], other: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per method and FA budget, the knob each seed chose in both runs (``None``: nothing qualified)."""
    others = {(r["method"], r["fa_budget"]): r for r in (other.get("leaderboard") or {}).get("rows", [])}
    out = []
    for row in (base.get("leaderboard") or {}).get("rows", []):
        match = others.get((row["method"], row["fa_budget"]))
        if match is None:
            continue
        seeds = sorted(set(row["values"]) & set(match["values"]), key=str)
        pairs = [(row["values"][s], match["values"][s]) for s in seeds]
        out.append(
            {
                "method": row["method"],
                "fa_budget": row["fa_budget"],
                "seeds": seeds,
                "base": [a for a, _ in pairs],
                "other": [b for _, b in pairs],
                "same": sum(a == b for a, b in pairs),
            }
        )
    return out


def compare_runs(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """Both runs' every cell (:func:`compare_rows`, :func:`compare_reattack`), the knob choices
    (:func:`compare_choices`) and the summary; refused when the runs' seeds differ."""
    if list(base["seeds"]) != list(other["seeds"]):
        raise bad_value("seeds", f"{base['seeds']} vs {other['seeds']}", "the same seeds in both runs")
    cells, only_cells = compare_rows(base, other)
    reattack, only_reattack = compare_reattack(base, other)
    choices = compare_choices(base, other)
    every = cells + reattack
    return {
        "seeds": list(base["seeds"]),
        "primary_judge": base.get("primary_judge"),
        "cells": cells,
        "reattack": reattack,
        "choices": choices,
        "unmatched": {"cells": only_cells, "reattack": only_reattack},
        "agree": sum(c["agrees"] for c in every),
        "total": len(every),
        "same_choices": sum(c["same"] for c in choices),
        "total_choices": sum(len(c["seeds"]) for c in choices),
        # The all-cells table only: a re-attack's step 0 repeats its variant's row there.
        "direction": direction(cells),
    }


def sign_test_p(higher: int, lower: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven with no shift."""
    n = higher + lower
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(higher, lower) + 1)) / 2**n
    return min(1.0, 2 * tail)


def direction(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per metric: how many cells the other run puts higher or lower, the mean shift, a sign test and
    the mean shift within each seed (over the cells every seed has).

    Cells share seeds and adapters, so they are not independent draws: the sign test describes the
    split, and the per-seed shifts show whether it holds in every seed.
    """
    out = []
    for metric in dict.fromkeys(c["metric"] for c in cells):
        chosen = [c for c in cells if c["metric"] == metric]
        shifts = [c["mean_difference"] for c in chosen]
        higher, lower = sum(d > 0 for d in shifts), sum(d < 0 for d in shifts)
        seeds = max(len(c["differences"]) for c in chosen)
        full = [c["differences"] for c in chosen if len(c["differences"]) == seeds]
        out.append(
            {
                "metric": metric,
                "cells": len(shifts),
                "higher": higher,
                "lower": lower,
                "equal": len(shifts) - higher - lower,
                "mean_shift": mean_std(shifts)[0],
                "sign_test_p": sign_test_p(higher, lower),
                "shift_per_seed": [mean_std([d[i] for d in full])[0] for i in range(seeds)],
            }
        )
    return out


def metric_name(metric: str, primary: str | None) -> str:
    """A rate's column name: ``HS <judge>``, ``FA`` or ``coherent``."""
    if metric.startswith("harmful_score"):
        judge = metric.partition("/")[2] or primary or "primary judge"
        return f"HS {judge}"
    return {"finetune_accuracy": "FA", "coherent_rate": "coherent"}.get(metric, metric)


def _side(cell: Mapping[str, Any], side: str) -> str:
    return format_over_seeds(cell[side]["values"], cell["count"])


def _pair(cell: Mapping[str, Any] | None) -> str:
    """``base / other`` of a cell, marked ``✗`` when they disagree."""
    if cell is None:
        return "-"
    mark = "" if cell["agrees"] else " ✗"
    return f"{_side(cell, 'base')} / {_side(cell, 'other')}{mark}"


def _wide_table(cells: Sequence[Mapping[str, Any]], primary: str | None) -> str:
    """One row per variant, one ``base / other`` column per rate."""
    metrics = list(dict.fromkeys(c["metric"] for c in cells))
    by_variant: dict[str, dict[str, Mapping[str, Any]]] = {}
    for cell in cells:
        by_variant.setdefault(cell["variant"], {})[cell["metric"]] = cell
    headers = ["variant", *(metric_name(m, primary) for m in metrics)]
    body = [[variant, *(_pair(found.get(m)) for m in metrics)] for variant, found in by_variant.items()]
    return markdown_table(headers, body)


def _direction_table(result: Mapping[str, Any], labels: Sequence[str]) -> str:
    body = [
        [
            metric_name(d["metric"], result["primary_judge"]),
            d["cells"],
            d["higher"],
            d["lower"],
            d["equal"],
            f"{d['mean_shift']:+.2f}",
            f"{d['sign_test_p']:.3f}",
            ", ".join(f"{x:+.2f}" for x in d["shift_per_seed"]),
        ]
        for d in result["direction"]
    ]
    headers = ["rate", "cells", f"{labels[1]} higher", f"{labels[1]} lower", "equal", "mean shift (points)"]
    return markdown_table([*headers, "sign test p", "mean shift per seed"], body)


def _knob(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _choices_table(result: Mapping[str, Any], labels: Sequence[str]) -> str:
    body = [
        [
            c["method"],
            f"{c['fa_budget']:g}",
            ", ".join(_knob(v) for v in c["base"]),
            ", ".join(_knob(v) for v in c["other"]),
            f"{c['same']} of {len(c['seeds'])}",
        ]
        for c in result["choices"]
    ]
    return markdown_table(
        ["method", "FA budget", f"{labels[0]} per seed", f"{labels[1]} per seed", "same"], body
    )


def _verdict(result: Mapping[str, Any], labels: Sequence[str]) -> str:
    agree, total = result["agree"], result["total"]
    every = "**yes**" if agree == total and total else "**no**"
    lines = [
        f"* Every cell agrees (each mean inside the other's interval): {every}, {agree} of {total} "
        f"(all-cells table {sum(c['agrees'] for c in result['cells'])} of {len(result['cells'])}, "
        f"re-attack {sum(c['agrees'] for c in result['reattack'])} of {len(result['reattack'])}).",
        f"* Knob chosen by each seed's validation split: the same in {result['same_choices']} of "
        f"{result['total_choices']} (method, FA budget, seed) choices.",
    ]
    for key, what in (("cells", "variants"), ("reattack", "re-attack points")):
        if result["unmatched"][key]:
            lines.append(f"* {what} in one run only: {', '.join(result['unmatched'][key])}.")
    return "\n".join(lines) + "\n"


def comparison_markdown(result: Mapping[str, Any], labels: Sequence[str], command: str, plot: str) -> str:
    """The comparison as markdown: verdict, direction, every cell, the knob choices, the figure."""
    seeds = ", ".join(str(s) for s in result["seeds"])
    primary = result["primary_judge"]
    wrong = [c for c in result["cells"] + result["reattack"] if not c["agrees"]]
    parts = [
        f"# {labels[0]} against {labels[1]}, cell by cell\n\n"
        f"Generated by `{command}`; do not edit by hand.\n\n"
        f"Seeds {seeds} ({len(result['seeds'])}), paired: the same seed in both runs. A cell shows "
        f"`{labels[0]} / {labels[1]}`, each mean ± std over seeds (one seed: its 95% Wilson interval); "
        "✗ marks a cell where a mean lies outside the other run's interval (mean ± std widened to at "
        "least one seed's 95% Wilson interval over its items, `antidote_pl.experiment.compare`).\n",
        _verdict(result, labels),
        "## Direction\n\nPer rate, over the all-cells table (a re-attack's step 0 repeats its row): how "
        "often the second run is higher or lower, the mean shift in points, a two-sided sign test and "
        "the mean shift within each seed. A shift in one direction shows here even when every cell "
        "agrees; the cells share seeds and adapters, so they are no independent draws: the sign test "
        "describes the split, the per-seed shifts say whether it holds in every seed.\n\n"
        + _direction_table(result, labels),
    ]
    if wrong:
        rows = [[c["table"], c["variant"], metric_name(c["metric"], primary), _pair(c)] for c in wrong]
        parts.append(
            "## Cells that disagree\n\n" + markdown_table(["table", "variant", "rate", "cell"], rows)
        )
    parts += [
        "## Every cell\n\n" + _wide_table(result["cells"], primary),
        "## Re-attack\n\nHS and FA after the given number of further attack steps, over the seeds "
        "where both runs re-attacked that variant.\n\n" + _wide_table(result["reattack"], primary),
        "## Knob choices\n\n" + _choices_table(result, labels),
        f"![{labels[0]} against {labels[1]}]({plot})\n",
    ]
    return "\n".join(parts)


def plot_comparison(result: Mapping[str, Any], labels: Sequence[str], path: Path) -> None:
    """Second run's mean against the first's per cell, with both intervals, HS and task rates apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    every = result["cells"] + result["reattack"]
    for ax, hs in zip(axes, (True, False), strict=True):
        chosen = [c for c in every if c["metric"].startswith("harmful_score") == hs]
        for agrees, colour in ((True, "tab:blue"), (False, "tab:red")):
            group = [c for c in chosen if c["agrees"] == agrees]
            if not group:
                continue
            x = [c["base"]["mean"] for c in group]
            y = [c["other"]["mean"] for c in group]
            xerr = [
                [c["base"]["mean"] - c["base"]["interval"][0] for c in group],
                [c["base"]["interval"][1] - c["base"]["mean"] for c in group],
            ]
            yerr = [
                [c["other"]["mean"] - c["other"]["interval"][0] for c in group],
                [c["other"]["interval"][1] - c["other"]["mean"] for c in group],
            ]
            label = "agrees" if agrees else "disagrees"
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=3, alpha=0.6, color=colour, label=label)
        ax.plot([0, 100], [0, 100], color="grey", lw=0.8)
        ax.set_xlabel(f"{labels[0]} (%)")
        ax.set_ylabel(f"{labels[1]} (%)")
        ax.set_title("HS, every judge" if hs else "FA and coherent rate")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    fig.suptitle(f"Per cell, seeds {', '.join(str(s) for s in result['seeds'])}: mean, bars = interval")
    save_png(fig, path)


def write_comparison(
    base_run: str | Path, other_run: str | Path, out: str | Path, labels: Sequence[str], command: str
) -> Path:
    """Compares two runs and writes ``out`` (markdown), its ``.json`` and ``.png`` beside it."""
    if len(labels) != 2 or len(set(labels)) != 2:
        raise bad_value("labels", list(labels), "two different names, the base run's first")
    result = compare_runs(load_run(base_run, "base"), load_run(other_run, "other"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_suffix(".png")
    atomic_write_json(
        out.with_suffix(".json"),
        {"labels": list(labels), "base": str(base_run), "other": str(other_run), **result},
    )
    atomic_write_text(out, comparison_markdown(result, labels, command, plot.name))
    plot_comparison(result, labels, plot)
    return out
