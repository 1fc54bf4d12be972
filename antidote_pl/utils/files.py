"""Reading user-supplied and project-written files with errors that name the file.

A raw ``JSONDecodeError`` or ``SafetensorError`` says what went wrong but not where; every reader
here turns it into a :class:`~antidote_pl.errors.ConfigError` that starts with the file's path.
"""

from __future__ import annotations

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
        raise bad_file(p, f"not UTF-8 text ({err.reason} at byte {err.start}); expected {what}") from err
    except json.JSONDecodeError as err:
        raise bad_file(p, f"invalid JSON ({err.msg}, line {err.lineno}); expected {what}") from err


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
