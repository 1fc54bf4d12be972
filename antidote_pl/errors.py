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
