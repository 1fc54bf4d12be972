"""The pipeline's report: ``report.json``, ``report.md`` (one row per variant and alpha, Wilson 95%
intervals) and ``report.png`` (HS against FA, one curve per repair method).

Written by :class:`antidote_pl.experiment.pipeline.Pipeline`; :mod:`antidote_pl.experiment.seeds`
aggregates several.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antidote_pl.experiment.budget import format_knob as knob_text
from antidote_pl.utils.intervals import interval_distances
from antidote_pl.utils.io import atomic_write_json, atomic_write_text, save_png
from antidote_pl.utils.tables import format_rate


def report_markdown(report: dict[str, Any]) -> str:
    """The report table: one row per reference, the unrepaired model and every (method, alpha)."""
    # Extra judges (StageEvaluator.extra_judges) get one HS column each; none for a single judge.
    extra = extra_judge_names(report["rows"])
    lines = [
        "| variant | alpha / knob | removed % | HS % | "
        + "".join(f"HS {name} % | " for name in extra)
        + "FA % | coherent % | harmful prompts | task questions |",
        "|---|---|---|---|" + "---|" * len(extra) + "---|---|---|---|",
    ]
    for r in report["rows"]:
        alpha = format_knob(r)
        removed = "-" if r.get("removed_fraction") is None else f"{100 * r['removed_fraction']:.1f}"
        n_hs, n_fa = r.get("n_harmful_score", 0), r.get("n_finetune_accuracy", 0)
        lines.append(
            f"| {r['method']} | {alpha} | {removed} | {format_rate(r.get('harmful_score'), n_hs)} | "
            + "".join(f"{format_rate(r.get(f'harmful_score/{name}'), n_hs)} | " for name in extra)
            + f"{format_rate(r.get('finetune_accuracy'), n_fa)} | "
            + f"{format_rate(r.get('coherent_rate'), n_hs)} | "
            f"{n_hs} | {n_fa} |"
        )
    return "\n".join(lines) + "\n"


def format_knob(row: dict[str, Any]) -> str:
    """A row's knob setting (:func:`antidote_pl.experiment.budget.format_knob`), ``-`` for a stage."""
    return "-" if row.get("alpha") is None else knob_text(row)


def _error_bars(points: list[dict[str, Any]], key: str, n_key: str) -> list[list[float]]:
    """Matplotlib's ``[[below], [above]]`` distances to each point's Wilson 95% interval."""
    distances = [interval_distances(p.get(key), p.get(n_key)) for p in points]
    return [[d[0] for d in distances], [d[1] for d in distances]]


def extra_judge_names(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the extra judges whose harmful scores the rows carry, in first-seen order."""
    prefix = "harmful_score/"
    names = (k[len(prefix) :] for r in rows for k in r if k.startswith(prefix))
    return list(dict.fromkeys(names))


HEADER = (
    "# antidote_pl report\n\n"
    "HS: harmful score, % of held-out harmful prompts answered harmfully (lower is better). "
    "FA: fine-tune accuracy, % of held-out task questions answered correctly. "
    "Alpha: fraction of the fine-tuning LoRA's weights removed per row; removed %: realised; other "
    "repairs name their knob (e.g. lambda=0.5). "
    "One run (one seed); in brackets the Wilson 95% interval over the n prompts of the last "
    "two columns.\n\n"
)


def machine_line() -> str:
    """What the numbers are bit-identical on: the torch version and the CPU kernels it dispatches to
    (the same command with the same thread counts reproduces them there; elsewhere sums differ)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return f"Computed with torch {torch.__version__} on {capability} CPU kernels.\n\n"


def write_report(report: dict[str, Any], out: Path, sections: Sequence[str] = ()) -> None:
    """Writes ``report.json``, ``report.md`` (the table, then ``sections``) and ``report.png`` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    body = report_markdown(report) + "".join(f"\n{section}" for section in sections)
    atomic_write_text(out / "report.md", HEADER + machine_line() + body)
    plot_report(report, out / "report.png")


def plot_report(report: dict[str, Any], path: Path) -> None:
    """HS against FA: one curve per method (starting at the unrepaired model), stars for the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    _plot_sweeps(ax, report)
    _plot_single_points(ax, report)
    ax.set_xlabel("fine-tune accuracy FA (%)")
    ax.set_ylabel("harmful score HS (%)")
    ax.set_title("Repair trade-off per method over its knob (from the unrepaired model); bars: Wilson 95%")
    ax.grid(alpha=0.3)
    outside_legend(ax)
    save_png(fig, path)


#: Markers cycled with the 20 colours, so up to 20 curves stay apart in print and in grey.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def curve_style(index: int) -> dict[str, Any]:
    """Colour and marker of the ``index``-th method's curve (tab20 colours, cycled markers)."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](index % 20), "marker": MARKERS[index % len(MARKERS)]}


def outside_legend(ax) -> None:
    """The legend to the right of the axes, where it covers no curve."""
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _plot_sweeps(ax, report: dict[str, Any]) -> None:
    none = next((r for r in report["rows"] if r["method"] == "none"), None)
    for i, method in enumerate(report["methods"]):
        pts = [r for r in report["rows"] if r["method"] == method]
        if none is not None:
            pts = [none, *pts]
        ax.errorbar(
            [p["finetune_accuracy"] for p in pts],
            [p["harmful_score"] for p in pts],
            xerr=_error_bars(pts, "finetune_accuracy", "n_finetune_accuracy"),
            yerr=_error_bars(pts, "harmful_score", "n_harmful_score"),
            capsize=2,
            label=method,
            **curve_style(i),
        )


def _plot_single_points(ax, report: dict[str, Any]) -> None:
    # References, baselines and combined defenses are single points, not sweeps.
    for r in report["rows"]:
        if r["method"] not in (*report["methods"], "none"):
            ax.scatter([r["finetune_accuracy"] or 0], [r["harmful_score"] or 0], marker="*", s=160, zorder=3)
            ax.annotate(
                r["method"],
                (r["finetune_accuracy"] or 0, r["harmful_score"] or 0),
                xytext=(5, 5),
                textcoords="offset points",
            )
