"""Validation and errors: the project's one place for checking input and reporting it.

:class:`ConfigError` with :func:`bad_value`'s message shape (field, value, what is allowed), the
checks every constructor uses (:func:`check_int`, :func:`check_number`, :func:`check_choice`), and
how entry points report a failure.

Every command (``python -m antidote_pl <command>``, :mod:`antidote_pl.commands`) runs through
:func:`run_entry_point`: a :class:`ConfigError` anywhere in an exception's chain (LightningCLI and
jsonargparse wrap the errors raised by constructors) is printed as one ``antidote_pl: error:`` line on
stderr (the ``--debug`` hint at its end) and exits with code 2. ``--debug`` on the command line, or
``ANTIDOTE_PL_DEBUG=1`` in the environment, shows the full traceback instead.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "ANTIDOTE_PL_DEBUG"
EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """Bad user input, raised before any expensive work starts.

    The message always names the offending field, the value received and what is allowed.
    """


def bad_value(field: str, value: object, allowed: str) -> ConfigError:
    """Builds a :class:`ConfigError` with the project's standard message shape.

    Args:
        field: Dotted name of the configuration field, e.g. ``data.harmful_ratio``.
        value: The value that was received.
        allowed: Human-readable description of what is allowed.

    Returns:
        The error, ready to raise.
    """
    return ConfigError(f"{field}={value!r} is invalid: expected {allowed}.")


def bad_file(path: str | os.PathLike, problem: str) -> ConfigError:
    """A :class:`ConfigError` for a user file that cannot be read, naming the file first."""
    return ConfigError(f"{path}: {problem}")


def check_int(field: str, value: object, minimum: int, maximum: int | None = None) -> None:
    """Raises a :class:`ConfigError` unless ``value`` is an int (not a bool) in ``[minimum, maximum]``.

    Args:
        field: Dotted name of the configuration field, for the message.
        value: The value received.
        minimum: Smallest allowed value.
        maximum: Largest allowed value, or ``None`` for no upper bound.
    """
    allowed = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_value(field, value, allowed)
    if value < minimum or (maximum is not None and value > maximum):
        raise bad_value(field, value, allowed)


def check_number(
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raises a :class:`ConfigError` naming ``field`` unless ``value`` is a finite number in range.

    Args:
        field: Name used in the message, e.g. ``"Vaccine.rho"``.
        value: The value to check (booleans are rejected).
        low: Lower bound, inclusive unless ``low_open``.
        high: Upper bound, inclusive unless ``high_open``.
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
        integer: Require an ``int``.
    """
    kind = "an int" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    allowed = f"{kind} {' and '.join(bounds)}".strip()
    types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, types) or not math.isfinite(value):
        raise bad_value(field, value, allowed)
    if low is not None and (value < low or (low_open and value == low)):
        raise bad_value(field, value, allowed)
    if high is not None and (value > high or (high_open and value == high)):
        raise bad_value(field, value, allowed)


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Returns ``value`` if it is one of ``allowed``, else raises a :class:`ConfigError`.

    Args:
        field: Dotted name of the configuration field, for the message.
        value: The value received (an unhashable one is simply not allowed).
        allowed: The allowed values (a tuple, or a dict/set whose keys are listed sorted).
    """
    options = list(allowed) if isinstance(allowed, list | tuple) else sorted(allowed)
    try:
        ok = value in allowed
    except TypeError:  # e.g. a list given where a key of a dict is expected
        ok = False
    if not ok:
        raise bad_value(field, value, f"one of {options}")
    return value


# ------------------------------------------------------------------------------------------------
# Reporting at the entry points

# jsonargparse's union errors repeat the type machinery around the one useful line; these lines
# are dropped from a parser error so that what remains names the key and the problem.
_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
    "tip: For details of accepted options",
)


def user_error(exc: BaseException) -> str | None:
    """The message to show for a user-input error anywhere in ``exc``'s chain, else ``None``.

    Looks through ``__cause__``/``__context__`` for a :class:`ConfigError` (constructors raise it;
    jsonargparse wraps it) or a jsonargparse ``ArgumentError`` (an unknown option or a missing file
    at parse time), and condenses the latter to its informative lines.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    parser_error: BaseException | None = None
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ConfigError):
            return str(err)
        if parser_error is None and type(err).__name__ == "ArgumentError":
            parser_error = err
        todo += [err.__cause__, err.__context__]
    if parser_error is None:
        return None
    lines = [ln.strip() for ln in str(parser_error).splitlines()]
    kept = [ln.removeprefix("- ") for ln in lines if ln and not ln.startswith(_PARSER_NOISE)]
    return " ".join(kept)


def _wants_debug(argv: list[str]) -> tuple[list[str], bool]:
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    if DEBUG_FLAG in argv:
        return [a for a in argv if a != DEBUG_FLAG], True
    return argv, env


def run_entry_point(
    fn: Callable[[list[str]], Any], argv: Sequence[str] | None = None, prog: str = "antidote_pl"
) -> Any:
    """Runs ``fn(argv)`` and turns user-input errors into one line on stderr and exit code 2.

    Args:
        fn: The command; receives the arguments without ``--debug``.
        argv: Arguments (default: ``sys.argv[1:]``).
        prog: Program name in the message.

    Returns:
        Whatever ``fn`` returns.

    Raises:
        SystemExit: with code 2 after printing the message, for a user-input error (unless debugging).
    """
    args, debug = _wants_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        return fn(args)
    except SystemExit:
        raise
    except Exception as exc:
        message = None if debug else user_error(exc)
        if message is None:
            raise
        print(one_line(prog, message), file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def one_line(prog: str, message: str) -> str:
    """The refusal as printed: one line, the ``--debug`` hint folded into it (README promises one)."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"{prog}: error: {text} [{DEBUG_FLAG} or {DEBUG_ENV}=1 shows the traceback]"
