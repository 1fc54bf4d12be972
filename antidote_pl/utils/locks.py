"""One writer per output: the lock file ``.<name>.lock`` beside an output directory.

Created with ``O_CREAT | O_EXCL`` and holding the owner's pid, host and a random token; a lock left
by a dead process on the same host is taken over. Used through :mod:`antidote_pl.utils.io`
(:func:`~antidote_pl.utils.io.claim_output_dir`, :func:`~antidote_pl.utils.io.atomic_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from antidote_pl.errors import ConfigError

PathLike = str | os.PathLike


def real_path(path: PathLike) -> Path:
    """``path`` with ``~`` expanded and symlinks resolved (it need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


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
