"""Safe output writing: every writer of the project goes through these helpers.

The rules (docs/guide/outputs.md, "Safety rules"):

* An output directory is written only if it does not exist, is empty, or carries the project's
  marker file (``antidote_stage.json`` for a stage, :data:`OUTPUT_MARKER` for a tokenizer, judge,
  evaluation or pipeline output) **and** the caller set its overwrite flag. A directory without the
  marker is never replaced, nor one that holds another project output below it.
* An output may not equal, contain or lie inside one of the run's inputs.
* Output parents must exist or be creatable, and be writable; all of this is checked before any
  model or data loads.
* One writer per output: a lock file ``.<name>.lock`` beside it (pid, host) refuses a second one; a
  lock left by a dead process on the same host is taken over.
* Whole directories are replaced atomically (a temporary sibling renamed over the old one), and
  leftovers of an interrupted save (``.<name>.tmp-*``, ``.<name>.old-*``) are removed by the next
  successful save. Created files and directories follow the umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from antidote_pl.errors import ConfigError, bad_value
from antidote_pl.utils.files import looks_local

#: Marker of a tokenizer, judge, evaluation or pipeline output directory written by this project.
OUTPUT_MARKER = "antidote_output.json"
#: Marker of a stage output (the same name as :data:`antidote_pl.utils.files.STAGE_FILE`).
STAGE_MARKER = "antidote_stage.json"
MARKERS = (STAGE_MARKER, OUTPUT_MARKER)

PathLike = str | os.PathLike
#: Inputs of a run, ``field -> path`` (or a list of paths, or ``None``), for :func:`check_output_dir`.
Inputs = Mapping[str, Any]


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
def real_path(path: PathLike) -> Path:
    """``path`` with ``~`` expanded and symlinks resolved (it need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


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


def check_output_dir(
    path: PathLike,
    field: str,
    *,
    overwrite: bool = False,
    flag: str = "--overwrite",
    marker: str = OUTPUT_MARKER,
    inputs: Inputs | None = None,
    replace: bool = True,
) -> Path:
    """Checks that ``path`` may be written, touching nothing on disk.

    Args:
        path: The output directory.
        field: Its configuration field, for messages (e.g. ``model.output_dir``).
        overwrite: The caller's overwrite flag.
        flag: How the user sets that flag, for messages.
        marker: The marker file an earlier output of this kind carries.
        inputs: The run's inputs (``field -> path``) the output must stay apart from.
        replace: The writer replaces the directory as a whole (so a project output nested inside it
            would be lost); ``False`` for writers that add files in place.

    Returns:
        The resolved output path.

    Raises:
        ConfigError: naming the field, the path and what is expected.
    """
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise bad_value(field, path, "a directory path")
    final = real_path(path)
    check_apart_from_inputs(path, field, inputs)
    _check_parent(final, path, field)
    if _is_new_or_empty(final, path, field):
        return final
    _check_earlier_output(final, path, field, overwrite=overwrite, flag=flag, marker=marker, replace=replace)
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


def _check_earlier_output(
    final: Path, path: PathLike, field: str, *, overwrite: bool, flag: str, marker: str, replace: bool
) -> None:
    """Refuses a non-empty directory unless it is an earlier output of this kind and may be replaced."""
    if not (final / marker).is_file():
        raise bad_value(
            field,
            os.fspath(path),
            f"a new or empty directory: it holds files but no {marker}, so it is not an output of "
            "antidote_pl and is never written into; choose another directory",
        )
    if not overwrite:
        raise bad_value(
            field,
            os.fspath(path),
            f"a new or empty directory: it holds an earlier output; set {flag} true to replace it",
        )
    nested = _nested_output(final) if replace else None
    if nested is not None:
        raise bad_value(
            field, os.fspath(path), f"a directory without other outputs inside, but {nested} is one"
        )


# --------------------------------------------------------------------------- locks
def _lock_file(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


def _read_lock(file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or left half-written by a crash


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(owner: dict[str, Any], file: Path) -> bool:
    if not owner:
        # A lock file without content: its writer died between create and write (or is writing now).
        with contextlib.suppress(FileNotFoundError):
            return time.time() - file.stat().st_mtime > 10
        return True
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


def _lock_advice(owner: dict[str, Any]) -> str:
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        return "an earlier writer in this process still holds it (e.g. a module whose fit failed)."
    return "wait for it to finish, or delete the lock file if that run is gone."


def _release(file: Path, token: str) -> None:
    owner = _read_lock(file)
    if owner and owner.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            file.unlink()


class OutputLock:
    """An exclusive lock on one output directory: the file ``.<name>.lock`` beside it.

    Created with ``O_CREAT | O_EXCL`` and holding the owner's pid, host and a random token. The owner
    is whoever holds the token, so a pickled copy (a DDP-spawned rank-0 worker) writes under the same
    lock. Released explicitly, by garbage collection, or at interpreter exit; a lock of a dead process
    on this host is taken over.

    Used as a context manager it acquires the lock unless already held, and releases only what it
    acquired.

    Args:
        path: The output directory (need not exist).
        field: Its configuration field, for messages.
    """

    def __init__(self, path: PathLike, field: str) -> None:
        self.path = real_path(path)
        self.field = field
        self.file = _lock_file(self.path)
        self.token: str | None = None
        self._created: list[Path] = []  # parent directories the lock file needed
        self._finalizer: weakref.finalize | None = None
        self._entered: list[bool] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_finalizer": None, "_entered": []}

    @property
    def held(self) -> bool:
        """Whether the lock file is ours."""
        owner = _read_lock(self.file) if self.token is not None else None
        return bool(owner) and owner.get("token") == self.token

    def acquire(self) -> None:
        """Takes the lock (a no-op if already held).

        Raises:
            ConfigError: when another live run holds it.
        """
        if self.held:
            return
        self._created = [p for p in reversed(self.file.parents) if not p.exists()]
        self.file.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                owner = _read_lock(self.file)
                if owner is None or _is_stale(owner, self.file):
                    with contextlib.suppress(FileNotFoundError):
                        self.file.unlink()
                    continue
                raise ConfigError(
                    f"{self.field}={str(self.path)!r} is being written by another run "
                    f"(pid {owner.get('pid')} on {owner.get('host')}, lock {self.file}); "
                    + _lock_advice(owner)
                ) from None
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": token, "time": time.time()}
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(owner, f)
            self.token = token
            self._finalizer = weakref.finalize(self, _release, self.file, token)
            return
        raise ConfigError(f"{self.field}={str(self.path)!r}: could not take the lock {self.file}.")

    def release(self) -> None:
        """Gives the lock back (a no-op if not held)."""
        if self.token is not None:
            _release(self.file, self.token)
        # A failed run leaves no empty directories behind (rmdir keeps any that got content).
        for parent in reversed(self._created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        self._created = []
        if self._finalizer is not None:
            self._finalizer.detach()
        self.token, self._finalizer = None, None

    def __enter__(self) -> OutputLock:
        self._entered.append(not self.held)
        if self._entered[-1]:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._entered.pop():
            self.release()


def launch_rank_is_zero() -> bool:
    """Whether this process is rank 0 of its launch (True outside any distributed launcher).

    Lightning's ``rank_zero_only.rank``: the launchers' rank (``RANK``, ``LOCAL_RANK``,
    ``SLURM_PROCID``, ``JSM_NAMESPACE_RANK``) read when Lightning is imported, so it works at
    construction time before the Trainer sets up distributed, and the global rank once a Trainer has.
    Only that process takes output locks. Lightning's rank does not read the node rank: before a
    Trainer sets up, local rank 0 of a second node would count as rank 0 too, so a node rank other
    than 0 (``NODE_RANK``, ``GROUP_RANK``) rules it out here.
    """
    nodes = (os.environ.get(k, "0") for k in ("NODE_RANK", "GROUP_RANK"))
    return rank_zero_only.rank == 0 and all(node in ("", "0") for node in nodes)


def claim_output_dir(
    path: PathLike,
    field: str,
    *,
    overwrite: bool = False,
    flag: str = "--overwrite",
    marker: str = OUTPUT_MARKER,
    inputs: Inputs | None = None,
    replace: bool = True,
    take_lock: bool | None = None,
) -> OutputLock:
    """Checks an output (:func:`check_output_dir`) and locks it, before any expensive work.

    Args:
        path, field, overwrite, flag, marker, inputs, replace: See :func:`check_output_dir`.
        take_lock: Whether this process writes the output and so takes the lock; by default only
            the launch's rank 0 does (:func:`launch_rank_is_zero`: the other ranks would find it
            taken). Inside a running Trainer, pass ``trainer.is_global_zero``.

    Returns:
        The lock, to pass to :func:`atomic_dir` / :func:`writable_dir` and release at the end.
    """
    final = check_output_dir(
        path, field, overwrite=overwrite, flag=flag, marker=marker, inputs=inputs, replace=replace
    )
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
    path: PathLike,
    *,
    field: str = "output_dir",
    overwrite: bool = False,
    flag: str = "--overwrite",
    marker: str = OUTPUT_MARKER,
    kind: str | None = None,
    inputs: Inputs | None = None,
    lock: OutputLock | None = None,
) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``path`` only on success.

    The output is checked (:func:`check_output_dir`) and locked first; an existing directory is
    replaced only when it is an earlier output of this kind (``marker``) and ``overwrite`` is set.

    Args:
        path: Final directory.
        field: Its configuration field, for messages.
        overwrite: Allow replacing an earlier output.
        flag: How the user sets ``overwrite``, for messages.
        marker: The marker of this kind of output. With :data:`OUTPUT_MARKER` it is written here
            (with ``kind``); any other marker (a stage's) must be written by the caller.
        kind: What the output is (``tokenizer``, ``judge``), recorded in :data:`OUTPUT_MARKER`.
        inputs: The run's inputs, which the output must stay apart from.
        lock: A lock already taken on ``path`` (e.g. by :func:`claim_output_dir`); otherwise one is
            taken for the duration of the write.

    Yields:
        The temporary directory to write into.
    """
    final = real_path(path)
    with _lock_for(final, field, lock):
        check_output_dir(path, field, overwrite=overwrite, flag=flag, marker=marker, inputs=inputs)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _chmod_umask(tmp, 0o777)
            yield tmp
            if marker == OUTPUT_MARKER:
                _write_marker(tmp, kind or "output")
            elif not (tmp / marker).is_file():
                raise RuntimeError(f"atomic_dir: the writer did not write its marker {marker}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
    path: PathLike,
    *,
    field: str = "output_dir",
    overwrite: bool = False,
    flag: str = "--overwrite",
    kind: str,
    inputs: Inputs | None = None,
    lock: OutputLock | None = None,
) -> Iterator[Path]:
    """Yields ``path`` to add or update files in place, for writers that do not replace a directory.

    The same checks as :func:`atomic_dir` (with :data:`OUTPUT_MARKER`), under the lock; the
    directory is created (with its marker) if needed.

    Args:
        path: The output directory.
        field: Its configuration field, for messages.
        overwrite: Allow writing into an earlier output of this project.
        flag: How the user sets ``overwrite``, for messages.
        kind: What the output is (``evaluation``, ``pipeline``), recorded in the marker.
        inputs: The run's inputs, which the output must stay apart from.
        lock: A lock already taken on ``path``.

    Yields:
        The resolved directory.
    """
    final = real_path(path)
    with _lock_for(final, field, lock):
        check_output_dir(path, field, overwrite=overwrite, flag=flag, inputs=inputs, replace=False)
        mark_output_dir(final, kind)
        yield final


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
