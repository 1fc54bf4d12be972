"""Safe output writing: every writer of the project goes through these helpers.

The rules (docs/guide/outputs.md, "Safety rules"):

* An output directory is written only if it does not exist, is empty, or carries the project's
  marker file (``antidote_stage.json`` for a stage, :data:`OUTPUT_MARKER` for a tokenizer, judge,
  evaluation or pipeline output, of the same kind) **and** the caller set its overwrite flag. A
  directory without the marker is never replaced, nor one that holds another project output below
  it, nor one holding files the project did not write (the marker lists what it wrote; see
  :mod:`antidote_pl.utils.ownership`).
* An output may not equal, contain or lie inside one of the run's inputs.
* Output parents must exist or be creatable, and be writable; all of this is checked before any
  model or data loads.
* One writer per output: a lock file ``.<name>.lock`` beside it (pid, host) refuses a second one; a
  lock left by a dead process on the same host is taken over.
* Whole directories are replaced atomically (a temporary sibling renamed over the old one), and
  leftovers of an interrupted save (``.<name>.tmp-*``, ``.<name>.old-*``) are removed by the next
  successful save. Created files and directories follow the umask.
* A write that fails for lack of space (or on a read-only or over-quota file system) is one
  :class:`WriteFailed` error naming the output, and leaves neither a half-written output nor a
  new directory holding only its marker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidote_pl.errors import ConfigError, bad_file, bad_value
from antidote_pl.utils.files import looks_local
from antidote_pl.utils.locks import OutputLock, launch_rank_is_zero, real_path
from antidote_pl.utils.ownership import FILES_KEY, describe, foreign_entries, listing, recorded_files

#: Marker of a tokenizer, judge, evaluation or pipeline output directory written by this project.
OUTPUT_MARKER = "antidote_output.json"
#: Marker of a stage output (the same name as :data:`antidote_pl.utils.files.STAGE_FILE`).
STAGE_MARKER = "antidote_stage.json"
MARKERS = (STAGE_MARKER, OUTPUT_MARKER)

PathLike = str | os.PathLike
#: Inputs of a run, ``field -> path`` (or a list of paths, or ``None``), for :func:`check_output_dir`.
Inputs = Mapping[str, Any]


@dataclass(frozen=True)
class OutputRules:
    """When an output directory may be written: the keyword arguments every writer here shares.

    :func:`check_output_dir`, :func:`claim_output_dir`, :func:`atomic_dir` and :func:`writable_dir`
    take them as keyword arguments (``overwrite=True, kind="judge"``) and hold them in this one object,
    so each rule is declared and described once, here. An unknown keyword is a ``TypeError``.

    Attributes:
        overwrite: The caller's overwrite flag.
        flag: How the user sets that flag, for messages.
        marker: The marker file an earlier output of this kind carries. :func:`atomic_dir` writes
            :data:`OUTPUT_MARKER` itself (with ``kind``); any other marker (a stage's) is the writer's.
        inputs: The run's inputs (``field -> path``) the output must stay apart from.
        replace: The writer replaces the directory as a whole (so a project output nested inside it,
            or a file the project did not write, would be lost); ``False`` for writers that add
            files in place (:func:`writable_dir`).
        kind: What the output is (``tokenizer``, ``judge``), recorded in :data:`OUTPUT_MARKER`; an
            earlier :data:`OUTPUT_MARKER` output of another kind is refused. ``None`` accepts any kind.
    """

    overwrite: bool = False
    flag: str = "--overwrite"
    marker: str = OUTPUT_MARKER
    inputs: Inputs | None = None
    replace: bool = True
    kind: str | None = None


# --------------------------------------------------------------------------- permissions
def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_umask(path: PathLike, base: int) -> None:
    # mkdtemp creates 0700 and mkstemp 0600 whatever the umask; outputs are shared like any file.
    os.chmod(path, base & ~current_umask())


# --------------------------------------------------------------------------- paths
def overlap(output: PathLike, other: PathLike) -> str | None:
    """How ``output`` relates to ``other``: ``"is"``, ``"contains"``, ``"lies inside"`` or ``None``."""
    out, inp = real_path(output), real_path(other)
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "lies inside"
    return None


def _looks_local(value: Any) -> bool:
    # Hub names ("org/model") and builder names are not paths; the rule is files.looks_local's.
    return isinstance(value, str | os.PathLike) and bool(os.fspath(value)) and looks_local(os.fspath(value))


def _input_items(inputs: Inputs | None) -> Iterator[tuple[str, Any]]:
    for field, value in (inputs or {}).items():
        if isinstance(value, list | tuple):
            for i, item in enumerate(value):
                yield f"{field}[{i}]", item
        elif value is not None:
            yield field, value


def check_apart_from_inputs(path: PathLike, field: str, inputs: Inputs | None) -> None:
    """Refuses an output that is, contains or lies inside one of the run's local inputs.

    Args:
        path: The output directory.
        field: Its configuration field, for the message.
        inputs: ``field -> path`` (or list of paths); non-local values (hub names) are skipped.

    Raises:
        ConfigError: naming both fields.
    """
    for in_field, value in _input_items(inputs):
        if not _looks_local(value):
            continue
        relation = overlap(path, value)
        if relation is not None:
            raise bad_value(
                field,
                os.fspath(path),
                f"a path apart from the run's inputs, but it {relation} {in_field}={os.fspath(value)!r}",
            )


def _check_parent(final: Path, path: PathLike, field: str) -> None:
    ancestor = final.parent
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link: mkdir would fail late
            raise bad_value(field, os.fspath(path), f"a creatable path, but {ancestor} is a broken link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise bad_value(field, os.fspath(path), f"a directory path, but {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise bad_value(field, os.fspath(path), f"a writable location, but {ancestor} is not writable")


def _nested_output(final: Path) -> Path | None:
    """A project output (marker file) strictly below ``final``, which replacing ``final`` would delete."""
    for root, dirs, files in os.walk(final):
        if Path(root) != final and any(m in files for m in MARKERS):
            return Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return None


def check_output_dir(path: PathLike, field: str, **rules: Any) -> Path:
    """Checks that ``path`` may be written, touching nothing on disk.

    Args:
        path: The output directory.
        field: Its configuration field, for messages (e.g. ``model.output_dir``).
        **rules: The :class:`OutputRules` (``overwrite``, ``flag``, ``marker``, ``inputs``,
            ``replace``, ``kind``).

    Returns:
        The resolved output path.

    Raises:
        ConfigError: naming the field, the path and what is expected.
    """
    return _check(path, field, OutputRules(**rules))


def _check(path: PathLike, field: str, rules: OutputRules) -> Path:
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise bad_value(field, path, "a directory path")
    final = real_path(path)
    check_apart_from_inputs(path, field, rules.inputs)
    _check_parent(final, path, field)
    if _is_new_or_empty(final, path, field):
        return final
    _check_earlier_output(final, path, field, rules)
    return final


def _is_new_or_empty(final: Path, path: PathLike, field: str) -> bool:
    if not final.exists():
        return True
    if not final.is_dir():
        raise bad_value(field, os.fspath(path), "a directory, but it is an existing file")
    try:
        return not any(final.iterdir())
    except OSError as err:
        raise bad_value(field, os.fspath(path), f"a readable directory ({err.strerror})") from err


def _read_marker(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _what_output(final: Path) -> str | None:
    """What project output ``final`` is, by its markers (``None``: not one)."""
    if (final / STAGE_MARKER).is_file():
        return f"an antidote_pl stage output ({STAGE_MARKER})"
    if (final / OUTPUT_MARKER).is_file():
        data = _read_marker(final / OUTPUT_MARKER)
        kind = data.get("kind") if isinstance(data, dict) else None
        return f"an antidote_pl {kind or 'unknown'} output ({OUTPUT_MARKER})"
    return None


def _other_kind(final: Path, marker: str, kind: str | None) -> bool:
    """Whether ``final`` carries ``marker`` but records another kind than ``kind``."""
    if kind is None or marker != OUTPUT_MARKER:
        return False
    data = _read_marker(final / marker)
    return not isinstance(data, dict) or data.get("kind") != kind


def _check_earlier_output(final: Path, path: PathLike, field: str, rules: OutputRules) -> None:
    """Refuses a non-empty directory unless it is an earlier output of this kind and may be replaced."""
    marker = rules.marker
    # A kind is what an OUTPUT_MARKER records; outputs under another marker (stages) have none.
    kind = rules.kind if marker == OUTPUT_MARKER else None
    found = _what_output(final)
    if found is None:
        raise bad_value(
            field,
            os.fspath(path),
            f"a new or empty directory: it holds files but no {marker}, so it is not an output of "
            "antidote_pl and is never written into; choose another directory",
        )
    if not (final / marker).is_file() or _other_kind(final, marker, kind):
        expected = "stage output" if marker == STAGE_MARKER else f"{kind or 'such'} output"
        raise bad_value(
            field,
            os.fspath(path),
            f"a new or empty directory or an earlier {expected}: it is {found}, which this command "
            "never writes into; choose another directory",
        )
    if not rules.overwrite:
        raise bad_value(
            field,
            os.fspath(path),
            f"a new or empty directory: it holds an earlier output; set {rules.flag} true to replace it",
        )
    if not rules.replace:
        return
    nested = _nested_output(final)
    if nested is not None:
        raise bad_value(
            field, os.fspath(path), f"a directory without other outputs inside, but {nested} is one"
        )
    _check_only_ours(final, path, field, marker)


def _check_only_ours(final: Path, path: PathLike, field: str, marker: str) -> None:
    """Refuses to replace an output that holds files the project did not write (they would be lost)."""
    recorded = recorded_files(_read_marker(final / marker))
    if recorded is None:
        raise bad_value(
            field,
            os.fspath(path),
            f"an earlier output whose {marker} lists the files antidote_pl wrote ({FILES_KEY}), but "
            "it was written before outputs recorded them, so files of yours inside could not be told "
            "apart and would be deleted: move out what you keep, delete it, or choose another directory",
        )
    foreign = foreign_entries(final, recorded)
    if foreign:
        raise bad_value(
            field,
            os.fspath(path),
            f"an earlier output holding only files antidote_pl wrote, but it also holds {describe(foreign)}, "
            "which replacing it would delete: move them out, or choose another directory",
        )


def add_output_files(directory: PathLike, *names: str) -> None:
    """Records files the project adds to a finished output (e.g. the pipeline's step marker), so that
    replacing the output later knows them as the project's.

    A no-op for a directory without a marker or whose marker lists no files.
    """
    for marker in MARKERS:
        file = Path(directory) / marker
        data = _read_marker(file) if file.is_file() else None
        files = recorded_files(data)
        if files is None:
            continue
        merged = sorted(set(files) | set(names))
        if merged != files:
            atomic_write_json(file, {**data, FILES_KEY: merged})


def _record_files(directory: Path, marker: str) -> None:
    """Lists every file of a finished write in its marker (the marker included)."""
    data = _read_marker(directory / marker)
    if not isinstance(data, dict):
        raise RuntimeError(f"atomic_dir: the marker {marker} is not a JSON object")
    files = sorted({*listing(directory), marker})
    atomic_write_json(directory / marker, {**data, FILES_KEY: files})


# --------------------------------------------------------------------------- disk errors
#: errno values of a write that failed for the file system, not the program: no space, quota,
#: file too large, read-only.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class WriteFailed(ConfigError):
    """A write that the file system refused (full disk, quota, read-only), naming what was written."""


def _disk_problem(err: BaseException) -> str | None:
    """The file system's reason when ``err`` is a failed write of that kind, else ``None``."""
    if isinstance(err, WriteFailed):
        return _disk_problem(err.__cause__) if err.__cause__ is not None else str(err)
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        return err.strerror or os.strerror(err.errno)
    # Writers in Rust (safetensors) raise their own types with the OS message inside.
    text = str(err)
    return "No space left on device" if "No space left on device" in text or "StorageFull" in text else None


def _write_failed(path: Path, problem: str) -> WriteFailed:
    return WriteFailed(str(bad_file(path, f"could not be written ({problem}); nothing was replaced")))


def claim_output_dir(
    path: PathLike, field: str, *, take_lock: bool | None = None, **rules: Any
) -> OutputLock:
    """Checks an output (:func:`check_output_dir`) and locks it, before any expensive work.

    Args:
        path: The output directory.
        field: Its configuration field, for messages.
        take_lock: Whether this process writes the output and so takes the lock; by default only
            the launch's rank 0 does (:func:`launch_rank_is_zero`: the other ranks would find it
            taken). Inside a running Trainer, pass ``trainer.is_global_zero``.
        **rules: The :class:`OutputRules`.

    Returns:
        The lock, to pass to :func:`atomic_dir` / :func:`writable_dir` and release at the end.
    """
    final = _check(path, field, OutputRules(**rules))
    lock = OutputLock(final, field)
    if launch_rank_is_zero() if take_lock is None else take_lock:
        lock.acquire()
    return lock


def _lock_for(final: Path, field: str, lock: OutputLock | None) -> OutputLock:
    return lock if lock is not None and lock.path == final else OutputLock(final, field)


def _write_marker(directory: Path, kind: str) -> None:
    written = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(directory / OUTPUT_MARKER, {"kind": kind, "written": written})


# --------------------------------------------------------------------------- writers
def _remove_leftovers(final: Path) -> None:
    # Only called under the output's lock, so no other writer's temporary directory is removed.
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    path: PathLike, *, field: str = "output_dir", lock: OutputLock | None = None, **rules: Any
) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``path`` only on success.

    The output is checked (:func:`check_output_dir`) and locked first; an existing directory is
    replaced only when it is an earlier output of this kind (``marker``) and ``overwrite`` is set.

    Args:
        path: Final directory.
        field: Its configuration field, for messages.
        lock: A lock already taken on ``path`` (e.g. by :func:`claim_output_dir`); otherwise one is
            taken for the duration of the write.
        **rules: The :class:`OutputRules` but ``replace`` (this writer always replaces).

    Yields:
        The temporary directory to write into.
    """
    final = real_path(path)
    checked = OutputRules(**rules, replace=True)
    marker = checked.marker
    with _lock_for(final, field, lock):
        _check(path, field, checked)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _chmod_umask(tmp, 0o777)
            yield tmp
            if marker == OUTPUT_MARKER:
                _write_marker(tmp, checked.kind or "output")
            elif not (tmp / marker).is_file():
                raise RuntimeError(f"atomic_dir: the writer did not write its marker {marker}")
            _record_files(tmp, marker)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            problem = _disk_problem(err)
            if problem is None:
                raise
            raise _write_failed(final, problem) from err
        _swap_in(tmp, final)


def _swap_in(tmp: Path, final: Path) -> None:
    """Renames a finished write over ``final`` (the earlier output moved aside, then removed)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _remove_leftovers(final)


@contextlib.contextmanager
def writable_dir(
    path: PathLike, *, kind: str, field: str = "output_dir", lock: OutputLock | None = None, **rules: Any
) -> Iterator[Path]:
    """Yields ``path`` to add or update files in place, for writers that do not replace a directory.

    The same checks as :func:`atomic_dir` (with :data:`OUTPUT_MARKER`), under the lock; the
    directory is created (with its marker) if needed.

    Args:
        path: The output directory.
        kind: What the output is (``evaluation``, ``pipeline``), recorded in the marker.
        field: Its configuration field, for messages.
        lock: A lock already taken on ``path``.
        **rules: ``overwrite``, ``flag`` and ``inputs`` of the :class:`OutputRules` (this writer
            adds files in place, under :data:`OUTPUT_MARKER`).

    Yields:
        The resolved directory.
    """
    final = real_path(path)
    checked = OutputRules(**rules, kind=kind, marker=OUTPUT_MARKER, replace=False)
    with _lock_for(final, field, lock):
        _check(path, field, checked)
        existed, fresh = final.exists(), _is_new_or_empty(final, path, field)
        try:
            mark_output_dir(final, kind)
            yield final
        except BaseException as err:
            if fresh:  # a failed first write leaves no directory holding only its marker
                _unmark_if_bare(final, remove_dir=not existed)
            problem = _disk_problem(err)
            if problem is None:
                raise
            raise _write_failed(final, problem) from err


def _unmark_if_bare(final: Path, remove_dir: bool) -> None:
    with contextlib.suppress(OSError):
        if [p.name for p in final.iterdir()] == [OUTPUT_MARKER]:
            (final / OUTPUT_MARKER).unlink()
        if remove_dir:
            final.rmdir()  # fails, as it should, when the writer left anything else


def mark_output_dir(directory: PathLike, kind: str) -> Path:
    """Creates ``directory`` if needed and gives it the :data:`OUTPUT_MARKER` if it has none."""
    final = Path(directory)
    final.mkdir(parents=True, exist_ok=True)
    if not (final / OUTPUT_MARKER).is_file():
        _write_marker(final, kind)
    return final


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yields a temporary sibling path that replaces the file ``path`` only on success.

    The final file follows the umask (``mkstemp`` alone would leave it 0600).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _chmod_umask(tmp, 0o666)
        os.replace(tmp, final)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        problem = _disk_problem(err)
        if problem is None:
            raise
        raise _write_failed(final, problem) from err


def atomic_write_text(path: PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_png(fig: Any, path: PathLike, dpi: int = 120) -> None:
    """Lays out and saves a matplotlib figure as a PNG, atomically, then closes it.

    Rendered beside the target and renamed, so a reader never sees half a PNG; closing frees the
    figure (pyplot keeps every open figure alive otherwise).
    """
    import matplotlib.pyplot as plt  # heavy and optional: only report writers need it

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
