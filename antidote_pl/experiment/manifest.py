"""Reproducibility manifest: one ``manifest.json`` per pipeline run, enough to rerun it.

It records

* ``configs``: every config the run used (path, overrides, full text and its sha256);
* ``data``: per data module, its local data files (sha256), the description and content fingerprint
  of each source, and the exact record indices of every window drawn from them (harmful, task,
  realignment, task calibration, validation; evaluation harmful, task and FA-validation questions);
* ``stages``: per stage output, its resolved ``config.yaml`` (sha256), base model source (and, for a
  local or GGUF base, its hash), merged adapters, recorded data counts, the weight dtype, trainer
  precision and torch thread count it was trained with, and a fingerprint of its files;
* ``seeds``, ``libraries`` (torch, lightning, transformers, peft, datasets, python, ...), ``machine``
  (platform, CPU count, accelerator) and ``git`` (commit and dirty flag; ``None`` outside a git
  repository or without git); :func:`code_version` adds the package version and a digest of its
  source, which the pipeline's cache keys use.

Indices are positions in the record list the source yields (``Source.load()``, in order). A window
record is located by its content (instruction, input, output); when a pool holds exact duplicates the
first unused one is taken, which names an identical record.

A pipeline run also records its own spec under ``pipeline`` (stages, repair, evaluation, references,
baselines, durability, output_dir), from which :mod:`antidote_pl.experiment.replay` rebuilds it, and
under ``inputs``, per result (``none``, ``wanda_a0.1``, ``ref_aligned``, ...), the files and code it was
computed from, as stored with the cached result when it was computed (not the current files; see
:mod:`antidote_pl.experiment.cache`).

:func:`write_manifest` seals the manifest (:data:`SEAL`, the sha256 of its content) and
:func:`read_manifest` refuses one whose content no longer matches: a hand-edited spec or record is
not the run's.

Entry points: :func:`build_manifest`, :func:`write_manifest` (atomic), :func:`read_manifest`,
:func:`datamodule_from_config` to get a config's data module without loading its model, and
:func:`check_manifest` / :func:`check_table` to compare a manifest with the current checkout::

    python -m antidote_pl replay check MANIFEST
    python -m antidote_pl replay replay MANIFEST --output_dir DIR [--check_only true] [--force true]
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from antidote_pl.data.records import Record, Source, data_input_paths, fingerprint_records
from antidote_pl.errors import ConfigError, bad_file, bad_value
from antidote_pl.evaluation.evaluator import EvalDataModule
from antidote_pl.stages.cli import AntidoteCLI
from antidote_pl.training.datamodules import HarmfulFinetuneDataModule
from antidote_pl.utils.files import read_json_file, read_stage_metadata
from antidote_pl.utils.hashing import directory_fingerprint, file_identity, path_identity
from antidote_pl.utils.io import atomic_write_json

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2
#: The field that seals a written manifest: the sha256 of everything else in it.
SEAL = "manifest_sha256"
LIBRARIES = ("torch", "lightning", "transformers", "peft", "datasets", "safetensors", "numpy", "jsonargparse")
# The files of a stage output that define it (weights, metadata, tokenizer, masks).
STAGE_PATTERNS = ("*.safetensors", "*.json", "tokenizer*", "*.gguf")


# ------------------------------------------------------------------------------ environment
def git_state(repo_dir: str | os.PathLike = ".") -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git work tree at ``repo_dir``; both ``None`` when unknown.

    ``dirty`` ignores untracked files. Outside a repository, or without a ``git`` executable, the
    entry says why in ``note`` instead of failing.
    """

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=30, check=False
        )

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None, "note": "not a git repository (or no commit yet)"}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        return {"commit": None, "dirty": None, "note": f"git unavailable ({type(err).__name__})"}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


#: The package whose source decides every result (this module's package).
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def source_digest(package_dir: str | os.PathLike = PACKAGE_DIR) -> str:
    """One sha256 over the package's Python files (relative paths and bytes): the code as it runs."""
    root = Path(package_dir)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def code_version() -> dict[str, Any]:
    """The code this process computes with: ``package`` (its version), ``source``
    (:func:`source_digest`), ``commit`` and ``dirty`` (:func:`git_state`; ``"unknown"`` without git).

    Computed once per process: the modules are imported once, so an edit made while a run goes on
    does not change the code that run executes.
    """
    try:
        version = importlib.metadata.version(PACKAGE_DIR.name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    git = git_state(PACKAGE_DIR)
    return {
        "package": version,
        "source": source_digest(PACKAGE_DIR),
        "commit": git["commit"] or "unknown",
        "dirty": "unknown" if git["dirty"] is None else git["dirty"],
    }


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on (``None`` if not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """Platform, CPU count and accelerator of this machine."""
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if cuda else "cpu",
        "accelerators": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "cuda": torch.version.cuda,
    }


# ------------------------------------------------------------------------------ files and configs
def text_sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def config_entry(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A config file's path, overrides, text and sha256."""
    p = Path(path)
    if not p.is_file():
        raise bad_value("manifest.configs", str(path), "an existing config file")
    text = p.read_text(encoding="utf-8")
    return {"path": str(path), "overrides": list(overrides), "sha256": text_sha256(text), "text": text}


def file_entries(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Path, size and sha256 of each file (size and mtime for very large ones, see ``file_identity``)."""
    out = []
    for path in paths:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            exists = f.is_file()
            out.append(
                {"path": str(f), "bytes": f.stat().st_size if exists else None, "sha256": file_identity(f)}
            )
    return out


# ------------------------------------------------------------------------------ data windows
def _content(record: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(record.get("instruction", "")), str(record.get("input", "")), str(record.get("output", "")))


def window_indices(
    selected: Sequence[Record], pool: Sequence[Record], what: str, exact: bool = True
) -> list[int]:
    """Index in ``pool`` of each selected record, matched by content (duplicates: first unused).

    Args:
        selected: The window's records, in the order the data module uses them.
        pool: The records the source yields, in order.
        what: Window name, for the error.
        exact: Match on instruction, input and output; ``False`` matches instruction and input only
            (evaluation items carry no output).

    Raises:
        ConfigError: if a selected record is not in the pool (the source changed since).
    """
    key = _content if exact else (lambda r: _content(r)[:2])
    free: dict[tuple, list[int]] = {}
    for i, r in enumerate(pool):
        free.setdefault(key(r), []).append(i)
    out = []
    for r in selected:
        slots = free.get(key(r))
        if not slots:
            raise ConfigError(f"manifest: a record of window {what!r} is not in its source: {key(r)[:2]!r}")
        out.append(slots.pop(0))
    return out


def _source_entry(source: Source, records: Sequence[Record]) -> dict[str, Any]:
    return {
        "source": source.describe(),
        "n_records": len(records),
        "fingerprint": fingerprint_records(list(records)),
    }


def _finetune_windows(dm: HarmfulFinetuneDataModule) -> dict[str, Any]:
    """Indices in the mixture's order: training records first, then the validation hold-out."""
    pool, tasks = dm.harmful.load(), dm.task.load()
    windows, held_out = {}, {}
    for name, harmful, source in (("harmful", True, pool), ("task", False, tasks)):
        train = [r for r in dm.train_records if r["harmful"] is harmful]
        val = [r for r in dm.val_records if r["harmful"] is harmful]
        windows[name] = window_indices(train + val, source, name)
        held_out[name] = len(val)
    windows["realignment"] = window_indices(dm.realignment_records, pool, "realignment")
    windows["task_calibration"] = window_indices(dm.task_calibration_records, tasks, "task_calibration")
    return {
        "pools": {"harmful": _source_entry(dm.harmful, pool), "task": _source_entry(dm.task, tasks)},
        "windows": windows,
        # The last n of the harmful and task windows are the validation hold-out (val_size).
        "validation_tail": held_out,
    }


def _eval_windows(dm: EvalDataModule) -> dict[str, Any]:
    dm.setup()
    pools, windows = {}, {}
    for kind, source in (
        ("harmful", dm.harmful),
        ("task", dm.task),
        ("task_val", dm.task_validation or dm.task),
    ):
        items = [i for i in dm.items if i["kind"] == kind]
        if source is None or not items:
            continue
        records = source.load()
        pools[kind] = _source_entry(source, records)
        windows[kind] = window_indices(items, records, kind, exact=False)
    return {"pools": pools, "windows": windows}


def data_windows(datamodule: Any) -> dict[str, Any]:
    """Data files (sha256), sources and the record indices of every window of a data module.

    Handles :class:`HarmfulFinetuneDataModule` (harmful, task, realignment, task calibration and
    validation windows) and :class:`EvalDataModule` (harmful, task and FA-validation questions);
    other record data modules report their training and validation sizes.
    """
    files = sorted(
        {str(p) for v in data_input_paths(datamodule).values() for p in (v if isinstance(v, list) else [v])}
    )
    entry: dict[str, Any] = {"class": type(datamodule).__name__, "files": file_entries(files)}
    if isinstance(datamodule, HarmfulFinetuneDataModule):
        entry.update(_finetune_windows(datamodule), seed=datamodule.batcher.seed, counts=datamodule.counts())
    elif isinstance(datamodule, EvalDataModule):
        entry.update(_eval_windows(datamodule))
    elif callable(getattr(datamodule, "counts", None)):
        entry.update(counts=datamodule.counts())
    return entry


class _DataOnlyCLI(AntidoteCLI):
    """Parses a config and builds everything but the model (so no weights are loaded)."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        cheap = cfg.clone()
        cheap["model"] = None
        self.config_init = self._parser(self.subcommand).instantiate_classes(cheap)
        self.datamodule = self.config_init.get("data")


def parse_without_model(
    config: str | os.PathLike | Sequence[str | os.PathLike], overrides: Sequence[str] = ()
) -> tuple[Any, Any]:
    """A stage or evaluation config (one file, or several composed in order, with overrides) parsed,
    and its data module built, without loading the model.

    Returns:
        ``(config, datamodule)``: the parsed namespace (e.g. ``config.model.init_args.judge``) and
        the data module (``None`` for a config without a ``data:`` section).
    """
    files = [config] if isinstance(config, str | os.PathLike) else list(config)
    args = [a for f in files for a in ("--config", str(f))]
    cli = _DataOnlyCLI(args=[*args, *overrides], run=False, save_config_callback=None)
    parsed = cli.config.get(cli.subcommand, cli.config) if cli.subcommand else cli.config
    return parsed, cli.datamodule


def datamodule_from_config(
    config: str | os.PathLike | Sequence[str | os.PathLike], overrides: Sequence[str] = ()
) -> Any:
    """The data module of a stage or evaluation config (one file, or several composed in order, with
    overrides), without loading the model."""
    datamodule = parse_without_model(config, overrides)[1]
    if datamodule is None:
        raise bad_value("manifest.configs", str(config), "a config with a `data:` section")
    return datamodule


# ------------------------------------------------------------------------------ stages and models
def _model_source(spec: Any) -> dict[str, Any]:
    """A model spec and, when it is a local file or directory, the hash of its files."""
    if not isinstance(spec, str):
        return {"spec": spec, "hash": None}  # a random-init config (dict) or nothing
    p = Path(spec).expanduser()
    if p.is_file():
        return {"spec": spec, "hash": file_identity(p)}
    if p.is_dir():
        return {"spec": spec, "hash": directory_fingerprint(p, STAGE_PATTERNS)}
    return {"spec": spec, "hash": None}  # a hub name: its revision is the hub's


def stage_entry(directory: str | os.PathLike) -> dict[str, Any]:
    """A stage output's identity: its resolved config, base model, adapters, data counts, files."""
    d = Path(directory)
    meta = read_stage_metadata(str(d), "manifest.stages")
    config = d / "config.yaml"
    text = config.read_text(encoding="utf-8") if config.is_file() else None
    return {
        "path": str(d),
        "kind": meta.get("kind"),
        "fingerprint": directory_fingerprint(d, STAGE_PATTERNS),
        "config_sha256": None if text is None else text_sha256(text),
        "config": text,
        "base_model": _model_source(meta.get("base_model")),
        "base_source": meta.get("base_source"),
        "base_weights": meta.get("base_weights"),
        "merged_adapters": [_model_source(a) for a in meta.get("merged_adapters") or []],
        "data": meta.get("data"),
        "global_step": meta.get("global_step"),
        # How it was computed (None for stages written before these were recorded).
        **{k: meta.get(k) for k in ("dtype", "precision", "threads", "deterministic_algorithms")},
    }


# ------------------------------------------------------------------------------ the manifest
def build_manifest(
    configs: Mapping[str, str | tuple[str, Sequence[str]]],
    datamodules: Mapping[str, Any] | None = None,
    stages: Mapping[str, str] | None = None,
    seeds: Any = None,
    extra: Mapping[str, Any] | None = None,
    repo_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Builds the manifest of one run (see the module docstring).

    Args:
        configs: Name -> config path, or ``(path, overrides)``, for every config the run used
            (stages, repair, method fragments, evaluation, the pipeline config itself).
        datamodules: Name -> data module (e.g. from :func:`datamodule_from_config`) whose windows
            are recorded.
        stages: Name -> stage output directory.
        seeds: The run's seeds (any JSON value, e.g. ``{"seed_everything": 42, "data": 42}``).
        extra: More JSON entries (e.g. the pipeline's alphas and methods).
        repo_dir: Where to read the git state (default: this package's source tree).

    Returns:
        A JSON-serialisable dict.
    """
    repo = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[1]
    return {
        "manifest_version": MANIFEST_VERSION,
        "configs": {
            name: config_entry(*((spec,) if isinstance(spec, str | os.PathLike) else spec))
            for name, spec in configs.items()
        },
        "data": {name: data_windows(dm) for name, dm in (datamodules or {}).items()},
        "stages": {name: stage_entry(d) for name, d in (stages or {}).items()},
        "seeds": seeds,
        "libraries": library_versions(),
        "machine": machine_info(),
        "git": git_state(repo),
        **dict(extra or {}),
    }


def _seal(manifest: Mapping[str, Any]) -> str:
    """The sha256 of a manifest's JSON content (its keys sorted, the seal itself left out)."""
    content = {k: v for k, v in manifest.items() if k != SEAL}
    return text_sha256(json.dumps(content, sort_keys=True, default=str, separators=(",", ":")))


def write_manifest(manifest: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Writes the manifest as JSON, atomically and sealed (:data:`SEAL`); ``path`` may be a directory
    (``manifest.json`` in it)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    # Through JSON first, so the seal covers exactly what a reader gets back.
    plain = json.loads(json.dumps({k: v for k, v in manifest.items() if k != SEAL}, default=str))
    atomic_write_json(p, {**plain, SEAL: _seal(plain)})
    return p


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks a manifest written by :func:`write_manifest` (a file or its directory).

    Returns:
        The manifest, without its seal.

    Raises:
        ConfigError: for a missing or invalid file, another manifest version, or a manifest whose
            content no longer matches its seal (edited by hand: the pipeline spec, the recorded
            inputs or anything else it certifies).
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_FILE
    manifest = read_json_file(p, "a run manifest (manifest.json)")
    if not isinstance(manifest, dict) or "manifest_version" not in manifest:
        raise bad_file(p, "not a run manifest (no 'manifest_version')")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise bad_file(
            p, f"manifest version {manifest['manifest_version']}, this code reads {MANIFEST_VERSION}"
        )
    if manifest.pop(SEAL, None) != _seal(manifest):
        raise bad_file(p, f"its content does not match its {SEAL} (edited by hand?)")
    for name, entry in manifest.get("configs", {}).items():
        if text_sha256(entry["text"]) != entry["sha256"]:
            raise bad_file(p, f"config {name!r}: its text does not match its sha256 (edited by hand?)")
    return manifest


# ------------------------------------------------------------------------------ checking a manifest
#: What ``check`` compares: configs, data files, code (git, and the source each result was computed
#: with), libraries and the files each result read decide a result; the machine is shown for
#: information only.
DECIDING = ("config", "data", "git", "library", "input", "code")


def _item(kind: str, name: str, recorded: Any, current: Any, status: str | None = None) -> dict[str, Any]:
    status = status or ("match" if recorded == current else "differs")
    return {"kind": kind, "name": name, "status": status, "recorded": recorded, "current": current}


def _current_sha(path: str, identity: bool) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None  # shown as a difference: the file is gone
    return file_identity(p) if identity else text_sha256(p.read_text(encoding="utf-8"))


def _git_item(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> dict[str, Any]:
    """Same commit and both work trees clean; unknown (no git) on either side is shown, not judged."""
    rec = dict(recorded or {})
    shown = (
        f"{rec.get('commit')} dirty={rec.get('dirty')}",
        f"{current.get('commit')} dirty={current.get('dirty')}",
    )
    if rec.get("commit") is None or current.get("commit") is None:
        return _item("git", "commit", *shown, status="unknown")
    same = rec["commit"] == current["commit"] and rec.get("dirty") is False and current.get("dirty") is False
    return _item("git", "commit", *shown, status="match" if same else "differs")


def check_manifest(
    manifest: Mapping[str, Any], repo_dir: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Compares a manifest with the current checkout and data, item by item.

    Config files (sha256 of their text), the data modules' files (``data.<name>.files``), the git
    commit and dirty flag (a dirty tree on either side is a difference: its code is not known), the
    files and code each result was computed from (``inputs``, :func:`result_input_items`) and the
    library versions. Paths are read as recorded (relative ones from the working directory).

    Args:
        manifest: A manifest from :func:`read_manifest`.
        repo_dir: Where to read the current git state (default: this package's source tree).

    Returns:
        One dict per item: ``kind`` (see :data:`DECIDING`, or ``machine``), ``name``, ``status``
        (``match``, ``differs``, ``unknown`` or ``info``), ``recorded`` and ``current``.
    """
    items = [
        _item("config", name, e["sha256"], _current_sha(e["path"], identity=False))
        for name, e in manifest.get("configs", {}).items()
    ]
    for data in manifest.get("data", {}).values():
        for f in data.get("files", []):
            items.append(_item("data", f["path"], f["sha256"], _current_sha(f["path"], identity=True)))
    repo = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[1]
    items.append(_git_item(manifest.get("git"), git_state(repo)))
    items += result_input_items(manifest.get("inputs") or {})
    recorded_libs = manifest.get("libraries", {})
    current_libs = library_versions([n for n in recorded_libs if n != "python"])
    items += [_item("library", n, v, current_libs.get(n)) for n, v in recorded_libs.items()]
    machine, now = manifest.get("machine", {}), machine_info()
    items += [
        _item("machine", k, machine.get(k), now.get(k), status="info") for k in ("device", "accelerators")
    ]
    return items


def result_input_items(inputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The files and code each result recorded when it was computed (``inputs``: result name ->
    ``{"files": {path: identity}, "code": {...}}``, see :mod:`antidote_pl.experiment.cache`), against
    the current files and code.

    One item per file and recorded identity (a file recorded in two versions by different results
    gives two items, at least one of which differs), and one per recorded source digest.
    """
    by_path: dict[str, dict[str, list[str]]] = {}
    sources: dict[str, list[str]] = {}
    for name, record in inputs.items():
        for path, identity in (record.get("files") or {}).items():
            by_path.setdefault(path, {}).setdefault(identity, []).append(name)
        source = (record.get("code") or {}).get("source")
        if source is not None:
            sources.setdefault(source, []).append(name)
    items = []
    for path, identities in sorted(by_path.items()):
        current = path_identity(path)
        for identity, names in identities.items():
            label = path if len(identities) == 1 else f"{path} ({len(names)} results)"
            items.append(_item("input", label, identity, current))
    now = code_version()["source"]
    for source, names in sources.items():
        label = "source" if len(sources) == 1 else f"source ({len(names)} results)"
        items.append(_item("code", label, source, now))
    return items


def check_differences(items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The items of :func:`check_manifest` that decide a result and differ."""
    return [i for i in items if i["kind"] in DECIDING and i["status"] == "differs"]


def _short(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= 24 else text[:21] + "..."


def check_table(items: Sequence[Mapping[str, Any]]) -> str:
    """The check as a short plain-text table, then a verdict line naming every difference."""
    lines = [f"{'status':8} {'kind':8} {'name':36} {'recorded':24} {'current':24}"]
    for i in items:
        name = i["name"] if len(i["name"]) <= 36 else "..." + i["name"][-33:]
        lines.append(
            f"{i['status']:8} {i['kind']:8} {name:36} {_short(i['recorded']):24} {_short(i['current'])}"
        )
    differs = check_differences(items)
    if not differs:
        return "\n".join([*lines, "OK: everything that determines the result matches."])
    lines.append(f"DIFFERS: {len(differs)} item(s) that determine the result:")
    lines += [f"  {i['kind']} {i['name']}: recorded {i['recorded']}, current {i['current']}" for i in differs]
    return "\n".join(lines)
