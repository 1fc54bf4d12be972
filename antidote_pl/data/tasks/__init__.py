"""Fine-tuning tasks: one :class:`Task` per task, found by name in one registry.

A task holds what is specific to it: its name (the evaluation's ``task_name``, the records'
``category``), the instruction of its records, its label words, its answer parser and its gold
canonicaliser. The paper's data sources (:mod:`antidote_pl.data.paper`) build records from it and
the evaluator scores fine-tune accuracy through it; neither knows a task by name.

Every module of this package whose name does not start with ``_`` holds one built-in task as
``TASK`` and is registered when the package is imported, so adding a task is adding one file here
(plus its config fragments); code outside the package registers its own with :func:`register_task`.
See ``docs/guide/tasks.md``.
"""

from __future__ import annotations

import importlib
import pkgutil

from antidote_pl.data.tasks._registry import Task, get_task, is_correct, register_task, task_names

__all__ = ["Task", "get_task", "is_correct", "register_task", "task_names"]


def _register_builtin_tasks() -> None:
    """Imports every task module of this package and registers its ``TASK``."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            register_task(importlib.import_module(f"{__name__}.{module.name}").TASK)


_register_builtin_tasks()
