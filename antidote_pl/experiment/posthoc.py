"""Mask analytics and judge agreement of a finished pipeline run, from its saved files only.

::

    python -m antidote_pl posthoc --run outputs/smol/pipeline --out docs/results/smol_analysis.md \\
        --eval_config configs/smol/eval.yaml

Reads a single-seed (``<run>/scores``, ``<run>/results``) or multi-seed (``<run>/seed<N>/...``)
pipeline output directory and writes, without loading or running any model:

* mask analytics (:mod:`antidote_pl.experiment.masks`): a heat map per method at the focus alpha
  (0.1 when swept) of the first seed, and Jaccard overlaps of the removed sets across methods,
  alphas, seeds, calibration sets (``wanda`` on the harmful realignment set vs ``wanda_benign`` on
  task data) and Wanda vs magnitude, each beside the overlap of random masks of the same fractions.
  Across seeds (independently initialised adapters, whose LoRA rank axes do not correspond) masks
  are compared in corresponding coordinates only (:func:`~antidote_pl.experiment.masks.corresponding_masks`:
  ``lora_A``'s input columns and ``lora_B``'s output rows touched, full or merged-delta entries);
* judge agreement (:mod:`antidote_pl.experiment.agreement`) pooled over every evaluated variant's
  ``generations.jsonl``, per seed and over all seeds.

Masks per alpha come from the scoring run's ``sweep_masks.safetensors`` when it has one. Runs of
older versions saved only ``scores.safetensors`` and ``mask.json``; their sweep masks are recomputed
here with :func:`~antidote_pl.pruning.masks_for_alphas` and the scope in ``mask.json``, which is what
those versions evaluated, and every recomputation is checked against the applied mask
(``mask.safetensors``) at the run's own alpha. Selection is per row of the row layout ``[out, in]``;
without a model the layout is known for ``lora`` targets (peft's factors are ``nn.Linear``: row
layout is parameter layout) and for ``lora_delta`` (transposed iff the adapter's
``fan_in_fan_out``); a ``linear`` target with row scope may be a transposed ``Conv1D`` and is
refused. The saved scores are not fingerprinted against the fine-tuned adapter here (that needs the
model); the check against the applied mask is what ties them to the run.

The markdown and PNGs are written atomically next to ``--out``; a notes file (``--notes``, default
``<out stem>_notes.md``) is appended unchanged, as in :mod:`antidote_pl.experiment.smol_report`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
import yaml

from antidote_pl.errors import bad_file
from antidote_pl.experiment.agreement import agreement_markdown, read_generations
from antidote_pl.experiment.masks import (
    chance_jaccard,
    column_name,
    column_sort_key,
    corresponding_masks,
    describe_tensor,
    jaccard,
    mask_analytics_markdown,
    overlap_markdown,
    removed_fraction,
)
from antidote_pl.experiment.sections import focus_alpha, variant_name
from antidote_pl.pruning import masks_for_alphas
from antidote_pl.pruning.artifacts import MASK_FILE, SWEEP_FILE, RepairArtifacts, read_masks
from antidote_pl.pruning.targets import merged_param_name
from antidote_pl.repair.artifacts import EDIT_REPORT_FILE
from antidote_pl.utils.console import say
from antidote_pl.utils.files import read_json_file
from antidote_pl.utils.io import atomic_write_text
from antidote_pl.utils.tables import markdown_table

Masks = Mapping[str, torch.Tensor]
#: Methods compared pairwise when the run has them: harmful vs benign calibration, Wanda vs magnitude.
WANDA, BENIGN, MAGNITUDE = "wanda", "wanda_benign", "magnitude"
#: What the evaluator uses when its config names no judge (StageEvaluator's default).
DEFAULT_JUDGE = "KeywordJudge"
_SEED_DIR = re.compile(r"seed(\d+)")


@dataclass(frozen=True)
class SeedRun:
    """One seed's pipeline output: ``scores/<method>`` and ``results/<variant>``."""

    label: str
    directory: Path
    methods: list[str]
    alphas: list[float]


# ------------------------------------------------------------------------------ reading the run
def find_runs(run: str | Path) -> list[SeedRun]:
    """The seed runs of a pipeline output directory, ordered by seed (one for a single-seed run).

    Raises:
        ConfigError: for a missing directory, one that is no pipeline output, or a missing report.
    """
    root = Path(run)
    if not root.is_dir():
        raise bad_file(root, "missing; expected a pipeline output_dir (--run)")
    if (root / "scores").is_dir():
        return [_seed_run("run", root)]
    seeds = [d for d in root.iterdir() if _SEED_DIR.fullmatch(d.name) and (d / "scores").is_dir()]
    if not seeds:
        raise bad_file(root, "holds neither scores/ nor seed<N>/scores/; expected a pipeline output_dir")
    seeds.sort(key=lambda d: int(_SEED_DIR.fullmatch(d.name).group(1)))
    return [_seed_run(d.name, d) for d in seeds]


def _seed_run(label: str, directory: Path) -> SeedRun:
    report = read_json_file(directory / "report.json", "the pipeline's report.json")
    if not isinstance(report, dict) or not report.get("methods") or not report.get("alphas"):
        raise bad_file(directory / "report.json", "has no 'methods' and 'alphas'; expected a pipeline report")
    # Weight-editing repairs (repair.json, no mask) have no removed set to overlap.
    pruning = [m for m in report["methods"] if not (directory / "scores" / m / EDIT_REPORT_FILE).is_file()]
    if not pruning:
        raise bad_file(directory / "report.json", "names no pruning method; the mask analysis needs masks")
    return SeedRun(label, directory, pruning, [float(a) for a in report["alphas"]])


def method_masks(directory: Path, alphas: Sequence[float]) -> dict[float, dict[str, torch.Tensor]]:
    """Removal masks (True = removed, parameter layout) of one scoring run, per alpha.

    From ``sweep_masks.safetensors`` when it holds every alpha, else recomputed from the saved
    scores (see the module docstring).
    """
    art = RepairArtifacts.read(directory)
    if (directory / SWEEP_FILE).is_file() and all(a in art.alphas for a in alphas):
        return {a: art.masks(a) for a in alphas}
    return recompute_masks(art, alphas)


def recompute_masks(art: RepairArtifacts, alphas: Sequence[float]) -> dict[float, dict[str, torch.Tensor]]:
    """Masks per alpha from ``scores.safetensors`` and ``mask.json``'s scope, checked at the own alpha.

    Raises:
        ConfigError: when the masks cannot be recomputed from the saved files (protected scoring,
            unknown layout) or do not reproduce the applied mask.
    """
    report = art.report
    if float(report.get("protect_fraction") or 0.0) > 0:
        raise bad_file(
            art.directory / "mask.json",
            "protect_fraction > 0: the protecting scores were not saved, so the sweep masks cannot be "
            "recomputed; rerun the scoring with sweep_alphas",
        )
    flip = _transposed(art)
    scores = {n: s.t() if flip else s for n, s in art.scores().items()}
    wanted = sorted({*map(float, alphas), art.alpha})
    by_alpha = masks_for_alphas(scores, wanted, report["scope"])
    by_alpha = {
        a: {n: m.t().contiguous() if flip else m for n, m in ms.items()} for a, ms in by_alpha.items()
    }
    _check_own_mask(art, by_alpha[art.alpha])
    return {float(a): by_alpha[float(a)] for a in alphas}


def _transposed(art: RepairArtifacts) -> bool:
    """Whether the saved (parameter-layout) scores are the transpose of the row layout."""
    target, scope = art.report.get("target"), art.report.get("scope")
    if target == "lora" or scope != "row":
        # LoRA factors are nn.Linear ([out, in]); other scopes rank all entries of a group alike.
        return False
    if target == "lora_delta":
        adapter = read_json_file(art.directory / "adapter_config.json", "the adapter's config")
        return bool(adapter.get("fan_in_fan_out", False))
    raise bad_file(
        art.directory / "mask.json",
        f"target {target!r} with row scope: the score layout (Conv1D or not) needs the model; "
        "rerun the scoring with sweep_alphas so its masks are saved",
    )


def _check_own_mask(art: RepairArtifacts, masks: Mapping[str, torch.Tensor]) -> None:
    applied, _ = read_masks(art.directory)
    if art.report.get("merged_adapter"):
        masks = {merged_param_name(n): m for n, m in masks.items()}
    same = set(masks) == set(applied) and all(torch.equal(masks[n], applied[n]) for n in applied)
    if not same:
        raise bad_file(
            art.directory / MASK_FILE,
            f"differs from the mask recomputed from the saved scores at alpha {art.alpha:g}; "
            "the scores and masks do not belong together",
        )


def load_all_masks(runs: Sequence[SeedRun]) -> dict[tuple[str, str, float], dict[str, torch.Tensor]]:
    """``{(seed label, method, alpha): masks}`` for every seed, method and swept alpha."""
    out = {}
    for run in runs:
        for method in run.methods:
            by_alpha = method_masks(run.directory / "scores" / method, run.alphas)
            out.update({(run.label, method, a): m for a, m in by_alpha.items()})
    return out


def primary_judge(run: SeedRun, eval_config: str | Path | None) -> tuple[str, str]:
    """The primary judge's class name and where it was read.

    From the run's ``report.json`` (the judge its evaluator built) when it names one, else its
    ``manifest.json`` (the evaluation config it recorded; one file only), else ``eval_config``;
    ``("primary", ...)`` when none is available.
    """
    report = run.directory / "report.json"
    if report.is_file():
        named = read_json_file(report, "a run report").get("primary_judge")
        if isinstance(named, str) and named:
            return named, f"{report} (primary_judge)"
    manifest = run.directory / "manifest.json"
    if manifest.is_file():
        entry = read_json_file(manifest, "a run manifest").get("configs", {}).get("evaluation", {})
        if isinstance(entry, dict) and "text" in entry:
            return _judge_class(yaml.safe_load(entry["text"])), f"{manifest} (evaluation config)"
    if eval_config is None:
        return "primary", "not recorded by the run; pass --eval_config to name it"
    path = Path(eval_config)
    if not path.is_file():
        raise bad_file(path, "missing; expected the evaluation config the run used (--eval_config)")
    return _judge_class(yaml.safe_load(path.read_text(encoding="utf-8"))), str(path)


def _judge_class(config: Any) -> str:
    judge = ((config or {}).get("model") or {}).get("init_args", {}).get("judge")
    path = judge.get("class_path") if isinstance(judge, dict) else judge
    return str(path).rsplit(".", 1)[-1] if path else DEFAULT_JUDGE


def run_generations(run: SeedRun) -> tuple[list[str], list[dict[str, Any]]]:
    """Names of the evaluated variants with a ``generations.jsonl`` and their rows, concatenated.

    Raises:
        ConfigError: when the seed has no generations at all.
    """
    results = run.directory / "results"
    names = sorted(d.name for d in results.glob("*") if (d / "generations.jsonl").is_file())
    if not names:
        raise bad_file(results, "holds no <variant>/generations.jsonl; expected the pipeline's results")
    rows = [row for name in names for row in read_generations(results / name / "generations.jsonl")]
    return names, rows


# ------------------------------------------------------------------------------ sections
def pair_cell(a: Masks, b: Masks) -> tuple[float, float]:
    """Jaccard of two masks and the chance level for their removed fractions."""
    return jaccard(a, b), chance_jaccard(removed_fraction(a), removed_fraction(b))


def pair_table(masks: Mapping, runs: Sequence[SeedRun], first: str, second: str) -> str:
    """Jaccard (chance) of ``first`` vs ``second`` per alpha (rows) and seed (columns), with the mean."""
    alphas = [
        a for a in runs[0].alphas if all((r.label, m, a) in masks for r in runs for m in (first, second))
    ]
    body = []
    for a in alphas:
        cells = [pair_cell(masks[(r.label, first, a)], masks[(r.label, second, a)]) for r in runs]
        mean_j = sum(j for j, _ in cells) / len(cells)
        mean_c = sum(c for _, c in cells) / len(cells)
        body.append([f"{a:g}", *(f"{j:.3f} ({c:.3f})" for j, c in cells), f"{mean_j:.3f} ({mean_c:.3f})"])
    headers = ["alpha", *(r.label for r in runs), "mean"]
    return markdown_table(headers, body)


def module_table(pairs: Mapping[str, tuple[Masks, Masks]]) -> str:
    """Jaccard (chance) of each named pair of masks, per module type and LoRA factor (rows)."""
    first = next(iter(pairs.values()))[0]
    columns: dict[str, list[str]] = {}
    for name in first:
        _, module, kind = describe_tensor(name)
        columns.setdefault(column_name(module, kind), []).append(name)
    body = []
    for column in sorted(columns, key=column_sort_key):
        cells = []
        for a, b in pairs.values():
            j, c = pair_cell({n: a[n] for n in columns[column]}, {n: b[n] for n in columns[column]})
            cells.append(f"{j:.3f} ({c:.3f})")
        body.append([column, *cells])
    return markdown_table(["module", *pairs], body)


#: Why masks of different seeds are compared in corresponding coordinates (report text).
ACROSS_SEEDS_NOTE = (
    "Each seed trains its own LoRA from its own initialisation, and a LoRA update BA equals (BM)(M⁻¹A) "
    "for any invertible M: the rank axis is arbitrary, so entry (i, j) of one seed's lora_A or lora_B "
    "has nothing to do with entry (i, j) of another's, and entry-level overlap across seeds is near "
    "chance by construction. Compared here instead, in coordinates that correspond across seeds: the "
    "input features (lora_A's columns) and output features (lora_B's rows) a mask touches (removes at "
    "least one entry of), and the entries of full weights or merged deltas; 'touched %' is the "
    "fraction of those touched. Under the per-row budget every lora_B row loses the same count, so "
    "every row is touched in every seed and the B part agrees by construction (its chance is 1).\n\n"
)


def seed_table(masks: Mapping, runs: Sequence[SeedRun], alpha: float) -> str:
    """Per method: mean pairwise Jaccard across seeds at ``alpha``, in corresponding coordinates
    (:func:`~antidote_pl.experiment.masks.corresponding_masks`), and its chance level."""
    body = []
    for method in runs[0].methods:
        sets = {
            r.label: corresponding_masks(masks[(r.label, method, alpha)])
            for r in runs
            if (r.label, method, alpha) in masks
        }
        pairs = [pair_cell(sets[x], sets[y]) for x, y in combinations(sets, 2)]
        if pairs:
            mean_j = sum(j for j, _ in pairs) / len(pairs)
            mean_c = sum(c for _, c in pairs) / len(pairs)
            body.append([method, len(pairs), f"{mean_j:.3f}", f"{mean_c:.3f}"])
    return markdown_table(["method", "seed pairs", "mean Jaccard", "chance"], body)


def mask_sections(masks: Mapping, runs: Sequence[SeedRun], out_dir: Path) -> str:
    """Heat maps and overlaps across methods, alphas, seeds, calibration sets, Wanda vs magnitude."""
    runs, apart = _same_tensors(masks, runs)
    first, alpha = runs[0], focus_alpha(runs[0].alphas)
    by_method = {variant_name(m, alpha): masks[(first.label, m, alpha)] for m in first.methods}
    parts = [
        f"Methods at alpha {alpha:g}, {first.label} (heat maps and per-layer tables below).\n\n",
        mask_analytics_markdown(by_method, out_dir).replace("## Mask analytics\n\n", "", 1),
    ]
    lead = _lead(first.methods)
    by_alpha = {variant_name(lead, a): masks[(first.label, lead, a)] for a in first.alphas}
    parts += [f"\n## {lead} across alphas ({first.label})\n\n", overlap_markdown(by_alpha)]
    parts += [f"\n## Across seeds at alpha {alpha:g}\n\n", _seeds_markdown(masks, runs, lead, alpha)]
    for a_method, b_method, title in (
        (WANDA, BENIGN, "Harmful vs benign calibration"),
        (WANDA, MAGNITUDE, "Wanda vs magnitude"),
    ):
        parts.append(f"\n## {title}: {a_method} vs {b_method}, Jaccard (chance) per alpha\n\n")
        if a_method in first.methods and b_method in first.methods:
            parts.append(pair_table(masks, runs, a_method, b_method))
        else:
            parts.append(f"The run has no `{a_method}` and `{b_method}` pair.\n")
    if apart:
        parts.append(
            f"\nLeft out of these overlaps: {', '.join(apart)}, whose masks cover other tensors than "
            f"{lead}'s (e.g. the merged update instead of the LoRA factors).\n"
        )
    return "".join(parts) + _modules_markdown(masks, runs, lead, alpha)


def _lead(methods: Sequence[str]) -> str:
    """The method the mask sections lead with and compare others to: Wanda when the run has it."""
    return WANDA if WANDA in methods else methods[0]


def _same_tensors(masks: Mapping, runs: Sequence[SeedRun]) -> tuple[list[SeedRun], list[str]]:
    """The runs restricted to the methods whose masks name the lead method's tensors (overlaps need
    the same coordinates: Wanda in delta space masks the base weights), and the methods left out."""
    first = runs[0]
    alpha = first.alphas[0]
    lead = _lead(first.methods)
    anchor = set(masks[(first.label, lead, alpha)])
    apart = [m for m in first.methods if set(masks[(first.label, m, alpha)]) != anchor]
    kept = [replace(r, methods=[m for m in r.methods if m not in apart]) for r in runs]
    return kept, apart


def _modules_markdown(masks: Mapping, runs: Sequence[SeedRun], lead: str, alpha: float) -> str:
    """The overlaps of ``lead`` at ``alpha`` split by module and LoRA factor (first seed)."""
    first = runs[0]
    mine = masks[(first.label, lead, alpha)]
    pairs = {
        f"{lead} vs {other}": (mine, masks[(first.label, other, alpha)])
        for other in first.methods
        if other != lead
    }
    if len(runs) > 1:
        # Another seed's adapter: compared in corresponding coordinates (A's columns, B's rows).
        other = masks[(runs[1].label, lead, alpha)]
        pairs[f"{lead} {first.label} vs {runs[1].label} (A columns, B rows)"] = (
            corresponding_masks(mine),
            corresponding_masks(other),
        )
    if not pairs:
        return ""
    title = f"\n## Per module and factor at alpha {alpha:g} ({first.label}), Jaccard (chance)\n\n"
    return title + module_table(pairs)


def _seeds_markdown(masks: Mapping, runs: Sequence[SeedRun], lead: str, alpha: float) -> str:
    by_seed = {
        r.label: corresponding_masks(masks[(r.label, lead, alpha)])
        for r in runs
        if (r.label, lead, alpha) in masks
    }
    if len(by_seed) < 2:
        return "One seed: no overlap across seeds.\n"
    table = overlap_markdown(by_seed, fraction_label="touched %")
    return (
        f"{ACROSS_SEEDS_NOTE}{lead}, every pair of seeds (in brackets: chance).\n\n{table}\n"
        f"Every method, mean over seed pairs.\n\n{seed_table(masks, runs, alpha)}"
    )


def agreement_sections(runs: Sequence[SeedRun], primary: str) -> str:
    """Judge agreement per seed and over all seeds, each pooled over every evaluated variant."""
    parts, pooled = [], []
    for run in runs:
        names, rows = run_generations(run)
        pooled += rows
        text = agreement_markdown(rows, primary).replace("## Judge agreement", f"### {run.label}", 1)
        parts.append(f"\n{text}\nPooled over {len(names)} variants: {', '.join(names)}.\n")
    if len(runs) > 1:
        text = agreement_markdown(pooled, primary).replace("## Judge agreement", "### all seeds", 1)
        parts.append(f"\n{text}")
    return "## Judge agreement\n" + "".join(parts)


def _scope_note(runs: Sequence[SeedRun]) -> str:
    """What the heat map can show, given the selection scope of the first seed's methods."""
    scopes = {
        m: RepairArtifacts.read(runs[0].directory / "scores" / m).report.get("scope") for m in runs[0].methods
    }
    text = ", ".join(f"{m}: {s}" for m, s in scopes.items())
    if set(scopes.values()) == {"row"}:
        text += (
            ". Every method removes the same count from every output row, so the removed fraction per "
            "layer and module is the same for all methods by construction; the masks differ only in "
            "which entries of each row they remove, which the overlaps measure."
        )
    return f"Selection scope: {text}\n"


def render(run: str | Path, out_dir: Path, eval_config: str | Path | None, notes: str | None) -> str:
    """The whole analysis as markdown; heat maps are written into ``out_dir``."""
    runs = find_runs(run)
    masks = load_all_masks(runs)
    judge, source = primary_judge(runs[0], eval_config)
    header = [
        f"# Mask analytics and judge agreement: {run}\n",
        f"Computed from the saved run by `python -m antidote_pl posthoc` (no model rerun). "
        f"Seeds: {', '.join(r.label for r in runs)}; methods: {', '.join(runs[0].methods)}; "
        f"alphas: {', '.join(f'{a:g}' for a in runs[0].alphas)}. Masks are True = removed; Jaccard "
        "= |A ∩ B| / |A ∪ B| of the removed sets, chance = the overlap of independent random masks "
        "of the same removed fractions.\n",
        _scope_note(runs),
        f"Primary judge: {judge} (from {source}).\n",
        "## Mask analytics\n",
    ]
    text = (
        "\n".join(header)
        + "\n"
        + mask_sections(masks, runs, out_dir)
        + "\n"
        + agreement_sections(runs, judge)
    )
    return text + ("\n" + notes.rstrip() + "\n" if notes else "")


def write_posthoc(
    run: str | Path, out: str | Path, eval_config: str | Path | None = None, notes: str | Path | None = None
) -> Path:
    """Writes the analysis of a finished run to ``out`` (markdown) and its heat maps beside it.

    Args:
        run: The pipeline's ``output_dir`` (single or multi-seed).
        out: The markdown file.
        eval_config: The run's evaluation config, which names the primary judge (when the run does
            not record it).
        notes: Appended unchanged if it exists (default ``<out stem>_notes.md``).

    Returns:
        The markdown file written.
    """
    out = Path(out)
    notes_file = Path(notes) if notes else out.with_name(f"{out.stem}_notes.md")
    notes_text = notes_file.read_text(encoding="utf-8") if notes_file.is_file() else None
    text = render(run, out.parent, eval_config, notes_text)
    atomic_write_text(out, text)
    say(f"wrote {out} (and its heat maps in {out.parent})")
    return out
