"""The :class:`Task` record and the registry that finds a task by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from antidote_pl.errors import bad_value, check_choice


@dataclass(frozen=True, eq=False)
class Task:
    """One fine-tuning task: how its records are prompted and how an answer to it is scored.

    Args:
        name: Registry key: the ``task_name`` of the evaluation configs and the ``category`` of the
            paper's task records.
        parse: Maps a generated response to the canonical answer, or ``None`` when the response holds
            none (which counts as wrong).
        labels: The label words / class names, in the dataset's class-id order; empty for tasks with
            open answers.
        instruction: The instruction of every task record; ``None`` when each record brings its own
            (GSM8K: the question is the instruction).
        gold: Maps a record's ``label`` (the reference answer) to the canonical gold answer that
            ``parse`` results are compared with, raising ``ConfigError`` for a gold answer the task
            cannot have. ``None``: the label must itself parse to an answer (right for label tasks,
            whose gold is a label word).
        output_replace: Substring rewrites that turn a raw reference answer into the training target
            (GSM8K: ``"####"`` -> the phrase its parser looks for).

    Raises:
        ConfigError: for an empty name, a parser or canonicaliser that is not callable, or a task with
            neither ``labels`` nor ``gold`` (its gold answers could not be checked).
    """

    name: str
    parse: Callable[[str], Any]
    labels: tuple[str, ...] = ()
    instruction: str | None = None
    gold: Callable[[Any], Any] | None = None
    output_replace: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise bad_value("Task.name", self.name, "a non-empty name")
        if not callable(self.parse):
            raise bad_value("Task.parse", self.parse, "a function response -> answer or None")
        if self.gold is not None and not callable(self.gold):
            raise bad_value("Task.gold", self.gold, "a function label -> gold answer, or None")
        if self.gold is None and not self.labels:
            raise bad_value(f"Task({self.name!r}).labels", self.labels, "label words, or a `gold` function")
        # Frozen copies: a registered task must not change under the evaluation that reads it.
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "output_replace", MappingProxyType(dict(self.output_replace)))

    def canonical_gold(self, gold: Any) -> Any:
        """The gold answer of a record's ``label`` in the form ``parse`` returns.

        Raises:
            ConfigError: for a gold answer the task cannot have.
        """
        if self.gold is not None:
            return self.gold(gold)
        canonical = self.parse(gold) if isinstance(gold, str) else None
        if canonical is None:
            raise bad_value(f"{self.name} gold", gold, f"one of {list(self.labels)}")
        return canonical

    def is_correct(self, response: str, gold: Any) -> bool:
        """Whether ``response`` answers correctly against the reference answer ``gold``.

        The gold answer is checked only when the response parses (as the official scripts, which
        never look at the gold of an unparseable answer).

        Raises:
            ConfigError: for a parsed response whose gold answer the task cannot have.
        """
        parsed = self.parse(response)
        # Exact comparison (floats too, as the official script): both sides come from decimal text.
        return parsed is not None and parsed == self.canonical_gold(gold)


_TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    """Adds ``task`` to the registry under ``task.name`` and returns it.

    Registering the same object again is a no-op, so a module that registers on import may be
    imported twice.

    Args:
        task: The task.
        replace: Replace a different task registered under the same name.

    Raises:
        ConfigError: for something that is not a :class:`Task`, or a name taken by another task.
    """
    if not isinstance(task, Task):
        raise bad_value("register_task(task)", task, "a Task")
    known = _TASKS.get(task.name)
    if known is not None and known is not task and not replace:
        raise bad_value("Task.name", task.name, "a name not yet registered (pass replace=True to replace it)")
    _TASKS[task.name] = task
    return task


def get_task(name: str, field: str = "task") -> Task:
    """The registered task called ``name``.

    Args:
        name: The task name (``sst2``, ...).
        field: The configuration field ``name`` came from, for the error message.

    Raises:
        ConfigError: for a name no task is registered under (the message lists the known ones).
    """
    check_choice(field, name, _TASKS)
    return _TASKS[name]


def task_names() -> tuple[str, ...]:
    """The names of every registered task, sorted."""
    return tuple(sorted(_TASKS))


def is_correct(task: str, response: str, gold: Any) -> bool:
    """Whether ``response`` answers the registered task ``task`` correctly (see :meth:`Task.is_correct`).

    Raises:
        ConfigError: for an unknown task, or a gold answer the task cannot have.
    """
    return get_task(task).is_correct(response, gold)
