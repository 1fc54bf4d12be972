"""An on-disk cache of a GGUF model's dequantised weights, keyed by the GGUF file's sha256.

Reading SmolLM2-135M from its GGUF file (parsing the metadata, dequantising every tensor) takes
13-19 s of one core per process; the same weights read back from a safetensors copy take well under a
second (the measurement is in ``BENCHMARKS.md``). :mod:`antidote_pl.models.gguf` keeps one loaded copy
per process; this module keeps one on disk for every later process (each ``fit``/``test`` command,
each test run).

Layout: ``<root>/<sha256 of the .gguf>/`` holds ``model.safetensors`` (fp32, tied weights once),
``config.json``, ``generation_config.json`` and ``cache.json``, written last, which lists each file's
size and sha256 and the library versions that dequantised them. A directory is used only when every
file matches its size and sha256 and the versions are today's; anything else (a missing, truncated or
altered file, another transformers or gguf version) is rebuilt from the GGUF file, never trusted.

``root`` is ``~/.cache/antidote_pl/gguf``, or ``$ANTIDOTE_PL_GGUF_CACHE``; ``ANTIDOTE_PL_GGUF_CACHE=off``
turns the cache off (every process dequantises the file again).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from antidote_pl.utils.hashing import file_sha256
from antidote_pl.utils.io import atomic_file, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CACHE_ENV = "ANTIDOTE_PL_GGUF_CACHE"
DEFAULT_ROOT = "~/.cache/antidote_pl/gguf"
INDEX_FILE = "cache.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = 1
_OFF = ("", "0", "off", "false", "no", "none")


def cache_root() -> Path | None:
    """The cache's root directory, or ``None`` when ``$ANTIDOTE_PL_GGUF_CACHE`` turns it off."""
    value = os.environ.get(CACHE_ENV)
    if value is None:
        return Path(DEFAULT_ROOT).expanduser()
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def cache_dir(gguf_sha256: str) -> Path | None:
    """Where the dequantised weights of the GGUF file with this sha256 live (``None``: cache off)."""
    root = cache_root()
    return None if root is None else root / gguf_sha256


def made_with() -> dict[str, Any]:
    """What the cached values depend on besides the file: the cache format and the dequantising code."""
    versions = {}
    for name in ("transformers", "gguf"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"format": FORMAT, **versions}


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def is_valid(directory: Path) -> bool:
    """Whether ``directory`` holds a complete cache entry whose files match ``cache.json`` and whose
    versions are this installation's (see the module docstring)."""
    index = directory / INDEX_FILE
    try:
        recorded = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("made_with") != made_with():
        return False
    files = recorded.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        return False
    for name, entry in files.items():
        path = directory / name
        # Size first: a truncated file is caught by a stat, before its bytes are hashed.
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return False
        if file_sha256(path) != entry.get("sha256"):
            return False
    return True


def _unique_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (the first name, e.g. the input embedding of a tied head)."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def write(directory: Path, model: Any, source: dict[str, Any]) -> None:
    """Writes ``model``'s (fp32) weights and configs to ``directory``, each file atomically, the index last.

    Args:
        directory: The entry's directory (see :func:`cache_dir`).
        model: The model as loaded from the GGUF file in fp32.
        source: What the entry was made from (the GGUF file's path, sha256 and size), recorded.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / WEIGHTS_FILE) as tmp:
        save_file(_unique_tensors(model), str(tmp), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    # The weights are plain tensors now: the GGUF loader's settings no longer apply to them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    atomic_write_text(directory / "config.json", config.to_json_string())
    atomic_write_text(directory / "generation_config.json", model.generation_config.to_json_string())
    names = (WEIGHTS_FILE, "config.json", "generation_config.json")
    index = {
        "made_with": made_with(),
        "source": source,
        "files": {name: _file_entry(directory / name) for name in names},
    }
    atomic_write_json(directory / INDEX_FILE, index)


def load(directory: Path, torch_dtype: torch.dtype, **kwargs: Any):
    """The cached model in ``torch_dtype`` (cast from the stored fp32 values), in eval mode.

    Args:
        directory: A valid entry (see :func:`is_valid`).
        torch_dtype: Weight dtype.
        **kwargs: Passed to ``from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch_dtype, trust_remote_code=False, **kwargs
    )
