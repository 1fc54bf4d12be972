"""The project's one placeholder syntax: ``{name}`` in a path or an override, filled from known names.

Two parts of the toolkit know a run's names: a stage's parser knows ``run.model``, ``run.task`` and
``run.variant`` (from ``run:`` in its config) and fills them into the stage's paths; the pipeline
knows the seed of each of its runs (``seeds:``) and fills ``{seed}`` into the overrides it hands the
stages. Both fill through :func:`fill_placeholders`, so the syntax, the names and the error for a
name whose value is unknown are one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from antidote_pl.errors import bad_value

#: Names filled by a stage's parser from ``run.<name>`` (``antidote_pl.stages.cli.add_run_names``).
RUN_NAMES = ("model", "task", "variant")
#: The name filled by the pipeline, once per seed (``antidote_pl.experiment.seeds``).
SEED = "seed"
#: How to give each name a value, for the error on an unknown one.
HOW_TO_SET = {**{name: f"set run.{name}" for name in RUN_NAMES}, SEED: "give the pipeline a list of seeds"}

_PATTERN = re.compile(r"\{(" + "|".join(HOW_TO_SET) + r")\}")


def placeholders_in(text: str) -> set[str]:
    """The placeholder names that ``text`` holds (``{seed}`` -> ``{"seed"}``)."""
    return set(_PATTERN.findall(text))


def fill_placeholders(field: str, value: Any, names: Mapping[str, str | int | None]) -> Any:
    """``value`` (a string or a list of them) with the placeholders of ``names`` filled in.

    Placeholders of names not in ``names`` are left as they are, for whoever knows them.

    Args:
        field: The argument ``value`` belongs to (for the error).
        value: A string, a list of strings (filled item by item) or anything else (returned as is).
        names: The names this caller fills, each with its value (``None``: not known).

    Raises:
        ConfigError: when a placeholder of ``names`` has no value (``None``).
    """
    if isinstance(value, list):
        return [fill_placeholders(f"{field}[{i}]", v, names) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in names:
            return match.group(0)
        if names[key] is None:
            raise bad_value(field, value, f"a value whose {{{key}}} is known: {HOW_TO_SET[key]}")
        return str(names[key])

    return _PATTERN.sub(fill, value)
