"""Reading user-supplied and project-written files with errors that name the file.

A raw ``JSONDecodeError``, ``YAMLError`` or ``SafetensorError`` says what went wrong but not where;
every reader here turns it into a :class:`~antidote_pl.errors.ConfigError` that starts with the
file's path (and, for text that is not UTF-8, the byte offset in the whole file).

"""

from __future__ import annotations

import codecs
import gzip
import json
import os
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
    """Reads ``antidote_stage.json`` of a stage output directory.

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
    return meta
