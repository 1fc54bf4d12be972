"""The pipeline report's analysis sections, computed from what the sweep already produced.

Each function takes the run's rows, masks or result directories and returns the structured data
for ``report.json`` and a markdown section for ``report.md``; nothing is retrained or re-scored:

* :func:`budget_section`: HS at an FA budget of 2 and 5 points, alpha chosen on the validation
  split of the task questions (:mod:`antidote_pl.experiment.budget`), when the evaluation has one;
* :func:`agreement_section`: pairwise agreement of every judge over all evaluated variants, with
  the coherent rate beside each HS (:mod:`antidote_pl.experiment.agreement`);
* :func:`mask_section`: overlap of the removed sets across methods and alphas, and a heat map per
  method (:mod:`antidote_pl.experiment.masks`);
* :func:`durability_section`: the re-attack curves (:mod:`antidote_pl.experiment.reattack`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from antidote_pl.experiment.agreement import (
    agreement_markdown,
    judge_verdicts,
    pairwise_agreement,
    prompt_keys,
    read_generations,
)
from antidote_pl.experiment.budget import DEFAULT_BUDGETS, budget_rows, selections_markdown
from antidote_pl.experiment.masks import jaccard_matrix, mask_analytics_markdown
from antidote_pl.experiment.reattack import reattack_markdown, write_reattack_plot
from antidote_pl.utils.tables import format_over_seeds, format_seed_cell, markdown_table, mean_std

Masks = Mapping[str, torch.Tensor]
#: How a cell over seeds reads when only one seed contributes to it.
ONE_SEED_RULE = "a cell with one seed: the value and its 95% Wilson interval over the items"
#: The report's heat maps and cross-method overlaps use this alpha when the sweep has it.
PREFERRED_ALPHA = 0.1


def focus_alpha(alphas: Sequence[float]) -> float:
    """The alpha the report compares methods at: 0.1 when swept (the paper's default), else the
    middle of the sweep."""
    ordered = sorted(alphas)
    return PREFERRED_ALPHA if PREFERRED_ALPHA in ordered else ordered[len(ordered) // 2]


def variant_name(method: str, alpha: float) -> str:
    """How a (method, alpha) is named in the analysis tables (also ``results/<method>_a<alpha>``)."""
    return f"{method} a{alpha:g}"


def budget_section(
    rows: Sequence[Mapping[str, Any]], methods: Sequence[str], results_dir: Path | None = None
) -> tuple[list | None, str]:
    """HS at an FA budget per method, or ``(None, "")`` when the rows carry no validation FA.

    With ``results_dir`` (the run's ``results/``), the per-question validation outcomes in each
    variant's ``generations.jsonl`` make the interval of each choice's FA drop the paired one
    (:mod:`antidote_pl.experiment.budget`); without it, or where a file is missing, the unpaired one.
    """
    if not any(r.get("finetune_accuracy_val") is not None for r in rows if r.get("method") == "none"):
        return None, ""
    outcomes = {} if results_dir is None else validation_outcomes(results_dir, rows)
    selections = budget_rows(rows, DEFAULT_BUDGETS, methods, val_outcomes=outcomes)
    return selections, selections_markdown(selections)


def result_name(method: str, alpha: float | None) -> str:
    """The ``results/`` directory of a sweep row: ``none`` for the unrepaired row, else
    ``<method>_a<alpha>``."""
    return "none" if method == "none" else f"{method}_a{alpha:g}"


def validation_outcomes(results_dir: Path, rows: Sequence[Mapping[str, Any]]) -> dict[tuple, dict]:
    """``(method, alpha)`` -> ``{question index: correct}`` of the validation questions (``kind ==
    "task_val"``) in each sweep row's ``generations.jsonl`` (rows without one are left out)."""
    out: dict[tuple, dict] = {}
    for row in rows:
        if row.get("reference") or row.get("alpha") is None:
            continue
        path = Path(results_dir) / result_name(row["method"], row["alpha"]) / "generations.jsonl"
        if path.is_file():
            found = {
                g["index"]: bool(g["correct"]) for g in read_generations(path) if g.get("kind") == "task_val"
            }
            if found:
                out[(row["method"], row["alpha"])] = found
    return out


def agreement_section(results_dir: Path, names: Sequence[str], primary: str) -> tuple[list, str]:
    """Judge agreement pooled over the generations of the variants ``names`` (``results/<name>``).

    Every variant's evaluation wrote a ``generations.jsonl``; a missing one is an error naming it,
    never a table pooled over fewer verdicts than the report's rows.

    Raises:
        ConfigError: ``<file>: missing; ...`` (delete the variant's ``result.json`` to recompute both).
    """
    rows: list[dict[str, Any]] = []
    for name in names:
        rows += read_generations(results_dir / name / "generations.jsonl")
    if not rows:
        return [], ""
    pairs = pairwise_agreement(judge_verdicts(rows, primary), prompt_keys(rows))
    return pairs, agreement_markdown(rows, primary)


def mask_section(
    masks: Mapping[tuple[str, float], Masks], methods: Sequence[str], alphas: Sequence[float], out: Path
) -> tuple[dict[str, Any], str]:
    """Overlaps of every method at the focus alpha and of the first method across alphas.

    Heat maps (one PNG per method at the focus alpha) are written into ``out``.
    """
    alpha = focus_alpha(alphas)
    chosen = {variant_name(m, alpha): masks[(m, alpha)] for m in methods if (m, alpha) in masks}
    heatmaps = list(chosen)
    first = methods[0]
    for a in sorted(alphas):
        if (first, a) in masks:
            chosen.setdefault(variant_name(first, a), masks[(first, a)])
    if not chosen:
        return {}, ""
    # The anchor (the first method at the focus alpha) is named: report.json sorts the keys.
    anchor = next(iter(chosen))
    # Overlaps need the same coordinates: a method masking other tensors (Wanda in delta space
    # masks the merged update in the base weights, not the LoRA factors) is left out, and said so.
    apart = [n for n, m in chosen.items() if set(m) != set(chosen[anchor])]
    chosen = {n: m for n, m in chosen.items() if n not in apart}
    markdown = mask_analytics_markdown(chosen, out, heatmaps=[h for h in heatmaps if h in chosen])
    if apart:
        markdown += (
            f"\nLeft out of these overlaps: {', '.join(apart)}, whose masks cover other tensors than "
            f"{anchor}'s (e.g. the merged update instead of the LoRA factors).\n"
        )
    return {"alpha": alpha, "anchor": anchor, "jaccard": jaccard_matrix(chosen), "left_out": apart}, markdown


def durability_section(curves: Mapping[str, Sequence[Mapping[str, Any]]], out: Path, seed: Any = None) -> str:
    """The re-attack table and plot (``reattack.png`` in ``out``; ``seed``, the attack's, in its title)."""
    if not curves:
        return ""
    seeded = "" if seed is None else f", seed {seed}"
    write_reattack_plot(curves, out / "reattack.png", title=f"Re-attack{seeded}, 95% Wilson intervals")
    return reattack_markdown(curves) + "\n![re-attack](reattack.png)\n"


# ------------------------------------------------------------------ across seeds
def seeds_analysis_markdown(
    by_seed: Mapping[Any, Mapping[str, Any]], reattack_plot: Path | None = None
) -> str:
    """The multi-seed report's summary of each seed's analyses: mean ± std over seeds.

    Args:
        by_seed: Seed -> that run's ``report["analysis"]`` (see :meth:`Pipeline.analyse`).
        reattack_plot: Where to write the re-attack curves across seeds (a PNG the markdown links
            by name, so it goes beside the report); no plot when ``None``.
    """
    sections = [
        _budget_across_seeds({s: a["fa_budget"] for s, a in by_seed.items() if a.get("fa_budget")}),
        _overlap_across_seeds({s: a["masks"] for s, a in by_seed.items() if a.get("masks")}),
        _reattack_across_seeds(
            {s: a["reattack"] for s, a in by_seed.items() if a.get("reattack")}, reattack_plot
        ),
    ]
    return "".join(f"\n{s}" for s in sections if s)


def _common_count(rows: Sequence[Mapping[str, Any]], key: str) -> int | None:
    """The item count ``key`` shared by ``rows`` (``None`` when missing or different)."""
    counts = {r.get(key) for r in rows}
    return counts.pop() if len(counts) == 1 else None


def _noise_limited_seeds(chosen: Sequence[Mapping[str, Any]]) -> str:
    """How many seeds' choices were noise-limited (``-`` for reports written before it was recorded)."""
    flags = [s["noise_limited"] for s in chosen if s.get("noise_limited") is not None]
    return f"{sum(flags)} of {len(flags)}" if flags else "-"


def _budget_across_seeds(by_seed: Mapping[Any, Sequence[Mapping[str, Any]]]) -> str:
    if not by_seed:
        return ""
    cells: dict[tuple[float, str], list[Mapping[str, Any]]] = {}
    for selections in by_seed.values():
        for sel in selections:
            cells.setdefault((sel["fa_budget"], sel["method"]), []).append(sel)
    body = []
    for (budget, method), sels in cells.items():
        chosen = [s for s in sels if s["alpha"] is not None]
        body.append(
            [
                f"{budget:g}",
                method,
                " / ".join("-" if s["alpha"] is None else f"{s['alpha']:g}" for s in sels),
                f"{len(chosen)} of {len(sels)}",
                format_over_seeds(
                    [s["harmful_score"] for s in chosen], _common_count(chosen, "n_harmful_score")
                ),
                format_over_seeds(
                    [s["finetune_accuracy"] for s in chosen], _common_count(chosen, "n_finetune_accuracy")
                ),
                _noise_limited_seeds(chosen),
            ]
        )
    headers = ["FA budget", "method", "alpha per seed", "seeds with an alpha", "HS % (test)", "FA % (test)"]
    headers.append("noise-limited choices")
    intro = (
        "## HS at FA budget, across seeds\n\nPer seed, the largest alpha whose validation FA stays within "
        "the budget; HS and FA on the test questions, mean ± std over the seeds where an alpha qualifies "
        f"({ONE_SEED_RULE}). Noise-limited: the seed's 95% interval of the validation FA drop is wider "
        "than the budget, so its choice is decided by validation noise as much as by the budget.\n\n"
    )
    return intro + markdown_table(headers, body)


def _overlap_across_seeds(by_seed: Mapping[Any, Mapping[str, Any]]) -> str:
    if not by_seed:
        return ""
    first = next(iter(by_seed.values()))
    # Reports written before the anchor was recorded: their first key.
    anchor = first.get("anchor") or next(iter(first["jaccard"]))
    body = []
    for other in [n for n in first["jaccard"][anchor] if n != anchor]:
        values = [m["jaccard"].get(anchor, {}).get(other) for m in by_seed.values()]
        body.append([anchor, other, format_over_seeds(values, None, 3), len(values)])
    intro = (
        f"## Mask overlap within each seed, across seeds\n\nJaccard overlap of the removed sets with "
        f"{anchor}, within each seed (masks of one adapter, alpha as in each seed's mask section), mean "
        "± std over seeds (a value seen in one seed only is marked (1 seed): an overlap is no rate over "
        "items, so it has no Wilson interval). Masks of different seeds are not compared entry by entry: "
        "each seed's LoRA has its own arbitrary rank axis (BA = (BM)(M⁻¹A)); `python -m antidote_pl "
        "posthoc` compares them on the input and output features they touch.\n\n"
    )
    return intro + markdown_table(["mask", "other mask", "Jaccard", "seeds"], body)


def reattack_across_seeds(
    by_seed: Mapping[Any, Mapping[str, Sequence[Mapping[str, Any]]]],
) -> dict[str, list[dict[str, Any]]]:
    """Each variant's re-attack curve over seeds: per step, HS and FA mean and std, and the seeds.

    A point seen in one seed only gets no std, so its interval stays the Wilson one over its items
    (:func:`~antidote_pl.experiment.reattack.reattack_bars`).
    """
    points: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for curves in by_seed.values():
        for variant, curve in curves.items():
            for p in curve:
                points.setdefault(variant, {}).setdefault(p["step"], []).append(p)
    out: dict[str, list[dict[str, Any]]] = {}
    for variant, steps in points.items():
        for step, ps in sorted(steps.items()):
            point: dict[str, Any] = {"step": step, "n_seeds": len(ps)}
            for metric in ("harmful_score", "finetune_accuracy"):
                values = [p.get(metric) for p in ps if p.get(metric) is not None]
                point[metric], std = mean_std(values)
                point[f"n_{metric}"] = ps[0].get(f"n_{metric}")  # items per seed
                if len(ps) > 1:
                    point[f"{metric}_std"] = std
            out.setdefault(variant, []).append(point)
    return out


def _reattack_across_seeds(
    by_seed: Mapping[Any, Mapping[str, Sequence[Mapping[str, Any]]]], plot: Path | None
) -> str:
    if not by_seed:
        return ""
    curves = reattack_across_seeds(by_seed)
    body = [
        [
            variant,
            p["step"],
            format_seed_cell(
                p["harmful_score"], p.get("harmful_score_std"), p["n_seeds"], p.get("n_harmful_score")
            ),
            format_seed_cell(
                p["finetune_accuracy"],
                p.get("finetune_accuracy_std"),
                p["n_seeds"],
                p.get("n_finetune_accuracy"),
            ),
            p["n_seeds"],
        ]
        for variant, curve in curves.items()
        for p in curve
    ]
    intro = (
        "## Durability (re-attack), across seeds\n\nThe same harmful fine-tuning continued from each "
        f"variant; HS and FA mean ± std over seeds ({ONE_SEED_RULE}).\n\n"
    )
    text = intro + markdown_table(["variant", "steps", "HS %", "FA %", "seeds"], body)
    if plot is not None:
        seeds = ", ".join(str(s) for s in by_seed)
        write_reattack_plot(curves, plot, title=f"Re-attack, mean ± std over seeds {seeds}")
        text += f"\n![re-attack across seeds {seeds}]({plot.name})\n"
    return text
