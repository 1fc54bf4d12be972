"""Which entries of an output directory the project wrote, as its marker records them.

Every write of a whole output (:func:`antidote_pl.utils.io.atomic_dir`) lists the files it wrote in
the output's marker (``antidote_stage.json`` or ``antidote_output.json``, key :data:`FILES_KEY`:
paths relative to the directory, sub-directories included); a file the project adds to a finished
output later (the pipeline's step marker) is added to the list
(:func:`antidote_pl.utils.io.add_output_files`). Replacing an earlier output compares the directory
with that list: anything else in it (a user's ``NOTES.txt``, a ``my_plots/``) is *foreign*, and the
replacement is refused instead of deleting it.

Pure functions of paths and marker contents; the marker files are read and written by
:mod:`antidote_pl.utils.io`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

#: Marker key listing the files an output was written with.
FILES_KEY = "output_files"


def _walk(directory: Path, prefix: str = "") -> Iterator[tuple[str, os.DirEntry]]:
    """``(relative posix path, entry)`` of everything under ``directory``; links are not followed."""
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            rel = f"{prefix}{entry.name}"
            yield rel, entry
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), f"{rel}/")


def listing(directory: str | os.PathLike) -> list[str]:
    """The files (and links) under ``directory``, as sorted relative posix paths."""
    return [rel for rel, entry in _walk(Path(directory)) if not entry.is_dir(follow_symlinks=False)]


def recorded_files(marker: Any) -> list[str] | None:
    """The file list of a marker's contents, or ``None`` for a marker written before files were listed."""
    files = marker.get(FILES_KEY) if isinstance(marker, Mapping) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return files
    return None


def foreign_entries(directory: str | os.PathLike, recorded: list[str]) -> list[str]:
    """What ``directory`` holds beyond the ``recorded`` files: top-most foreign paths, directories
    with a trailing ``/``, sorted."""
    ours = set(recorded)
    parents = {str(p) for f in recorded for p in PurePosixPath(f).parents if str(p) != "."}
    foreign: list[str] = []
    for rel, entry in _walk(Path(directory)):
        if any(rel.startswith(f.rstrip("/") + "/") for f in foreign if f.endswith("/")):
            continue  # inside a foreign directory, which is named once
        if entry.is_dir(follow_symlinks=False):
            if rel not in parents:
                foreign.append(f"{rel}/")
        elif rel not in ours:
            foreign.append(rel)
    return foreign


def describe(entries: list[str], shown: int = 5) -> str:
    """The first ``shown`` entries, comma-separated, and how many more."""
    more = f" and {len(entries) - shown} more" if len(entries) > shown else ""
    return ", ".join(entries[:shown]) + more
