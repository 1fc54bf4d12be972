"""Project-wide error type for bad configuration or input."""


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
