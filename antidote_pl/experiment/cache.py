"""What the pipeline caches, and how a resumed run finds it again.

* :func:`cache_key`: the identity of a step (its inputs' texts, upstream keys, fingerprints).
* :class:`StageOutput`: a stage output directory as the pipeline sees it: the finished-step marker
  it writes there (:data:`DONE_FILE`, key and seconds), the stage's metadata and the fingerprint of
  the files an evaluation reads.
* :class:`StepTimes`: the seconds of the steps run now and of those reused from earlier runs.
* :class:`ResultCache`: one evaluation result per variant, ``results/<name>/result.json``, reused
  while its key matches, its content matches the sha256 written beside it and its values are what
  an evaluation writes (:func:`check_result`: rates in [0, 100] with their counts), so an edited
  file fails naming itself before any report is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidote_pl.errors import ConfigError, bad_file
from antidote_pl.utils.files import read_json_file, read_stage_metadata
from antidote_pl.utils.hashing import directory_fingerprint
from antidote_pl.utils.io import add_output_files, atomic_write_json

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


def cache_key(*parts: str) -> str:
    """A short hash of ``parts`` (each one delimited, so ``("ab", "c")`` differs from ``("a", "bc")``)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


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

    @property
    def done_key(self) -> str:
        """The key of the finished step, or ``""`` if none finished here."""
        return json.loads(self.marker.read_text()).get("key", "") if self.marker.is_file() else ""

    def is_done(self, key: str) -> bool:
        """Whether the step with ``key`` finished here."""
        return self.marker.is_file() and self.done_key == key

    def mark_done(self, key: str, seconds: float | None = None) -> None:
        """Marks a finished step, with the seconds it took so that a resumed run's report counts them."""
        # Listed in the output's marker first: replacing the stage later must know the file as ours.
        add_output_files(self.directory, DONE_FILE)
        atomic_write_json(
            self.marker, {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds}
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
        """Records the seconds of ``step`` if it finishes."""
        t0 = time.perf_counter()
        yield
        self.ran[step] = time.perf_counter() - t0

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
    """Evaluation results under ``directory/<name>/result.json``, each with its key and seconds.

    Args:
        directory: The results directory.
        times: Where the seconds of computed and reused results are recorded (``eval/<name>``).
        force: Recompute every result.
    """

    directory: Path
    times: StepTimes
    force: bool = False

    def get(self, name: str, key: str, compute: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """The result ``name`` for ``key``: reused if recorded with that key, else ``compute(dir)``."""
        path = self.directory / name / "result.json"
        step = f"eval/{name}"
        if not self.force and path.is_file():
            saved = read_json_file(path, "a cached pipeline result")
            if isinstance(saved, dict) and saved.get("key") == key:
                if not isinstance(saved.get("result"), dict):
                    raise bad_file(path, "holds no 'result' object; delete it to recompute it")
                check_result(saved["result"], path)
                if saved.get("sha256", result_digest(saved["result"])) != result_digest(saved["result"]):
                    raise bad_file(
                        path, "its result differs from the one written (sha256); delete it to recompute it"
                    )
                self.times.reuse(step, saved.get("seconds"))
                return saved["result"]
        with self.times.timed(step):
            result = compute(self.directory / name)
        record = {
            "key": key,
            "result": result,
            "seconds": self.times.ran[step],
            "sha256": result_digest(result),
        }
        atomic_write_json(path, record)
        return result


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
