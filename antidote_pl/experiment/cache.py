"""What the pipeline caches, and how a resumed run finds it again.

* :func:`cache_key`: the identity of a step (its inputs' texts, upstream keys, fingerprints).
* :class:`StageOutput`: a stage output directory as the pipeline sees it: the finished-step marker
  it writes there (:data:`DONE_FILE`, key and seconds), the stage's metadata and the fingerprint of
  the files an evaluation reads.
* :class:`StepTimes`: the seconds of the steps run now and of those reused from earlier runs.
* :class:`ResultCache`: one evaluation result per variant, ``results/<name>/result.json``, reused
  while its key matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            if saved.get("key") == key:
                self.times.reuse(step, saved.get("seconds"))
                return saved["result"]
        with self.times.timed(step):
            result = compute(self.directory / name)
        atomic_write_json(path, {"key": key, "result": result, "seconds": self.times.ran[step]})
        return result
