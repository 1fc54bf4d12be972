"""What the pipeline caches, and how a resumed run finds it again.

* :func:`cache_key`: the identity of a step (its inputs' texts, upstream keys, fingerprints), a
  :class:`CacheKey` that also carries the inputs it covers.
* :class:`RunInputs`: the files a step reads and the code it runs, hashed once per run: the local
  data sources of a stage, scoring or evaluation config (nested sources included), the files of the
  evaluation's judges (an OfflineJudge's, LMJudge's or ClassifierJudge's saved directory, a training
  CSV), the sources of the fine-tuned adapter's realignment window, and the code
  (:func:`~antidote_pl.experiment.manifest.code_version`). Every key of the pipeline includes them,
  so a data edit, a judge retrained in place or a code change reruns exactly the steps that read it.
* :class:`StageOutput`: a stage output directory as the pipeline sees it: the finished-step marker
  it writes there (:data:`DONE_FILE`: key, seconds and the inputs the step was computed from), the
  stage's metadata and the fingerprint of the files an evaluation reads.
* :class:`StepTimes`: the seconds of the steps run now and of those reused from earlier runs.
* :class:`ResultCache`: one evaluation result per variant, ``results/<name>/result.json``, reused
  while its key matches, its recorded inputs (and evaluation prompts) match the current ones, its
  content matches the sha256 written beside it and its values are what an evaluation writes
  (:func:`check_result`: rates in [0, 100] with their counts), so an edited file fails naming itself
  before any report is written; it keeps what each result recorded, for the manifest.

What a key covers, and what it does not: the config texts and overrides (in the pipeline's keys),
the files above by content (sha256; files of 256 MB and more by size and modification time), the
package version and the sha256 of the package's Python source. The git commit and dirty flag are
recorded with every result but not keyed: a commit that changes no code (docs, configs, tests)
leaves results valid, while an uncommitted code edit changes the source digest. Library versions
and the machine are recorded in the manifest only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidote_pl.data.records import data_input_paths, source_from_spec, source_paths
from antidote_pl.data.templates import get_template
from antidote_pl.errors import ConfigError, bad_file
from antidote_pl.evaluation.evaluator import EvalDataModule
from antidote_pl.experiment.manifest import code_version, parse_without_model
from antidote_pl.experiment.specs import StageSpec
from antidote_pl.stages.tokenizer import tokenizer_sources
from antidote_pl.utils.console import say
from antidote_pl.utils.files import REALIGNMENT_WINDOW_KEY, looks_local, read_json_file, read_stage_metadata
from antidote_pl.utils.hashing import directory_fingerprint, path_identity
from antidote_pl.utils.io import add_output_files, atomic_write_json
from antidote_pl.utils.memory import release_freed_memory

DONE_FILE = "pipeline_done.json"
# What an evaluation reads from a stage directory; anything else there (e.g. DONE_FILE, which
# carries a timestamp) must not change a result's cache key.
STAGE_FILES = (
    "*.safetensors",
    "antidote_stage.json",
    "adapter_config.json",
    "config.json",
    "mask.json",
    "tokenizer*",
)


class CacheKey(str):
    """A cache key (a short hash) that carries the inputs it covers.

    ``inputs`` is ``{"files": {path: identity}, "code": {...}}`` (and ``"prompts"``, the evaluation
    prompts' fingerprint, for an evaluation): what the keyed step and every step upstream of it read.
    :func:`cache_key` merges the inputs of the keys it is given, so a result's key carries everything
    its value depends on, and a marker or result stores exactly that when it is computed.
    """

    inputs: dict[str, Any]

    def __new__(cls, value: str, inputs: Mapping[str, Any] | None = None) -> CacheKey:
        key = super().__new__(cls, value)
        key.inputs = dict(inputs or {})
        return key


def merge_inputs(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One inputs record from several (files united; the code and prompts of the last that has them)."""
    out: dict[str, Any] = {}
    for record in records:
        files = {**out.get("files", {}), **record.get("files", {})}
        out.update(record)
        if files:
            out["files"] = dict(sorted(files.items()))
    return out


def cache_key(*parts: str) -> CacheKey:
    """A short hash of ``parts`` (each one delimited, so ``("ab", "c")`` differs from ``("a", "bc")``),
    carrying the merged inputs of the parts that are :class:`CacheKey` s."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return CacheKey(h.hexdigest()[:16], merge_inputs(p.inputs for p in parts if isinstance(p, CacheKey)))


def keyed_inputs(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an inputs record that decides a result, and so enters keys and reuse checks
    (``code.commit`` and ``code.dirty`` are recorded for the reader, not keyed; see the module
    docstring)."""
    code = record.get("code") or {}
    return {
        "files": dict(record.get("files") or {}),
        "code": {k: code.get(k) for k in ("package", "source")},
        "prompts": record.get("prompts"),
    }


def inputs_key(record: Mapping[str, Any]) -> CacheKey:
    """A key part standing for an inputs record (see :func:`keyed_inputs`)."""
    return CacheKey(cache_key(json.dumps(keyed_inputs(record), sort_keys=True)), record)


def stale_reason(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """Why a step recorded with ``recorded`` inputs is not valid for ``current`` ones (None if it is).

    Names the first file that changed, appeared or went away, else the code or the prompts.
    """
    if recorded is None:
        return "it records no inputs (written by an older version)"
    old, new = keyed_inputs(recorded), keyed_inputs(current)
    for path in sorted(set(old["files"]) | set(new["files"])):
        if path not in old["files"]:
            return f"{path} is a new input"
        if path not in new["files"]:
            return f"it read {path}, which is no input now"
        if old["files"][path] != new["files"][path]:
            return f"{path} changed since it was computed"
    if old["code"] != new["code"]:
        return f"the code changed since it was computed ({old['code']} -> {new['code']})"
    if old["prompts"] != new["prompts"]:
        return "the evaluation prompts changed since it was computed"
    return None


class RunInputs:
    """The inputs of one run's steps (see the module docstring), each file hashed once per run.

    Each method returns a key part (:class:`CacheKey`) whose ``inputs`` record the files read, by
    path as configured, and :func:`~antidote_pl.experiment.manifest.code_version`.
    """

    def __init__(self) -> None:
        self._identities: dict[str, str] = {}
        self._configs: dict[tuple, tuple[list[str], Any, Any]] = {}

    def stage(self, spec: StageSpec) -> CacheKey:
        """What a training stage reads: its data sources (a tokenizer stage: its corpus's sources)."""
        if spec.command == "tokenizer":
            paths = _source_files(source_paths("sources", tokenizer_sources(spec.configs, spec.overrides)))
            return self._record(paths)
        return self._record(self._config(spec.configs, spec.overrides)[0])

    def step(
        self, configs: Sequence[str], overrides: Sequence[str] = (), adapter: str | Path | None = None
    ) -> CacheKey:
        """What a repair (scoring) run reads: its config's data sources and, with ``adapter``, the
        sources of the realignment window that adapter's fine-tune recorded (the calibration data)."""
        paths = list(self._config(configs, overrides)[0])
        if adapter is not None:
            window = StageOutput(Path(adapter)).metadata("repair adapter").get(REALIGNMENT_WINDOW_KEY) or {}
            # The sources the repair rebuilds from the recorded specs: the files it will read.
            for name, part in window.items():
                if isinstance(part, dict) and isinstance(part.get("source"), dict):
                    source = source_from_spec(part["source"], f"{adapter}: {REALIGNMENT_WINDOW_KEY}.{name}")
                    paths += _source_files(source_paths(name, source))
        return self._record(paths)

    def evaluation(self, config: str | Sequence[str]) -> CacheKey:
        """What an evaluation reads: its data sources, its judges' files and, when the prompts render
        without the model's tokenizer, the prompts themselves (their fingerprint, which the evaluator
        records as ``eval_fingerprint``).

        A judge whose local path does not exist yet is built first (an ``OfflineJudge`` with
        ``train_csv`` trains and saves itself there), so that the first run's key names the files
        every later run finds; a judge that cannot build itself fails here, before any training.
        """
        paths, parsed, datamodule = self._config([config] if isinstance(config, str) else list(config), ())
        judge_paths = [p for spec in _judge_specs(parsed) for p in _judge_files(spec)]
        prompts = None
        if isinstance(datamodule, EvalDataModule) and not get_template(datamodule.template).needs_tokenizer:
            prompts = datamodule.fingerprint()
        return self._record([*paths, *judge_paths], prompts=prompts)

    def _config(self, configs: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], Any, Any]:
        """A config's data source files, parsed config and data module (parsed once per run)."""
        memo = (tuple(map(str, configs)), tuple(overrides))
        if memo not in self._configs:
            # Parsed for its inputs only: its warnings are the step's own, shown when it runs.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parsed, datamodule = parse_without_model(list(configs), overrides)
            files = _source_files(data_input_paths(datamodule)) if datamodule is not None else []
            self._configs[memo] = (files, parsed, datamodule)
        return self._configs[memo]

    def _record(self, paths: Iterable[str], **extra: Any) -> CacheKey:
        files = {}
        for path in dict.fromkeys(_project_path(p) for p in paths):
            if path not in self._identities:
                self._identities[path] = path_identity(path)
            files[path] = self._identities[path]
        record = {"files": dict(sorted(files.items())), "code": code_version()}
        return inputs_key({**record, **{k: v for k, v in extra.items() if v is not None}})


def _project_path(path: str | os.PathLike) -> str:
    """One name per file, however a config or a stage record spells it (``harmful.jsonl``,
    ``outputs/ft/../../harmful.jsonl``, absolute): relative to the working directory inside the
    project (so a copied or moved project keeps its keys), absolute outside it."""
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    cwd = os.getcwd()
    inside = os.path.commonpath([full, cwd]) == cwd
    return os.path.relpath(full, cwd) if inside else full


def _source_files(found: Mapping[str, Any]) -> list[str]:
    """The local paths among ``field -> path(s)`` of record sources (hub names left out)."""
    paths = (p for v in found.values() for p in (v if isinstance(v, list | tuple) else [v]))
    return [str(p) for p in paths if looks_local(str(p))]


def _judge_specs(parsed: Any) -> list[Any]:
    """The ``judge`` and ``extra_judges`` specs (``class_path``, ``init_args``) of an evaluation config."""
    model = parsed.get("model") if parsed is not None else None
    init = model.get("init_args") if model is not None else None
    if init is None:
        return []
    specs = [init.get("judge"), *(init.get("extra_judges") or [])]
    return [s for s in specs if s is not None and s.get("class_path")]


def _judge_files(spec: Any) -> list[str]:
    """The local paths among a judge's arguments (saved weights, training CSV, phrase file)."""
    args = spec.get("init_args")
    args = {} if args is None else args.as_dict() if hasattr(args, "as_dict") else dict(args)
    paths = [v for v in args.values() if isinstance(v, str) and v and looks_local(v)]
    if any(not Path(p).expanduser().exists() for p in paths):
        module, _, name = str(spec.get("class_path")).rpartition(".")
        getattr(importlib.import_module(module), name)(**args)
    return paths


def stage_fingerprint(directory: str | Path) -> str:
    """Identity of the files an evaluation reads from a stage output (weights, metadata, masks)."""
    return directory_fingerprint(directory, STAGE_FILES)


@dataclass(frozen=True)
class StageOutput:
    """A step's output directory (a trained stage, a scoring run, a combined repair).

    Args:
        directory: The directory the step writes.
    """

    directory: Path

    @property
    def marker(self) -> Path:
        """The pipeline's finished-step marker in the directory."""
        return Path(self.directory) / DONE_FILE

    def _marker(self) -> dict[str, Any]:
        return read_json_file(self.marker, "a pipeline step marker") if self.marker.is_file() else {}

    @property
    def done_key(self) -> CacheKey:
        """The key of the finished step (with the inputs it recorded), or ``""`` if none finished here."""
        marker = self._marker()
        return CacheKey(marker.get("key", ""), marker.get("inputs"))

    def is_done(self, key: str) -> bool:
        """Whether the step with ``key`` finished here; when another one did, says why it is stale."""
        done = self.done_key
        if done and done != key:
            current = getattr(key, "inputs", {})
            why = stale_reason(done.inputs or None, current) if current else None
            say(f"{self.directory}: finished with other inputs" + (f": {why}" if why else " (configuration)"))
        return bool(done) and done == key

    def mark_done(self, key: str, seconds: float | None = None) -> None:
        """Marks a finished step, with the seconds it took so that a resumed run's report counts them,
        and the inputs it was computed from (those ``key`` carries)."""
        # Listed in the output's marker first: replacing the stage later must know the file as ours.
        add_output_files(self.directory, DONE_FILE)
        atomic_write_json(
            self.marker,
            {
                "key": key,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seconds": seconds,
                "inputs": getattr(key, "inputs", {}),
            },
        )

    def done_seconds(self) -> float | None:
        """The seconds the finished step took, as recorded."""
        return read_json_file(self.marker, "a pipeline step marker").get("seconds")

    def metadata(self, field: str = "stage") -> dict[str, Any]:
        """The stage's metadata, read by :func:`antidote_pl.utils.files.read_stage_metadata`."""
        return read_stage_metadata(str(self.directory), field)

    def fingerprint(self) -> str:
        """See :func:`stage_fingerprint`."""
        return stage_fingerprint(self.directory)


@dataclass
class StepTimes:
    """Seconds per step: those run now, and those reused with the seconds their run recorded."""

    started: float = field(default_factory=time.perf_counter)
    ran: dict[str, float] = field(default_factory=dict)
    reused: dict[str, float | None] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Records the seconds of ``step`` if it finishes, then returns the memory it freed to the
        operating system (a step's peak would otherwise stay resident through every later step:
        :mod:`antidote_pl.utils.memory`)."""
        t0 = time.perf_counter()
        yield
        self.ran[step] = time.perf_counter() - t0
        release_freed_memory()

    def reuse(self, step: str, seconds: float | None) -> None:
        """Records a step served from an earlier run."""
        self.reused[step] = seconds

    def summary(self) -> dict[str, Any]:
        """The report's timing fields.

        A resumed run reports the whole experiment: this run's wall time plus the recorded seconds
        of the steps it reused (which an earlier run computed).
        """
        now = time.perf_counter() - self.started
        return {
            "seconds_this_run": now,
            "seconds_total": now + sum(v for v in self.reused.values() if v is not None),
            "seconds_by_step": self.ran,
            "seconds_reused_by_step": self.reused,
        }


@dataclass
class ResultCache:
    """Evaluation results under ``directory/<name>/result.json``, each with its key, seconds and the
    inputs it was computed from.

    Args:
        directory: The results directory.
        times: Where the seconds of computed and reused results are recorded (``eval/<name>``).
        force: Recompute every result.
        inputs: What every evaluation reads (:meth:`RunInputs.evaluation`), part of every key.

    Attributes:
        recorded: Result name -> the inputs it recorded when it was computed (for the manifest).
    """

    directory: Path
    times: StepTimes
    force: bool = False
    inputs: CacheKey | None = None
    recorded: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """The result ``name`` for ``key`` (and :attr:`inputs`): reused if recorded with that key and
        its recorded inputs and evaluation prompts still hold, else ``compute(dir)``."""
        key = cache_key(key, self.inputs) if self.inputs is not None else cache_key(key)
        path = self.directory / name / "result.json"
        step = f"eval/{name}"
        if not self.force and path.is_file():
            saved = read_json_file(path, "a cached pipeline result")
            why = self._stale(saved, key)
            if why is None:
                if not isinstance(saved.get("result"), dict):
                    raise bad_file(path, "holds no 'result' object; delete it to recompute it")
                check_result(saved["result"], path)
                if saved.get("sha256", result_digest(saved["result"])) != result_digest(saved["result"]):
                    raise bad_file(
                        path, "its result differs from the one written (sha256); delete it to recompute it"
                    )
                self.times.reuse(step, saved.get("seconds"))
                self.recorded[name] = saved["inputs"]
                return saved["result"]
            say(f"{step}: recomputing: {why}")
        with self.times.timed(step):
            result = compute(self.directory / name)
        record = {
            "key": key,
            "inputs": key.inputs,
            "result": result,
            "seconds": self.times.ran[step],
            "sha256": result_digest(result),
        }
        atomic_write_json(path, record)
        self.recorded[name] = key.inputs
        return result

    @staticmethod
    def _stale(saved: Mapping[str, Any], key: CacheKey) -> str | None:
        """Why a saved result may not be reused for ``key`` (None when it may).

        Besides the key, the inputs the result recorded are compared with the current ones, and
        the prompts the evaluator recorded (``eval_fingerprint``) with the current prompts.
        """
        why = stale_reason(saved.get("inputs"), key.inputs)
        if why is None and saved.get("key") != key:
            why = "its configuration changed"
        prompts = key.inputs.get("prompts")
        result = saved.get("result")
        recorded_prompts = result.get("eval_fingerprint") if isinstance(result, dict) else None
        if why is None and None not in (prompts, recorded_prompts) and prompts != recorded_prompts:
            why = f"its evaluation prompts ({recorded_prompts}) are not the current ones ({prompts})"
        return why


def result_digest(result: dict[str, Any]) -> str:
    """sha256 of a result's canonical JSON, recorded beside it so that a hand edit is noticed."""
    # Hashed as read back from the file (keys as strings, tuples as lists), so a round trip keeps it.
    as_read = json.loads(json.dumps(result, default=str))
    return hashlib.sha256(json.dumps(as_read, sort_keys=True).encode()).hexdigest()


#: Rates of an evaluation result (percent); ``harmful_score/<judge>`` keys are rates too.
RATES = ("harmful_score", "coherent_rate", "finetune_accuracy", "finetune_accuracy_val")


def _is_rate(key: str) -> bool:
    return key in RATES or key.startswith("harmful_score/")


def _percent(value: Any) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and math.isfinite(value) and 0.0 <= value <= 100.0


def check_result(result: Any, path: Path | str, where: str = "result") -> None:
    """Checks a cached result as an evaluation writes it, before a report uses it.

    In every object (the re-attack's curves nest them in lists): a rate is ``null`` or a number in
    [0, 100] and has its count ``n_<rate>``; every ``n_*`` count is a non-negative int; the per-category
    harmful scores are numbers in [0, 100].

    Raises:
        ConfigError: ``<path>: <where>.<key>=<value> ...``, naming the file to delete.
    """
    if isinstance(result, list):
        for i, item in enumerate(result):
            check_result(item, path, f"{where}[{i}]")
        return
    if not isinstance(result, dict):
        return
    problem = _result_problem(result)
    if problem is not None:
        raise ConfigError(
            f"{path}: {where}.{problem}; a cached result must be as its evaluation wrote it: delete the "
            "file to recompute it."
        )
    for key, value in result.items():
        if isinstance(value, dict | list):
            check_result(value, path, f"{where}.{key}")


def _result_problem(result: dict[str, Any]) -> str | None:
    """The first value of one result object that no evaluation writes, described, or ``None``."""
    for key, value in result.items():
        if key.startswith("n_") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{key}={value!r} is not a count (a non-negative int)"
        if _is_rate(key):
            if value is not None and not _percent(value):
                return f"{key}={value!r} is not a rate in [0, 100]"
            if f"n_{key}" not in result:
                return f"{key} has no count n_{key}"
    by_category = result.get("harmful_score_by_category")
    if by_category is not None:
        if not isinstance(by_category, dict):
            return f"harmful_score_by_category={by_category!r} is not a mapping"
        bad = {c: v for c, v in by_category.items() if not (_percent(v) or v is None or _nan(v))}
        if bad:
            return f"harmful_score_by_category={bad!r} holds a value that is not a rate in [0, 100]"
    return None


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
