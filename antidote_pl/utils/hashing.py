"""Content fingerprints of files and tensors, for cache keys and artefact checks."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

# Entries sampled per tensor: enough to tell two trained models apart, cheap on a 7B model
# (a few hundred tensors x this many values).
SAMPLES_PER_TENSOR = 256


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files above this size are identified by size and modification time instead of their bytes, so a
# cache check on a 7B model's weights costs a stat, not a 13 GB read.
HASH_CONTENT_BELOW = 256 << 20


def file_identity(path: str | os.PathLike) -> str:
    """The sha256 of a file up to :data:`HASH_CONTENT_BELOW` bytes, else its size and mtime."""
    p = Path(path)
    if not p.is_file():
        return "absent"
    st = p.stat()
    if st.st_size >= HASH_CONTENT_BELOW:
        return f"stat:{st.st_size}:{st.st_mtime_ns}"
    return file_sha256(p)


def path_identity(path: str | os.PathLike) -> str:
    """The identity of a local input: a file's :func:`file_identity`, a directory's files (recursive,
    hidden ones left out) as one hash of their relative paths and identities, else ``"absent"``."""
    p = Path(path).expanduser()
    if p.is_file():
        return file_identity(p)
    if not p.is_dir():
        return "absent"
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{file_identity(f)}\0".encode())
    return "dir:" + h.hexdigest()


def files_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """One short hash over several files' names and identities (missing files hash as absent)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(p.name.encode() + b"\0" + file_identity(p).encode() + b"\0")
    return h.hexdigest()[:16]


def directory_fingerprint(directory: str | os.PathLike, patterns: Iterable[str] = ("*",)) -> str:
    """:func:`files_fingerprint` of the files of ``directory`` (not recursive) matching ``patterns``."""
    d = Path(directory)
    files = sorted({f for pat in patterns for f in d.glob(pat) if f.is_file()})
    return files_fingerprint(files)


@torch.no_grad()
def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short hash of named tensors: names, shapes, dtypes and a strided sample of their values.

    Sampling keeps it fast on large models while any retraining or a different base model changes
    it. Values are hashed as float32, so bf16/fp16 weights upcast to fp32 keep their fingerprint;
    weights rounded down to a lower precision get another one (compare like with like).
    """
    h = hashlib.sha256()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.float32).contiguous()
        h.update(f"{name}|{tuple(t.shape)}\0".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()[:16]


@torch.no_grad()
def tensors_digest(named: Mapping[str, torch.Tensor]) -> str:
    """sha256 of named tensors' names, shapes, dtypes and every byte of their values.

    Unlike :func:`tensors_fingerprint` nothing is sampled, so one changed entry changes it: for
    artefacts whose content is recorded at write time and checked on every read (sweep masks and
    edits).
    """
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
