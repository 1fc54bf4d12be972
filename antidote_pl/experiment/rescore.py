"""Rescore a finished pipeline run's saved answers with another judge, without generating again.

::

    python -m antidote_pl rescore --run outputs/smol/pipeline --out docs/results/smol_lm_judge.md \\
        --judge antidote_pl.judges.lm.LMJudge --judge.path outputs/judges/smollm2

Reads every evaluated variant's ``generations.jsonl`` under ``<run>/seed<N>/results/`` (or
``<run>/results/`` for a single-seed run), judges its harmful rows with ``--judge`` (any
:class:`~antidote_pl.judges.base.Judge`, by ``class_path`` as in the configs) and writes
``<out>.md`` (a table) and ``<out>.json`` (per seed and variant): per variant, HS under the new judge
beside HS under the verdict stored with the answers (the run's primary judge), as mean ± std over
seeds (one seed: the 95% Wilson interval over its prompts), with the prompts per seed and the seeds.
The answers are the run's own, so only the judge differs between the two columns.

A judge's verdicts depend on the torch thread count and on which answers share one call (its float
sums do), so by default rescore judges as the run's evaluation did: with the thread count the
evaluations recorded in their ``metrics.json`` and in their batches (the recorded ``batch_size``,
when the evaluation ran in one process without ``sort_by_length``; else all of a variant's answers
in one call). Rescoring with the run's own primary judge then gives its stored verdicts back exactly.

The outputs follow the project's output rule: each file is written atomically under a lock
(``.<out name>.lock`` beside them); an existing ``<out>.md`` or ``<out>.json`` is replaced only when
this command wrote it (the JSON says ``"kind": "rescore"``, the markdown ends with
:data:`MARKDOWN_MARKER`) and ``--overwrite true`` is set; and ``<out>`` may not lie inside ``--run``
(the run's own ``report.md`` is an input).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from antidote_pl.errors import bad_value, check_int
from antidote_pl.experiment.agreement import read_generations
from antidote_pl.judges.base import Judge
from antidote_pl.utils.console import say
from antidote_pl.utils.files import read_json_file
from antidote_pl.utils.io import OutputLock, atomic_write_json, atomic_write_text, check_apart_from_inputs
from antidote_pl.utils.tables import format_seed_cell, markdown_table, mean_std
from antidote_pl.utils.threads import DEFAULT_THREADS, check_threads, pinned_threads

#: What a rescore report's JSON says it is, so that a rerun knows the file is its own.
KIND = "rescore"
#: The last line of a rescore report's markdown (an HTML comment, invisible when rendered).
MARKDOWN_MARKER = "<!-- written by antidote_pl rescore; replaced by a rerun with --overwrite true -->"


def generation_files(run: str | Path) -> dict[int | None, dict[str, Path]]:
    """``{seed: {variant: generations.jsonl}}`` of a pipeline run (seed ``None`` for a single-seed run).

    Raises:
        ConfigError: when the run holds no evaluated variant.
    """
    root = Path(run)
    seeds = {int(d.name[4:]): d for d in root.glob("seed*") if d.name[4:].isdigit()}
    dirs = {s: d / "results" for s, d in sorted(seeds.items())} or {None: root / "results"}
    found = {
        seed: {g.parent.name: g for g in sorted(results.glob("*/generations.jsonl"))}
        for seed, results in dirs.items()
    }
    if not any(found.values()):
        raise bad_value(
            "--run", str(run), "a pipeline output with <run>/[seed<N>/]results/<variant>/generations.jsonl"
        )
    return found


def _recorded_settings(run: str | Path) -> list[dict[str, Any]]:
    """Every evaluation's ``metrics.json`` in the run (evaluations without one left out)."""
    files = [path.with_name("metrics.json") for v in generation_files(run).values() for path in v.values()]
    return [read_json_file(f, "an evaluation's metrics") for f in files if f.is_file()]


def _one_value(recorded: list[dict[str, Any]], key: str, field: str) -> Any:
    """The single ``key`` the run's evaluations agree on (``None`` when none recorded it)."""
    distinct = sorted({r[key] for r in recorded if key in r}, key=str)
    if len(distinct) > 1:
        raise bad_value(field, None, f"an int >= 1: the run's evaluations recorded {distinct}, so give one")
    return distinct[0] if distinct else None


def judge_settings(
    run: str | Path, threads: int | None = None, batch_size: int | None = None
) -> tuple[int, int | None]:
    """``(threads, batch_size)`` to judge with: the given values (checked), else the run's recorded ones.

    ``batch_size`` ``None`` means all of a variant's answers in one judge call: the default when an
    evaluation recorded no batch size or batched in a way rescore cannot repeat (``sort_by_length``,
    or several processes each judging a shard).

    Raises:
        ConfigError: for a bad value, or when no value is given and the evaluations recorded several.
    """
    recorded = _recorded_settings(run)
    if threads is not None:
        threads = check_threads(threads, "--threads")
    else:
        threads = _one_value(recorded, "threads", "--threads") or DEFAULT_THREADS
    if batch_size is not None:
        check_int("--batch_size", batch_size, 1)
        return threads, batch_size
    repeatable = all(not r.get("sort_by_length") and r.get("world_size", 1) == 1 for r in recorded)
    batch_size = _one_value(recorded, "batch_size", "--batch_size")
    return threads, batch_size if repeatable else None


def rescore(
    run: str | Path,
    judge: Judge,
    log: Callable[[str], None] = lambda _msg: None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Judges every variant's harmful answers again (``log`` gets a line per file, for progress).

    Args:
        run: The pipeline output.
        judge: The judge.
        log: Progress lines.
        batch_size: Answers per judge call, in the file's order (``None``: a variant's all at once).

    Returns:
        ``{"seeds", "variants": {variant: {"n", "harmful_score", "stored_harmful_score"} per seed
        and as mean/std}, "judge"}``; scores in percent.
    """
    per_variant: dict[str, dict[str, Any]] = {}
    files = generation_files(run)
    for seed, variants in files.items():
        for variant, path in variants.items():
            rows = [r for r in read_generations(path) if r.get("kind") == "harmful"]
            if not rows:
                continue
            # The evaluation's harmful prompts come first in its data, so its test batches hold
            # them in consecutive runs of ``batch_size``, as here.
            step = batch_size or len(rows)
            verdicts = [
                verdict
                for start in range(0, len(rows), step)
                for verdict in judge(
                    [r["instruction"] for r in rows[start : start + step]],
                    [r["response"] for r in rows[start : start + step]],
                )
            ]
            entry = per_variant.setdefault(variant, {"per_seed": {}})
            scores = {
                "n": len(rows),
                "harmful_score": 100.0 * sum(v.harmful for v in verdicts) / len(rows),
                "stored_harmful_score": 100.0 * sum(bool(r["verdict"]["harmful"]) for r in rows) / len(rows),
            }
            entry["per_seed"][str(seed)] = scores
            log(f"seed {seed} {variant}: {len(rows)} answers, HS {scores['harmful_score']:.1f}")
    for entry in per_variant.values():
        runs = list(entry["per_seed"].values())
        for key in ("harmful_score", "stored_harmful_score"):
            entry[key], entry[f"{key}_std"] = mean_std([r[key] for r in runs])
    return {"judge": type(judge).__name__, "seeds": list(files), "variants": per_variant}


def rescore_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per variant."""
    rows = []
    for variant, e in sorted(report["variants"].items()):
        runs = list(e["per_seed"].values())
        counts = list(dict.fromkeys(r["n"] for r in runs))
        # One seed: the Wilson interval over its prompts (one interval rule, not "± 0.0").
        count = counts[0] if len(counts) == 1 else None
        rows.append(
            [
                variant,
                ", ".join(str(n) for n in counts),
                len(runs),
                format_seed_cell(e["harmful_score"], e["harmful_score_std"], len(runs), count),
                format_seed_cell(e["stored_harmful_score"], e["stored_harmful_score_std"], len(runs), count),
            ]
        )
    headers = ["variant", "prompts per seed", "seeds", f"HS % ({report['judge']})", "HS % (stored verdict)"]
    seeds = ", ".join(str(s) for s in report["seeds"])
    calls = report.get("batch_size")
    calls = f"{calls} answers per judge call" if calls else "a variant's answers in one judge call"
    return (
        f"# Rescored with {report['judge']}\n\nSeeds: {seeds}; mean ± std over seeds (one seed: the value "
        f"and its 95% Wilson interval over the prompts). Judged with {report.get('threads')} torch "
        f"threads, {calls}.\n\n" + markdown_table(headers, rows)
    )


def report_files(out: str | Path) -> tuple[Path, Path]:
    """``(<out>.json, <out>.md)``: ``out`` with or without a suffix."""
    stem = Path(out).with_suffix("")
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


def _written_here(path: Path) -> bool:
    """Whether an existing report file was written by this command (its marker is there)."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".md":
            return text.rstrip("\n").endswith(MARKDOWN_MARKER)
        return json.loads(text).get("kind") == KIND
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def check_rescore_paths(run: str | Path, out: str | Path, overwrite: bool = False) -> None:
    """Checks the run and the report paths before a judge loads.

    Raises:
        ConfigError: when the run holds no evaluated variant, ``out``'s directory does not exist,
            ``out`` lies inside the run (an input), or a report file exists that this command did
            not write, or did and ``overwrite`` is not set.
    """
    generation_files(run)
    if not Path(out).parent.is_dir():
        raise bad_value("--out", str(out), "a path in an existing directory")
    for path in report_files(out):
        check_apart_from_inputs(path, "--out", {"--run": str(run)})
        if not path.exists():
            continue
        if not _written_here(path):
            raise bad_value(
                "--out", str(out), f"a new report path: {path} exists and was not written by rescore"
            )
        if not overwrite:
            raise bad_value(
                "--out", str(out), f"a new report path: {path} holds an earlier rescore; set --overwrite true"
            )


def write_rescore(
    run: str | Path,
    judge: Judge,
    out: str | Path,
    overwrite: bool = False,
    lock: OutputLock | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Rescores a run (:func:`rescore`, progress through the project's messages) and writes
    ``<out>.json`` and ``<out>.md`` (see the module docstring); returns the report.

    Args:
        run: The pipeline output.
        judge: The judge.
        out: The report path (``.md`` optional).
        overwrite: Replace an earlier report of this command.
        lock: The lock on ``out`` already held (see :func:`rescore_lock`); else one is taken.
        threads: Torch threads while judging (``None``: left as set); recorded in the report.
        batch_size: Answers per judge call (see :func:`rescore`); recorded in the report.
    """
    check_rescore_paths(run, out, overwrite)
    json_file, md_file = report_files(out)
    with lock or rescore_lock(out), pinned_threads(threads):
        check_rescore_paths(run, out, overwrite)  # again under the lock: another writer may have won
        settings = {"threads": torch.get_num_threads(), "batch_size": batch_size}
        report = rescore(run, judge, say, batch_size) | settings | {"run": str(run), "kind": KIND}
        atomic_write_json(json_file, report)
        atomic_write_text(md_file, rescore_markdown(report) + "\n" + MARKDOWN_MARKER + "\n")
    return report


def rescore_lock(out: str | Path) -> OutputLock:
    """The lock of a rescore report (``.<name>.lock`` beside ``<out>.md``), one writer at a time."""
    return OutputLock(Path(out).with_suffix(""), "--out")
