"""The LM judge's training data and its backbone-output cache.

The labelled CSVs are read (and subsampled, seeded) by :func:`load_training_files`. The backbone's
outputs per file (pooled features or trunk token states) are cached in one safetensors file per
data file, keyed by the file's sha256, the kept rows, every setting and the backbone's identity
(:func:`feature_cache_key`), so a second split seed or a retrained head does not rerun the backbone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from antidote_pl.errors import bad_value
from antidote_pl.judges.lm.featurizer import PairFeaturizer
from antidote_pl.judges.lm.tuned import TokenStates
from antidote_pl.judges.offline import load_labelled_csv
from antidote_pl.utils.hashing import file_sha256
from antidote_pl.utils.io import atomic_file


def subsample_rows(n: int, limit: int | None, seed: int) -> list[int]:
    """Row indices kept from a file of ``n`` rows: all, or ``limit`` drawn with ``seed`` (sorted)."""
    if limit is None or limit >= n:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=generator)[:limit].tolist())


def load_training_files(
    paths: Sequence[str | Path], limit_per_file: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """Reads labelled CSVs (:func:`load_labelled_csv`) and subsamples each one.

    Returns:
        One dict per file: ``path``, ``sha256``, ``rows_in_file``, ``rows`` (kept indices),
        ``questions``, ``answers``, ``labels``.

    Raises:
        ConfigError: naming the file for a missing or malformed CSV.
    """
    if not paths:
        raise bad_value("train_csv", list(paths), "at least one labelled CSV")
    files = []
    for path in paths:
        questions, answers, labels = load_labelled_csv(path)
        rows = subsample_rows(len(labels), limit_per_file, seed)
        files.append(
            {
                "path": str(path),
                "sha256": file_sha256(path),
                "rows_in_file": len(labels),
                "rows": rows,
                "questions": [questions[i] for i in rows],
                "answers": [answers[i] for i in rows],
                "labels": [labels[i] for i in rows],
            }
        )
    return files


def feature_cache_key(file: dict[str, Any], settings: dict[str, Any], backbone_sha256: str) -> str:
    """sha256 over a data file's content hash, the kept rows and every feature setting."""
    blob = json.dumps(
        {
            "file_sha256": file["sha256"],
            "rows": file["rows"],
            "settings": settings,
            "backbone": backbone_sha256,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_tensors(
    settings: dict[str, Any],
    file: dict[str, Any],
    backbone_sha256: str,
    cache_dir: Path | None,
    compute: Callable[[], dict[str, torch.Tensor]],
    n_rows: Callable[[dict[str, torch.Tensor]], int],
) -> tuple[dict[str, torch.Tensor], bool]:
    """One file's backbone outputs, read from the cache when a matching entry exists, else computed.

    Args:
        settings: Every setting the tensors depend on (part of the cache key).
        file: The data file (:func:`load_training_files`).
        backbone_sha256: The backbone's identity (part of the key).
        cache_dir: Cache directory, ``None`` to always compute.
        compute: Computes the tensors.
        n_rows: How many pairs a set of tensors covers (a mismatching entry is recomputed).

    Returns:
        ``(tensors, from_cache)``.
    """

    key = feature_cache_key(file, settings, backbone_sha256)
    entry = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    if entry is not None and entry.is_file():
        try:
            with safe_open(str(entry), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
                    if n_rows(tensors) == len(file["rows"]):
                        return tensors, True
        except Exception:  # a damaged cache entry is recomputed and replaced, never trusted
            pass
    tensors = compute()
    if entry is not None:
        with atomic_file(entry) as tmp:
            meta = {"key": key, "file": file["path"], "settings": json.dumps(settings)}
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return tensors, False


def cached_features(
    featurizer: PairFeaturizer,
    file: dict[str, Any],
    backbone_sha256: str,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, bool]:
    """One file's pooled features (:meth:`PairFeaturizer.features`) through :func:`cached_tensors`."""
    tensors, hit = cached_tensors(
        featurizer.settings,
        file,
        backbone_sha256,
        cache_dir,
        lambda: {"features": featurizer.features(file["questions"], file["answers"], progress)},
        lambda t: t["features"].shape[0],
    )
    return tensors["features"], hit


def cached_token_states(
    featurizer: PairFeaturizer,
    file: dict[str, Any],
    backbone_sha256: str,
    cache_dir: Path | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TokenStates, bool]:
    """One file's trunk token states (:meth:`PairFeaturizer.token_states`) through :func:`cached_tensors`."""
    tensors, hit = cached_tensors(
        featurizer.token_settings,
        file,
        backbone_sha256,
        cache_dir,
        lambda: featurizer.token_states(file["questions"], file["answers"], progress)._asdict(),
        lambda t: t["offsets"].numel() - 1,
    )
    return TokenStates(**{name: tensors[name] for name in TokenStates._fields}), hit


def outputs_of_files(
    one_file: Callable[..., tuple[Any, bool]],
    featurizer: PairFeaturizer,
    files: list[dict[str, Any]],
    backbone_sha256: str,
    cache: Path | None,
    say: Callable[[str], None],
) -> tuple[list[Any], list[bool]]:
    """``one_file`` (:func:`cached_features` or :func:`cached_token_states`) of every file, in order,
    and per file whether the cache served it."""
    parts, from_cache = [], []
    for f in files:
        t0 = time.time()

        def progress(done: int, total: int, name=Path(f["path"]).name, t0=t0) -> None:
            rate = done / max(time.time() - t0, 1e-9)
            left = (total - done) / rate
            say(f"features {name}: {done}/{total} pairs, {rate:.2f} pairs/s, ~{left:.0f}s left")

        value, hit = one_file(featurizer, f, backbone_sha256, cache, progress)
        how = "from cache" if hit else "computed"
        say(f"features {Path(f['path']).name}: {how} ({time.time() - t0:.0f}s)")
        parts.append(value)
        from_cache.append(hit)
    return parts, from_cache
