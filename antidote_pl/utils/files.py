"""Reading user-supplied and project-written files with errors that name the file.

A raw ``JSONDecodeError``, ``YAMLError`` or ``SafetensorError`` says what went wrong but not where;
every reader here turns it into a :class:`~antidote_pl.errors.ConfigError` that starts with the
file's path (and, for text that is not UTF-8, the byte offset in the whole file).

Stage metadata (``antidote_stage.json``) is relocatable. The rule: a local path the stage records
(``base_model``, ``merged_adapters``, ``tokenizer``, and the data files and source paths of its
realignment window) that lies inside the *project tree*, the working directory the stage runs in
(where its configs' relative paths resolve), together with the stage output itself, is recorded
relative to the stage output directory (``../align``) and the file says so (``paths_relative_to:
stage_dir``). :func:`read_stage_metadata` resolves such paths against the directory it reads, so a
moved project loads its own stages, and a copied one its own copies, never the original tree's.
Paths outside the project (a shared model directory) stay absolute; files written before this rule
(absolute paths, no ``paths_relative_to``) are read as they are.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from antidote_pl.errors import ConfigError, bad_file, bad_value


def read_json_file(path: str | os.PathLike, what: str = "a JSON file") -> Any:
    """Reads a JSON file written by the project or a user, with errors that name the file.

    Args:
        path: The file.
        what: What the file should be, for the message (e.g. ``"a stage's antidote_stage.json"``).

    Raises:
        ConfigError: if the file is missing, not UTF-8 or not valid JSON.
    """
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise bad_file(p, f"missing; expected {what}") from err
    except UnicodeDecodeError as err:
        raise bad_file(p, f"{not_utf8(p, err)}; expected {what}") from err
    except json.JSONDecodeError as err:
        raise bad_file(p, f"invalid JSON ({err.msg}, line {err.lineno}); expected {what}") from err


def read_yaml_file(path: str | os.PathLike, what: str = "a YAML config") -> Any:
    """Reads a YAML file, refusing an empty one, with errors that name the file (not ``<unicode string>``).

    Raises:
        ConfigError: if the file is missing, not UTF-8, not valid YAML, or holds no document.
    """
    import yaml  # a jsonargparse dependency; only config readers need it

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise bad_file(p, f"missing; expected {what}") from err
    except UnicodeDecodeError as err:
        raise bad_file(p, f"{not_utf8(p, err)}; expected {what}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise bad_file(p, f"invalid YAML ({problem}{where}); expected {what}") from err
    if data is None:
        raise bad_file(p, f"empty (no YAML document); expected {what}")
    return data


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")


def first_non_utf8(path: str | os.PathLike, chunk: int = 1 << 20) -> tuple[int, int, str] | None:
    """Where ``path`` (a ``.gz`` file: its decompressed text) stops being UTF-8.

    Text readers decode in blocks, so a ``UnicodeDecodeError``'s offset is counted from the start of
    a block; this scans the whole file instead.

    Returns:
        ``(byte offset, line number, reason)`` of the first invalid byte, or ``None`` if there is none.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with _open_binary(Path(path)) as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                # err.start counts from the bytes the decoder held back plus this block.
                held = len(err.object) - len(block)
                bad = offset - held + err.start
                return bad, lines + err.object[: err.start].count(b"\n"), err.reason
            lines += block.count(b"\n")
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            return offset - len(err.object) + err.start, lines, err.reason
    return None


def not_utf8(path: str | os.PathLike, err: UnicodeDecodeError) -> str:
    """The problem text for a file that failed to decode: the offset and line in the whole file."""
    found = first_non_utf8(path)
    if found is None:  # the file changed since it was read: report what the decoder saw
        return f"not UTF-8 text ({err.reason})"
    offset, line, reason = found
    return f"not UTF-8 text ({reason} at byte {offset}, line {line})"


def check_safetensors_file(path: str | os.PathLike, what: str = "a safetensors file") -> list[str]:
    """Opens a safetensors file's header (cheap: no tensor is read) and returns its tensor names.

    Raises:
        ConfigError: if the file is missing, truncated or not safetensors.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise bad_file(p, f"missing; expected {what}")
    try:
        with safe_open(str(p), "pt") as f:
            return list(f.keys())
    except Exception as err:  # SafetensorError and OSError alike: the file is unusable
        raise bad_file(p, f"unreadable ({err}); expected {what}") from err


def looks_local(spec: str) -> bool:
    """Whether ``spec`` names a local path rather than a hub repository.

    Hub ids are ``name`` or ``namespace/name``. A spec is local when it exists, starts with ``.``,
    ``/`` or ``~``, has more than one ``/``, or when its first component is an existing local
    directory (``outputs/nothere`` while ``outputs/`` exists). A local-looking spec that does not
    exist is reported as a missing path, never tried on the hub: a mistyped path must not download
    a stranger's repository of that name.
    """
    if spec.startswith((".", "/", "~")) or Path(spec).exists():
        return True
    parts = spec.replace("\\", "/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


STAGE_FILE = "antidote_stage.json"


#: Key of ``antidote_stage.json`` holding a fine-tune stage's realignment window
#: (see :mod:`antidote_pl.data.window`).
REALIGNMENT_WINDOW_KEY = "realignment_window"


def read_stage_metadata(path: str, field: str = "stage") -> dict[str, Any]:
    """Reads ``antidote_stage.json`` of a stage output directory, its recorded paths resolved.

    Paths recorded relative to the stage directory (see the module docstring) come back absolute,
    resolved against ``path``, so every reader gets a path that works from any working directory.

    Raises:
        ConfigError: if ``path`` is not a finished stage output.
    """
    meta_file = Path(path).expanduser() / STAGE_FILE
    if not meta_file.is_file():
        raise bad_value(field, path, f"a finished antidote_pl stage output directory (with {STAGE_FILE})")
    meta = read_json_file(meta_file, "a stage's metadata")
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ConfigError(
            f"{meta_file}: not a stage's metadata (no 'kind'); expected a file written by save_stage."
        )
    if meta.get(PATHS_KEY) == PATHS_BASE:
        stage_dir = _lexical_abs(meta_file.parent)
        meta = map_stage_paths(meta, lambda v: _resolve_recorded(v, stage_dir))
    return meta


# --------------------------------------------------------------------------- relocatable paths
#: Key of ``antidote_stage.json`` saying that its ``./`` and ``../`` paths are relative to its directory.
PATHS_KEY = "paths_relative_to"
PATHS_BASE = "stage_dir"
#: Top-level keys of ``antidote_stage.json`` that hold a model path (or a list of them).
_MODEL_PATH_KEYS = ("base_model", "merged_adapters", "tokenizer")
#: ``init_args`` of a recorded record source that name data files (as ``data.records.source_paths``).
_SOURCE_PATH_ARGS = ("path", "data_files")


def _lexical_abs(path: str | os.PathLike) -> Path:
    # Lexical (no symlink resolution) both ways, so that writing and reading agree on "..".
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _resolve_recorded(value: str, stage_dir: Path) -> str:
    if value.startswith(("./", "../")):
        return os.path.normpath(stage_dir / value)
    return value


def _map_leaves(value: Any, fn: Callable[[str], str]) -> Any:
    """``fn`` applied to every string of a path, a list of paths or a split -> path mapping."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_leaves(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_leaves(v, fn) for k, v in value.items()}
    return value


def _map_source(spec: Any, fn: Callable[[str], str]) -> Any:
    """A recorded source spec (``class_path``/``init_args``, nested ones too) with ``fn`` on its paths."""
    if isinstance(spec, list):
        return [_map_source(s, fn) for s in spec]
    if not (isinstance(spec, dict) and set(spec) == {"class_path", "init_args"}):
        return spec
    args = spec["init_args"]
    if not isinstance(args, dict):
        return spec
    mapped = {
        k: _map_leaves(v, fn) if k in _SOURCE_PATH_ARGS else _map_source(v, fn) for k, v in args.items()
    }
    return {"class_path": spec["class_path"], "init_args": mapped}


def _map_keys(part: dict[str, Any], keys: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
    return {k: keys[k](v) if k in keys else v for k, v in part.items()}


def map_stage_paths(meta: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of stage metadata with ``fn`` applied to every recorded path string.

    The paths: ``base_model``, ``merged_adapters``, ``tokenizer``, and in the realignment window each
    set's ``files`` and source paths and the ``settings.tokenizer``. Other strings are left alone.
    """

    def leaves(v: Any) -> Any:
        return _map_leaves(v, fn)

    out = _map_keys(meta, dict.fromkeys(_MODEL_PATH_KEYS, leaves))
    window = out.get(REALIGNMENT_WINDOW_KEY)
    if isinstance(window, dict):
        sets = {"files": leaves, "source": lambda v: _map_source(v, fn)}
        out[REALIGNMENT_WINDOW_KEY] = {
            name: _map_keys(part, {"tokenizer": leaves} if name == "settings" else sets)
            if isinstance(part, dict)
            else part
            for name, part in window.items()
        }
    return out


def relocatable_stage_metadata(
    meta: dict[str, Any], stage_dir: str | os.PathLike, root: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Stage metadata as written: paths inside the project recorded relative to ``stage_dir``.

    Args:
        meta: The metadata, local paths as the stage saw them (absolute or relative to the cwd).
        stage_dir: The stage output directory being written (its final path).
        root: The project tree (default: the working directory); see the module docstring.

    Returns:
        A copy with :data:`PATHS_KEY` set when ``stage_dir`` lies inside ``root``, else ``meta``.
    """
    project = _lexical_abs(root if root is not None else os.getcwd())
    out_dir = _lexical_abs(stage_dir)
    if not out_dir.is_relative_to(project):
        return meta

    def relative(value: str) -> str:
        if not value or not Path(value).expanduser().exists():
            return value  # a hub name, a builder name, or a path that is not here
        target = _lexical_abs(value)
        if not target.is_relative_to(project):
            # Absolute: a path relative to the cwd that leaves the project (``../shared/data``) would
            # otherwise be read back against the stage directory.
            return str(target)
        rel = os.path.relpath(target, out_dir)
        return rel if rel.startswith("..") else f"./{rel}"

    return {**map_stage_paths(meta, relative), PATHS_KEY: PATHS_BASE}
