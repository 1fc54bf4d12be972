"""The pipeline over several seeds, and a report that aggregates them (mean +- std per cell).

A pipeline YAML with ``seeds: [0, 1, 2]`` runs :func:`antidote_pl.experiment.pipeline.run_pipeline` once per
seed. Every ``{seed}`` in a stage's ``overrides``, in ``repair.overrides`` and in
``repair.method_overrides`` is replaced by the seed, so the config says exactly what a seed
changes, e.g.::

    seeds: [0, 1, 2]
    stages:
      - {name: aligned, config: configs/smol/align.yaml}          # no {seed}: shared by all seeds
      - name: finetuned
        config: configs/smol/finetune.yaml
        overrides: [--seed_everything={seed}, --data.init_args.seed={seed},
                    --model.init_args.output_dir=outputs/smol/seed{seed}/finetune]
    repair:
      overrides: [--data.init_args.seed={seed},
                  --model.init_args.adapter_path=outputs/smol/seed{seed}/finetune]
      method_overrides: {random: [--pruner.init_args.seed={seed}]}

``seed_everything`` seeds the LoRA initialisation (and dropout); the DataModule ``seed`` seeds the
harmful/task draw, the realignment set and the data order. A stage with no ``{seed}`` is trained
once and shared (the pipeline's cache finds it finished for the later seeds): say so in any report.

Each seed writes its own report to ``<output_dir>/seed<N>/``; this module writes
``<output_dir>/report.{md,json,png}`` with mean +- sample standard deviation over seeds per cell,
the number of prompts behind each per-seed figure, and the seeds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from antidote_pl.errors import bad_value
from antidote_pl.experiment.leaderboard import leaderboard, leaderboard_markdown
from antidote_pl.experiment.pipeline import run_pipeline
from antidote_pl.experiment.report import curve_style, extra_judge_names, format_knob, outside_legend
from antidote_pl.experiment.sections import seeds_analysis_markdown
from antidote_pl.experiment.specs import run_inputs
from antidote_pl.utils.intervals import cell_bounds, cell_distances
from antidote_pl.utils.io import (
    OUTPUT_MARKER,
    atomic_write_json,
    atomic_write_text,
    claim_output_dir,
    mark_output_dir,
    save_png,
)
from antidote_pl.utils.placeholders import SEED, fill_placeholders, placeholders_in
from antidote_pl.utils.tables import format_seed_cell, mean_std

PLACEHOLDER = "{" + SEED + "}"
#: Per-row figures aggregated over seeds (percentages, and the realised removed fraction).
METRICS = ("removed_fraction", "harmful_score", "finetune_accuracy", "coherent_rate")


def _with_seed(args: list[str], seed: int) -> list[str]:
    # Only {seed}: {model}, {task} and {variant} stay for the stage's parser to fill from run:.
    return fill_placeholders("overrides", list(args), {SEED: seed})


def _seeded(args: list[str]) -> bool:
    return any(SEED in placeholders_in(a) for a in args)


def _placeholders(stages, repair, baselines) -> list[str]:
    where = [f"stages[{i}].overrides" for i, s in enumerate(stages) if _seeded(s.overrides)]
    if _seeded(repair.overrides):
        where.append("repair.overrides")
    where += [f"repair.method_overrides.{m}" for m, a in repair.method_overrides.items() if _seeded(a)]
    for b, base in enumerate(baselines or []):
        where += [
            f"baselines[{b}].stages[{i}].overrides" for i, s in enumerate(base.stages) if _seeded(s.overrides)
        ]
    return where


def check_no_placeholder(stages, repair, baselines=None) -> None:
    """Refuses ``{seed}`` in overrides when no ``seeds`` are given (it would reach a path literally).

    Raises:
        ConfigError: naming the fields that hold the placeholder.
    """
    where = _placeholders(stages, repair, baselines)
    if where:
        raise bad_value("seeds", None, f"a list of seeds: {where} use {PLACEHOLDER}")


def seeded_specs(seed: int, stages, repair, baselines=None):
    """Copies of the stage, repair and baseline specs with ``{seed}`` replaced by ``seed``."""
    stages = [_replace(s, overrides=_with_seed(s.overrides, seed)) for s in stages]
    repair = _replace(
        repair,
        overrides=_with_seed(repair.overrides, seed),
        method_overrides={m: _with_seed(a, seed) for m, a in repair.method_overrides.items()},
    )
    baselines = [
        _replace(b, stages=[_replace(s, overrides=_with_seed(s.overrides, seed)) for s in b.stages])
        for b in baselines or []
    ]
    return stages, repair, baselines


def _replace(obj, **changes):
    return dataclasses.replace(obj, **changes)


def run_seeds(
    seeds: list[int],
    stages,
    repair,
    evaluation: str | list[str],
    output_dir: str,
    references: list[str] | None = None,
    force: bool = False,
    baselines=None,
    durability=None,
) -> dict[str, Any]:
    """Runs the pipeline once per seed (``<output_dir>/seed<N>``) and writes the aggregate report.

    Args:
        seeds: Distinct non-negative seeds.
        stages: As :func:`antidote_pl.experiment.pipeline.run_pipeline`, with ``{seed}`` placeholders.
        repair: Likewise.
        evaluation: Likewise.
        output_dir: Where the per-seed runs and the aggregate report go.
        references: Likewise.
        force: Likewise (applies to every seed).
        baselines: Likewise.
        durability: Likewise (the same re-attack for every seed).

    Returns:
        The aggregate report (also in ``<output_dir>/report.json``).

    Raises:
        ConfigError: on an empty or repeated seed list, when no override uses ``{seed}`` (every
            seed would then be the same run), or for an ``output_dir`` that may not be written (an
            unmarked non-empty directory, one another run is writing), before any work.
    """
    _check_seeds(seeds, stages, repair, baselines)
    # Like a single pipeline run: its own (marked) directory is resumed, any other non-empty one is
    # refused; held until the last seed's aggregate report is written.
    inputs = run_inputs(stages, repair, evaluation, baselines)
    _adopt_earlier_seeds_output(Path(output_dir))
    lock = claim_output_dir(output_dir, "output_dir", overwrite=True, inputs=inputs, replace=False)
    mark_output_dir(output_dir, "pipeline")
    out = Path(output_dir)
    shared = [s.name for s in stages if not _seeded(s.overrides)]
    reports: dict[int, dict[str, Any]] = {}
    try:
        for seed in seeds:
            if reports and not force:
                _reuse_shared_results(out / f"seed{seeds[0]}", out / f"seed{seed}", shared)
            s_stages, s_repair, s_baselines = seeded_specs(seed, stages, repair, baselines)
            run_dir = str(out / f"seed{seed}")
            run = (s_stages, s_repair, evaluation, run_dir, references, force, s_baselines, durability)
            reports[seed] = run_pipeline(*run)
            # Rewritten after every seed: an interrupted run still leaves the seeds it finished.
            write_aggregate_report(aggregate(reports, shared_stages=shared), out)
    finally:
        lock.release()
    return aggregate(reports, shared_stages=shared)


#: What a multi-seed output held before it carried a marker: per-seed runs and the aggregate report.
_EARLIER_SEEDS_OUTPUT = re.compile(r"seed\d+|report\.(md|json|png)|\..*")


def _adopt_earlier_seeds_output(out: Path) -> None:
    """Marks an unmarked multi-seed output written before the top directory got its marker.

    Only a directory holding nothing but ``seed<N>`` pipeline outputs (each with its marker), the
    aggregate ``report.*`` files and hidden temporaries is recognised; anything else stays unmarked
    and is refused by the output check.
    """
    if not out.is_dir() or (out / OUTPUT_MARKER).exists() or not any(out.iterdir()):
        return
    entries = list(out.iterdir())
    ours = all(_EARLIER_SEEDS_OUTPUT.fullmatch(e.name) for e in entries)
    seeds = [e for e in entries if e.name.startswith("seed")]
    if ours and seeds and all((e / OUTPUT_MARKER).is_file() for e in seeds):
        mark_output_dir(out, "pipeline")


def _check_seeds(seeds: list[int], stages, repair, baselines) -> None:
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise bad_value("seeds", seeds, "a non-empty list of distinct non-negative integers")
    if not _placeholders(stages, repair, baselines):
        raise bad_value("seeds", seeds, f"overrides that use {PLACEHOLDER} (otherwise every seed is one run)")


def _reuse_shared_results(first: Path, target: Path, shared: list[str]) -> None:
    """Offers the first seed's evaluations of shared stages to a later seed's result cache.

    A shared stage is the same model for every seed, and greedy evaluation is deterministic, so
    its result is not recomputed: the pipeline still checks each copied result's cache key (stage
    key + evaluation config) and recomputes any that does not match.
    """

    for name in shared:
        src = first / "results" / f"ref_{name}"
        dst = target / "results" / f"ref_{name}"
        if not (src / "result.json").is_file() or (dst / "result.json").is_file():
            continue
        # The seed's directory must carry the pipeline's marker before anything is put in it.
        mark_output_dir(target, "pipeline")
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                atomic_write_text(dst / f.name, f.read_text(encoding="utf-8"))


def aggregate(reports: dict[int, dict[str, Any]], shared_stages: list[str] | None = None) -> dict[str, Any]:
    """Combines per-seed reports into one row per (variant, alpha) with mean and std over seeds.

    Args:
        reports: Seed -> the report :func:`antidote_pl.experiment.pipeline.run_pipeline` returned.
        shared_stages: Stages trained once for all seeds (their rows vary only through evaluation).

    Returns:
        ``rows`` (``method``, ``alpha``, per metric ``<m>_mean``, ``<m>_std`` and ``<m>_values``,
        ``n_seeds``, ``n_harmful_score`` / ``n_finetune_accuracy`` per seed), ``seeds``, ``alphas``,
        ``methods``, ``extra_judges``, ``shared_stages``, ``seconds_total`` per seed.

    Raises:
        ConfigError: if the seeds' reports do not have the same rows (different configs).
    """
    seeds = sorted(reports)
    first = reports[seeds[0]]
    order = [(r["method"], r["alpha"]) for r in first["rows"]]
    extra = extra_judge_names(first["rows"])
    metrics = [*METRICS[:2], *(f"harmful_score/{n}" for n in extra), *METRICS[2:]]
    by_seed = {}
    for seed in seeds:
        rows = {(r["method"], r["alpha"]): r for r in reports[seed]["rows"]}
        if list(rows) != order:
            raise bad_value("seeds", seeds, f"runs with the same report rows (seed {seed} differs)")
        by_seed[seed] = rows
    out_rows = []
    for key in order:
        row: dict[str, Any] = {"method": key[0], "alpha": key[1], "n_seeds": len(seeds)}
        for same in ("knob", "neutral"):  # a weight-editing repair's knob, the same in every seed
            if same in by_seed[seeds[0]][key]:
                row[same] = by_seed[seeds[0]][key][same]
        for m in metrics:
            values = [by_seed[s][key].get(m) for s in seeds]
            values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
            row[f"{m}_values"] = values
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(values)
        for n in ("n_harmful_score", "n_finetune_accuracy"):
            counts = {by_seed[s][key].get(n, 0) for s in seeds}
            row[n] = counts.pop() if len(counts) == 1 else sorted(counts)
        out_rows.append(row)
    return {
        "rows": out_rows,
        "seeds": seeds,
        "alphas": first["alphas"],
        "methods": first["methods"],
        "extra_judges": extra,
        "metrics": metrics,
        "shared_stages": list(shared_stages or []),
        "seconds_total": {s: reports[s]["seconds_total"] for s in seeds},
        "primary_judge": first.get("primary_judge"),
        # Each seed's analyses (FA budget, judges, masks, re-attack), summarised across seeds.
        "analysis": {s: reports[s]["analysis"] for s in seeds if reports[s].get("analysis")},
        "leaderboard": leaderboard(reports) if all(reports[s].get("analysis") for s in seeds) else None,
    }


#: The item count behind each rate, for the one-seed interval.
COUNT_KEYS = {
    "harmful_score": "n_harmful_score",
    "finetune_accuracy": "n_finetune_accuracy",
    "coherent_rate": "n_harmful_score",
}


def format_cell(row: dict[str, Any], metric: str, scale: float = 1.0) -> str:
    """``mean ± std`` over seeds; with one seed, the value and its 95% Wilson interval over items
    (:func:`~antidote_pl.utils.tables.format_seed_cell`); a scaled figure (removed %) or one without
    an item count shows its value alone when the whole table is one seed (its header says so)."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None:
        return "n/a"
    n_seeds = row.get("n_seeds", 0)
    count = row.get(COUNT_KEYS.get(metric.split("/")[0], ""), 0)
    if n_seeds <= 1 and (not isinstance(count, int) or count <= 0 or scale != 1.0):
        return f"{scale * mean:.1f}"
    return format_seed_cell(scale * mean, None if std is None else scale * std, n_seeds, count)


def _primary(report: dict[str, Any]) -> str:
    """The primary judge's name; reports written before it was recorded used the keyword judge."""
    return report.get("primary_judge") or "keyword"


def aggregate_markdown(report: dict[str, Any]) -> str:
    """The aggregate table: mean ± sample std over seeds per cell, prompts per seed, seeds."""
    extra = report["extra_judges"]
    head = ["variant", "alpha / knob", "removed %", f"HS {_primary(report)} %", *(f"HS {n} %" for n in extra)]
    head += ["FA %", "coherent %", "harmful prompts / seed", "task questions / seed", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        alpha = format_knob(r)
        removed = "-" if r.get("removed_fraction_mean") is None else format_cell(r, "removed_fraction", 100)
        cells = [r["method"], alpha, removed, format_cell(r, "harmful_score")]
        cells += [format_cell(r, f"harmful_score/{n}") for n in extra]
        cells += [format_cell(r, "finetune_accuracy"), format_cell(r, "coherent_rate")]
        cells += [str(r["n_harmful_score"]), str(r["n_finetune_accuracy"]), str(r["n_seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _aggregate_header(report: dict[str, Any], title: str) -> str:
    seeds = ", ".join(str(s) for s in report["seeds"])
    shared = report["shared_stages"]
    one = len(report["seeds"]) == 1
    return (
        f"# {title}: {len(report['seeds'])} seed{'' if one else 's'} ({seeds})\n\n"
        + (
            "Each cell: the percentage and its 95% Wilson interval over the prompts (one seed: no "
            "spread over seeds). "
            if one
            else "Each cell: mean ± sample standard deviation over seeds of the per-seed percentage. "
        )
        + "HS: harmful score, % of held-out harmful prompts answered harmfully (lower is better), "
        f"by the primary judge ({_primary(report)}) and any extra judge; FA: % of held-out task questions "
        "answered correctly; coherent: % of harmful-prompt answers that are well-formed text. "
        "Alpha: fraction of the fine-tuning LoRA's weights removed per row; removed %: realised."
        + (f" Stages trained once and shared by all seeds: {', '.join(shared)}." if shared else "")
        + "\n\n"
    )


def write_aggregate_report(report: dict[str, Any], out: Path, title: str = "antidote_pl report") -> None:
    """Writes ``report.json``, ``report.md`` and ``report.png`` (HS against FA, error bars) atomically,
    plus ``reattack.png`` when the seeds' runs have re-attack curves."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    body = aggregate_markdown(report) + seeds_analysis_markdown(
        report.get("analysis") or {}, out / "reattack.png"
    )
    if report.get("leaderboard"):
        body += "\n" + leaderboard_markdown(report["leaderboard"], _primary(report))
    atomic_write_text(out / "report.md", _aggregate_header(report, title) + body)
    plot_aggregate(report, out / "report.png")


def plot_aggregate(report: dict[str, Any], path: Path) -> None:
    """HS against FA per method over the alpha sweep, with error bars (std over seeds, or Wilson)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    _plot_sweeps(ax, report)
    _plot_single_points(ax, report["rows"], report["methods"])
    rows = report["rows"]
    n_h, n_t = (rows[0]["n_harmful_score"], rows[0]["n_finetune_accuracy"]) if rows else (0, 0)
    ax.set_xlabel(f"fine-tune accuracy FA (%), n={n_t} questions per seed")
    ax.set_ylabel(f"harmful score HS, {_primary(report)} (%), n={n_h} prompts per seed")
    seeds = ", ".join(str(s) for s in report["seeds"])
    spread = "95% Wilson intervals over prompts" if len(report["seeds"]) == 1 else "mean ± std over seeds"
    ax.set_title(f"Each method over its knob (alpha, lambda, ...), {spread}; seeds {seeds}", fontsize=10)
    ax.grid(alpha=0.3)
    outside_legend(ax)
    save_png(fig, path)


def _plot_sweeps(ax, report: dict[str, Any]) -> None:
    rows = report["rows"]
    none = next((r for r in rows if r["method"] == "none"), None)
    for i, method in enumerate(report["methods"]):
        pts = ([none] if none is not None else []) + [r for r in rows if r["method"] == method]
        ax.errorbar(
            [p["finetune_accuracy_mean"] or 0 for p in pts],
            [p["harmful_score_mean"] or 0 for p in pts],
            xerr=_bars(pts, "finetune_accuracy"),
            yerr=_bars(pts, "harmful_score"),
            capsize=3,
            label=method,
            **curve_style(i),
        )


def _plot_single_points(ax, rows: list[dict[str, Any]], methods: list[str]) -> None:
    # References, baselines and combined defenses are single points, not sweeps.
    for r in rows:
        if r["method"] not in (*methods, "none"):
            x, y = r["finetune_accuracy_mean"] or 0, r["harmful_score_mean"] or 0
            ax.errorbar(
                [x],
                [y],
                xerr=_bars([r], "finetune_accuracy"),
                yerr=_bars([r], "harmful_score"),
                fmt="*",
                ms=12,
            )
            ax.annotate(r["method"], (x, y), xytext=(5, 5), textcoords="offset points")


def cell_interval(row: dict[str, Any], metric: str) -> tuple[float, float]:
    """A cell's interval: mean ± std over seeds; with one seed, the 95% Wilson interval over its
    items (mean ± std, i.e. the value itself, when the item count is unknown)."""
    return cell_bounds(*_cell_args(row, metric))


def _cell_args(row: dict[str, Any], metric: str) -> tuple[float, float | None, int, Any]:
    """``(mean, std, n_seeds, item count)`` of an aggregate row's cell, for the interval rule."""
    count = row.get(COUNT_KEYS.get(metric.split("/")[0], ""), 0)
    return row.get(f"{metric}_mean") or 0.0, row.get(f"{metric}_std"), row.get("n_seeds", 0), count


def _bars(points: list[dict[str, Any]], metric: str) -> list[list[float]]:
    """Error bars (below, above) per point: distances to :func:`cell_interval`."""
    distances = [cell_distances(*_cell_args(p, metric)) for p in points]
    return [[d[0] for d in distances], [d[1] for d in distances]]


__all__ = [
    "aggregate",
    "aggregate_markdown",
    "cell_interval",
    "check_no_placeholder",
    "run_seeds",
    "seeded_specs",
    "write_aggregate_report",
]
