"""Checking a run's manifest against this checkout, and rerunning the run it records.

::

    python -m antidote_pl replay check outputs/tiny/pipeline/manifest.json
    python -m antidote_pl replay replay outputs/tiny/pipeline/manifest.json --output_dir DIR \\
        [--check_only true] [--force true] [--retrain true]

``check`` prints what matches and what differs (:func:`antidote_pl.experiment.manifest.check_manifest`) and
exits 1 when anything that determines the result differs. ``replay`` rebuilds the pipeline from the
manifest's ``pipeline`` spec with ``output_dir`` replaced, refuses (exit 1) when ``check`` finds a
difference unless ``--force true``, runs it through :func:`antidote_pl.experiment.pipeline.run_pipeline`
and says whether the new ``report.json`` rows equal those of the recorded run (timings excepted). A
multi-seed run writes one manifest per seed (``seed<N>/manifest.json``), each with its seeded specs:
replaying one reruns that seed. ``--retrain true`` reruns every stage instead of reusing finished stage
outputs (the pipeline's ``force``).

This module sits above :mod:`antidote_pl.experiment.pipeline` (which imports
:mod:`antidote_pl.experiment.manifest`), so the import graph stays free of cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from antidote_pl.errors import bad_file, bad_value
from antidote_pl.experiment.manifest import (
    MANIFEST_FILE,
    check_differences,
    check_manifest,
    check_table,
    read_manifest,
)
from antidote_pl.experiment.pipeline import run_pipeline
from antidote_pl.experiment.specs import BaselineSpec, DurabilitySpec, RepairSpec, StageSpec, run_inputs
from antidote_pl.utils.console import print_result
from antidote_pl.utils.files import read_json_file
from antidote_pl.utils.io import check_output_dir, overlap

REPORT_FILE = "report.json"


def _manifest_path(path: str) -> Path:
    p = Path(path)
    return p / MANIFEST_FILE if p.is_dir() else p


def specs_from_manifest(
    manifest: Mapping[str, Any], output_dir: str, path: str = "manifest"
) -> dict[str, Any]:
    """The keyword arguments of :func:`run_pipeline` recorded in a manifest, ``output_dir`` replaced.

    Raises:
        ConfigError: when the manifest has no ``pipeline`` spec (written before it was recorded).
    """
    spec = manifest.get("pipeline")
    if not isinstance(spec, dict):
        raise bad_file(path, "the manifest records no 'pipeline' spec (written by an older version)")

    def stage(d: Mapping[str, Any]) -> StageSpec:
        return StageSpec(**d)

    baselines = [BaselineSpec(**{**b, "stages": [stage(s) for s in b["stages"]]}) for b in spec["baselines"]]
    durability = spec.get("durability")
    return {
        "stages": [stage(s) for s in spec["stages"]],
        "repair": RepairSpec(**spec["repair"]),
        "evaluation": spec["evaluation"],
        "output_dir": output_dir,
        "references": spec.get("references"),
        "baselines": baselines,
        "durability": None if durability is None else DurabilitySpec(**durability),
    }


def _normalised(value: Any, output_dir: str) -> Any:
    """A report value with timings dropped and the run's own directory written as ``<output_dir>``."""
    if isinstance(value, dict):
        return {k: _normalised(v, output_dir) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_normalised(v, output_dir) for v in value]
    if isinstance(value, str):
        return value.replace(output_dir, "<output_dir>")
    return value


def compare_rows(old: Mapping[str, Any], old_dir: str, new: Mapping[str, Any], new_dir: str) -> list[str]:
    """Where two reports' rows differ (timings excepted), as lines; empty when identical."""
    a, b = _normalised(old.get("rows", []), old_dir), _normalised(new.get("rows", []), new_dir)
    if len(a) != len(b):
        return [f"{len(a)} rows recorded, {len(b)} now"]
    out = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        name = f"row {i} ({x.get('method', '?')}, alpha {x.get('alpha', '?')})"
        out += [f"{name}: {k}: recorded {x.get(k)!r}, now {y.get(k)!r}" for k in keys]
    return out


def _check_replay_dir(output_dir: str, manifest_path: Path, run: Mapping[str, Any]) -> None:
    """DIR must be new or the project's own output, and not the recorded run's directory."""
    if overlap(output_dir, manifest_path.parent) in ("is", "lies inside", "contains"):
        raise bad_value("--output_dir", output_dir, "a directory apart from the recorded run's")
    inputs = run_inputs(run["stages"], run["repair"], run["evaluation"], run["baselines"])
    check_output_dir(output_dir, "--output_dir", overwrite=True, inputs=inputs, replace=False)


def replay(
    path: str,
    output_dir: str,
    *,
    check_only: bool = False,
    force: bool = False,
    retrain: bool = False,
    runner: Callable[..., dict[str, Any]] = run_pipeline,
) -> int:
    """Checks a manifest, reruns its pipeline into ``output_dir`` and compares the reports.

    Args:
        path: The manifest (or its directory).
        output_dir: Where the rerun goes: a new directory or an earlier pipeline output.
        check_only: Only check and validate, run nothing.
        force: Run even when the check finds differences.
        retrain: Rerun every stage (the pipeline's ``force``).
        runner: The pipeline runner (tests pass a stub).

    Returns:
        The exit code: 0 when run (and identical, when a recorded report exists), else 1.
    """
    manifest_path = _manifest_path(path)
    manifest = read_manifest(manifest_path)
    run = specs_from_manifest(manifest, output_dir, str(manifest_path))
    _check_replay_dir(output_dir, manifest_path, run)
    items = check_manifest(manifest)
    print_result(check_table(items))
    if check_differences(items) and not force:
        print_result(
            "refusing to replay: the checkout differs from the recorded run (--force true to run anyway)"
        )
        return 1
    if check_only:
        return 0
    report = runner(**run, force=retrain)
    return _report_verdict(manifest_path, manifest, report, output_dir)


def _report_verdict(manifest_path: Path, manifest: Mapping[str, Any], report: Any, output_dir: str) -> int:
    recorded = manifest_path.parent / REPORT_FILE
    if not recorded.is_file():
        print_result(f"replayed into {output_dir}; no {REPORT_FILE} beside the manifest to compare with")
        return 0
    old = read_json_file(recorded, "the recorded run's report")
    diffs = compare_rows(old, str(manifest.get("output_dir", "")), report, output_dir)
    if not diffs:
        print_result(
            f"identical: the report rows of {output_dir} equal the recorded run's (timings excepted)"
        )
        return 0
    print_result(f"DIFFERENT: {len(diffs)} value(s) differ from the recorded run:")
    print_result("\n".join(f"  {d}" for d in diffs))
    return 1


def check(path: str) -> int:
    """Prints how a manifest (or its directory) compares with this checkout and its data.

    Returns:
        The exit code: 1 when anything that determines the result differs, else 0.
    """
    items = check_manifest(read_manifest(_manifest_path(path)))
    print_result(check_table(items))
    return 1 if check_differences(items) else 0
