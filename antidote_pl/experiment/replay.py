"""Checking a run's manifest against this checkout, and rerunning the run it records.

::

    python -m antidote_pl.experiment.replay check outputs/tiny/pipeline/manifest.json
    python -m antidote_pl.experiment.replay replay outputs/tiny/pipeline/manifest.json --output_dir DIR \\
        [--check-only] [--force] [--retrain]

``check`` prints what matches and what differs (:func:`antidote_pl.experiment.manifest.check_manifest`) and
exits 1 when anything that determines the result differs. ``replay`` rebuilds the pipeline from the
manifest's ``pipeline`` spec with ``output_dir`` replaced, refuses (exit 1) when ``check`` finds a
difference unless ``--force``, runs it through :func:`antidote_pl.experiment.pipeline.run_pipeline` and says
whether the new ``report.json`` rows equal those of the recorded run (timings excepted). A
multi-seed run writes one manifest per seed (``seed<N>/manifest.json``), each with its seeded specs:
replaying one reruns that seed. ``--retrain`` reruns every stage instead of reusing finished stage
outputs (the pipeline's ``force``).

This module sits above :mod:`antidote_pl.experiment.pipeline` (which imports
:mod:`antidote_pl.experiment.manifest`), so the import graph stays free of cycles.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from antidote_pl.errors import bad_file, bad_value, run_entry_point
from antidote_pl.experiment.manifest import (
    MANIFEST_FILE,
    check_differences,
    check_manifest,
    check_table,
    read_manifest,
)
from antidote_pl.experiment.pipeline import (
    BaselineSpec,
    DurabilitySpec,
    RepairSpec,
    StageSpec,
    run_inputs,
    run_pipeline,
)
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
    print(check_table(items))
    if check_differences(items) and not force:
        print("refusing to replay: the checkout differs from the recorded run (--force to run anyway)")
        return 1
    if check_only:
        return 0
    report = runner(**run, force=retrain)
    return _report_verdict(manifest_path, manifest, report, output_dir)


def _report_verdict(manifest_path: Path, manifest: Mapping[str, Any], report: Any, output_dir: str) -> int:
    recorded = manifest_path.parent / REPORT_FILE
    if not recorded.is_file():
        print(f"replayed into {output_dir}; no {REPORT_FILE} beside the manifest to compare with")
        return 0
    old = read_json_file(recorded, "the recorded run's report")
    diffs = compare_rows(old, str(manifest.get("output_dir", "")), report, output_dir)
    if not diffs:
        print(f"identical: the report rows of {output_dir} equal the recorded run's (timings excepted)")
        return 0
    print(f"DIFFERENT: {len(diffs)} value(s) differ from the recorded run:")
    print("\n".join(f"  {d}" for d in diffs))
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m antidote_pl.experiment.replay`` parser (``check`` and ``replay``)."""
    parser = argparse.ArgumentParser(
        prog="python -m antidote_pl.experiment.replay", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="compare a manifest with this checkout and data")
    check.add_argument("manifest")
    rep = sub.add_parser("replay", help="rerun the recorded pipeline and compare its report")
    rep.add_argument("manifest")
    rep.add_argument("--output_dir", required=True)
    rep.add_argument("--check-only", action="store_true", help="check and validate only, run nothing")
    rep.add_argument("--force", action="store_true", help="run even when the check finds differences")
    rep.add_argument("--retrain", action="store_true", help="rerun every stage (the pipeline's force)")
    return parser


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        items = check_manifest(read_manifest(_manifest_path(args.manifest)))
        print(check_table(items))
        return 1 if check_differences(items) else 0
    return replay(
        args.manifest, args.output_dir, check_only=args.check_only, force=args.force, retrain=args.retrain
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: user-input errors (a missing or invalid manifest) print one line and exit 2."""
    return run_entry_point(_main, argv, prog="antidote_pl.experiment.replay")


if __name__ == "__main__":
    raise SystemExit(main())
