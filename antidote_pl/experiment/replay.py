"""Checking a run's manifest against this checkout, and rerunning the run it records.

::

    python -m antidote_pl replay check outputs/tiny/pipeline/manifest.json
    python -m antidote_pl replay replay outputs/tiny/pipeline/manifest.json --output_dir DIR \\
        [--check_only true] [--force true] [--retrain true]

``check`` prints what matches and what differs (:func:`antidote_pl.experiment.manifest.check_manifest`:
configs, data files, code, libraries, and the files and code every result recorded when it was
computed) and exits 1 when anything that determines the result differs; a manifest edited by hand
(its pipeline spec included) is refused. ``replay`` rebuilds the pipeline from the manifest's
``pipeline`` spec (methods in the recorded order) with ``output_dir`` replaced, refuses (exit 1) when
``check`` finds a difference unless ``--force true``, runs it through
:func:`antidote_pl.experiment.pipeline.run_pipeline` and says whether the new ``report.json`` is the
same as the recorded run's: rows matched by (method, alpha), every other entry compared too,
timings and the run's own directories excepted. A multi-seed run writes one manifest per seed
(``seed<N>/manifest.json``), each with its seeded specs: replaying one reruns that seed.

What a replay reproduces:

* Without ``--retrain``: the recorded stage outputs (the trained models) are reused where their
  cache keys still match, which needs the same configs, data files and code; everything after them
  (scoring, the sweep, evaluation, baselines' repairs, the re-attack, the report) is computed again
  into ``DIR``. It checks that the repair and evaluation are reproducible from the recorded models.
* With ``--retrain true``, with ``--force true`` over a checkout that differs, or when a recorded
  stage output is gone: every stage is trained again under ``DIR/stages/<stage name>`` (each
  stage's output directory, and every reference to a recorded stage directory in the stages' and
  the repair's configs and overrides, is pointed there), then everything else. It checks that
  training is reproducible too. The recorded run's directories are never written.

Bit-identical numbers need the same torch thread count and CPU type; see README.

This module sits above :mod:`antidote_pl.experiment.pipeline` (which imports
:mod:`antidote_pl.experiment.manifest`), so the import graph stays free of cycles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from antidote_pl.errors import bad_file, bad_value
from antidote_pl.experiment.cache import DONE_FILE
from antidote_pl.experiment.manifest import (
    MANIFEST_FILE,
    check_differences,
    check_manifest,
    check_table,
    read_manifest,
)
from antidote_pl.experiment.pipeline import run_pipeline
from antidote_pl.experiment.specs import (
    BaselineSpec,
    DurabilitySpec,
    RepairSpec,
    StageSpec,
    run_inputs,
    stage_output_dir,
)
from antidote_pl.utils.console import print_result
from antidote_pl.utils.files import read_json_file
from antidote_pl.utils.io import check_output_dir, overlap, real_path

REPORT_FILE = "report.json"
#: Where a retraining replay puts its stages, under its output directory.
STAGES_DIR = "stages"


def _manifest_path(path: str) -> Path:
    p = Path(path)
    return p / MANIFEST_FILE if p.is_dir() else p


def specs_from_manifest(
    manifest: Mapping[str, Any], output_dir: str, path: str = "manifest"
) -> dict[str, Any]:
    """The keyword arguments of :func:`run_pipeline` recorded in a manifest, ``output_dir`` replaced.

    The repair methods keep the order the run used (the manifest's ``methods``): JSON is written
    with sorted keys, and the order decides the report's mask anchor and the order of its rows.

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
    repair = RepairSpec(**spec["repair"])
    order = [m for m in manifest.get("methods") or [] if m in repair.methods]
    repair.methods = {m: repair.methods[m] for m in [*order, *(m for m in repair.methods if m not in order)]}
    return {
        "stages": [stage(s) for s in spec["stages"]],
        "repair": repair,
        "evaluation": spec["evaluation"],
        "output_dir": output_dir,
        "references": spec.get("references"),
        "baselines": baselines,
        "durability": None if durability is None else DurabilitySpec(**durability),
    }


# ------------------------------------------------------------------------------ new stage directories
def recorded_stage_dirs(run: Mapping[str, Any]) -> dict[str, str]:
    """Stage name -> the output directory the recorded run's stage wrote (main and baseline stages)."""
    specs = [*run["stages"], *(s for b in run["baselines"] for s in b.stages)]
    return {s.name: stage_output_dir(s, f"stages.{s.name}") for s in specs}


def relocated(run: Mapping[str, Any], output_dir: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's specs with every stage writing ``<output_dir>/stages/<name>`` instead.

    Each stage's output directory is overridden, and every reference to a recorded stage directory
    (a value in a stage's or the repair's config files, or in their overrides, e.g. the base model
    of the next stage or the repaired adapter) is pointed at the new one, so that the rerun reads
    only the stages it trains.

    Returns:
        ``(run, moves)``: the new keyword arguments of :func:`run_pipeline` and, per recorded stage
        directory, its new one.

    Raises:
        ConfigError: when a config refers to a recorded stage directory where no override can reach
            (inside a list).
    """
    recorded = recorded_stage_dirs(run)
    new_dirs = {name: str(Path(output_dir) / STAGES_DIR / name) for name in recorded}
    moves = {old: new_dirs[name] for name, old in recorded.items()}
    if len(moves) < len(recorded):
        raise bad_value("--retrain", True, f"a run whose stages write distinct directories, not {recorded}")

    def stage(spec: StageSpec) -> StageSpec:
        # The stage's own output is set once, last; any earlier setting of it is dropped.
        flag = "--model.init_args.output_dir" if spec.command == "fit" else "--output_dir"
        args = _without([*_config_refs(spec.configs, moves), *_repointed(spec.overrides, moves)], flag)
        return dataclasses.replace(spec, overrides=[*args, f"{flag}={new_dirs[spec.name]}"])

    repair: RepairSpec = run["repair"]
    moved = {
        **run,
        "stages": [stage(s) for s in run["stages"]],
        "baselines": [dataclasses.replace(b, stages=[stage(s) for s in b.stages]) for b in run["baselines"]],
        "repair": dataclasses.replace(
            repair,
            overrides=[*_config_refs(repair.configs, moves), *_repointed(repair.overrides, moves)],
            method_overrides={m: _repointed(a, moves) for m, a in repair.method_overrides.items()},
        ),
    }
    return moved, moves


def _moved(value: Any, moves: Mapping[str, str]) -> str | None:
    """The new directory of a recorded stage directory ``value`` names (None if it names none)."""
    if not isinstance(value, str) or not value:
        return None
    return next((new for old, new in moves.items() if real_path(value) == real_path(old)), None)


def _repointed(args: Sequence[str], moves: Mapping[str, str]) -> list[str]:
    """Command-line overrides with every recorded stage directory replaced by its new one."""
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        new = _moved(value if eq or not flag else None, moves)
        out.append(arg if new is None else f"{flag}{eq}{new}")
    return out


def _without(args: Sequence[str], flag: str) -> list[str]:
    """Command-line overrides without any setting of ``flag`` (``--flag=v`` or ``--flag v``)."""
    out, skip = [], False
    for arg in args:
        if skip or arg.startswith(f"{flag}="):
            skip = False
            continue
        skip = arg == flag
        if not skip:
            out.append(arg)
    return out


def _config_refs(configs: Sequence[str], moves: Mapping[str, str]) -> list[str]:
    """Overrides pointing every config-file value that names a recorded stage directory at its new one."""
    out = []
    for config in configs:
        for dotted, value in _leaves(yaml.safe_load(Path(config).read_text()) or {}, ""):
            new = _moved(value, moves)
            if new is None:
                continue
            if dotted is None:
                raise bad_value(
                    "--retrain",
                    True,
                    f"configs whose stage directories can be overridden; {config} "
                    f"names {value!r} inside a list",
                )
            out.append(f"--{dotted}={new}")
    return out


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str | None, Any]]:
    """``(dotted key, value)`` of every scalar in a YAML mapping; the key is None inside a list."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for value in node:
            yield from ((None, v) for _, v in _leaves(value, prefix))
    else:
        yield (prefix or None), node


# ------------------------------------------------------------------------------ comparing reports
def _normalised(value: Any, names: Sequence[tuple[str, str]]) -> Any:
    """A report value with timings dropped and each of the run's own directories (``names``: path ->
    placeholder, longest first) written as its placeholder."""
    if isinstance(value, dict):
        return {k: _normalised(v, names) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_normalised(v, names) for v in value]
    if isinstance(value, str):
        for path, name in names:
            value = value.replace(path, name)
        return value
    return value


def _names(output_dir: str, stage_dirs: Mapping[str, str]) -> list[tuple[str, str]]:
    pairs = [(output_dir, "<output_dir>"), *((d, f"<stage {n}>") for n, d in stage_dirs.items())]
    return sorted((p for p in pairs if p[0]), key=lambda p: -len(p[0]))


def _first_differences(a: Any, b: Any, where: str, limit: int = 3) -> list[str]:
    """Up to ``limit`` places where two JSON values differ, as ``where: recorded X, now Y``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _first_differences(a.get(k), b.get(k), f"{where}.{k}", limit - len(out))
            if len(out) >= limit:
                break
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += _first_differences(x, y, f"{where}[{i}]", limit - len(out))
            if len(out) >= limit:
                break
        return out
    return [] if a == b else [f"{where}: recorded {a!r}, now {b!r}"]


def compare_reports(
    old: Mapping[str, Any],
    old_names: Sequence[tuple[str, str]],
    new: Mapping[str, Any],
    new_names: Sequence[tuple[str, str]],
) -> list[str]:
    """Where two reports differ, as lines (empty when the same): rows matched by (method, alpha),
    then every other entry; timings and the runs' own directories (``*_names``) excepted."""
    a, b = _normalised(dict(old), old_names), _normalised(dict(new), new_names)
    rows_a = {(r.get("method"), r.get("alpha")): r for r in a.pop("rows", [])}
    rows_b = {(r.get("method"), r.get("alpha")): r for r in b.pop("rows", [])}
    out = [f"row ({m}, alpha {al}): recorded, missing now" for m, al in rows_a if (m, al) not in rows_b]
    out += [f"row ({m}, alpha {al}): new, not recorded" for m, al in rows_b if (m, al) not in rows_a]
    for (method, alpha), x in rows_a.items():
        y = rows_b.get((method, alpha))
        if y is not None:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            out += [
                f"row ({method}, alpha {alpha}): {k}: recorded {x.get(k)!r}, now {y.get(k)!r}" for k in keys
            ]
    if not out and list(rows_a) != list(rows_b):
        out.append("rows: the same rows in another order")
    for key in sorted(set(a) | set(b)):
        out += _first_differences(a.get(key), b.get(key), key)
    return out


# ------------------------------------------------------------------------------ replay and check
def _check_replay_dir(output_dir: str, manifest_path: Path, run: Mapping[str, Any]) -> None:
    """DIR must be new or the project's own output, apart from the recorded run's directory and its
    stage outputs."""
    if overlap(output_dir, manifest_path.parent) in ("is", "lies inside", "contains"):
        raise bad_value("--output_dir", output_dir, "a directory apart from the recorded run's")
    for name, directory in recorded_stage_dirs(run).items():
        if overlap(output_dir, directory) is not None:
            raise bad_value(
                "--output_dir", output_dir, f"a directory apart from stage {name}'s {directory!r}"
            )
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
        force: Run even when the check finds differences (the stages are then retrained under
            ``output_dir``, as with ``retrain``).
        retrain: Train every stage again, under ``<output_dir>/stages/`` (see the module docstring).
        runner: The pipeline runner (tests pass a stub).

    Returns:
        The exit code: 0 when run (and the same, when a recorded report exists), else 1.
    """
    manifest_path = _manifest_path(path)
    manifest = read_manifest(manifest_path)
    run = specs_from_manifest(manifest, output_dir, str(manifest_path))
    _check_replay_dir(output_dir, manifest_path, run)
    items = check_manifest(manifest)
    print_result(check_table(items))
    differs = bool(check_differences(items))
    if differs and not force:
        print_result(
            "refusing to replay: the checkout differs from the recorded run (--force true to run anyway)"
        )
        return 1
    if check_only:
        return 0
    stage_dirs = recorded_stage_dirs(run)
    old_names = _names(str(manifest.get("output_dir", "")), stage_dirs)
    new_names = _names(output_dir, stage_dirs)
    # A stage is trained again only in a directory of this replay, never the recorded run's.
    gone = [n for n, d in stage_dirs.items() if not (Path(d) / DONE_FILE).is_file()]
    if retrain or differs or gone:
        run, moves = relocated(run, output_dir)
        new_names = _names(output_dir, {name: moves[d] for name, d in stage_dirs.items()})
        print_result(f"retraining every stage under {Path(output_dir) / STAGES_DIR}")
    report = runner(**run, force=retrain)
    return _report_verdict(manifest_path, report, output_dir, old_names, new_names)


def _report_verdict(manifest_path: Path, report: Any, output_dir: str, old_names, new_names) -> int:
    recorded = manifest_path.parent / REPORT_FILE
    if not recorded.is_file():
        print_result(f"replayed into {output_dir}; no {REPORT_FILE} beside the manifest to compare with")
        return 0
    old = read_json_file(recorded, "the recorded run's report")
    diffs = compare_reports(old, old_names, report, new_names)
    if not diffs:
        print_result(f"same: the report of {output_dir} equals the recorded run's (timings excepted)")
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
