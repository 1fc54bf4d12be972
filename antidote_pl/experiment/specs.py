"""What a pipeline run is made of: its stage, repair, baseline and durability specs, and their files.

The specs are the ``pipeline:`` YAML's blocks (parsed by the ``pipeline`` command); the helpers read
their config files (the texts that key the pipeline's caches) and, through the very parser each step
runs with (never a hand-made YAML merge), find the directory a stage writes and the class in a
repair's ``pruner:`` slot, before anything runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from antidote_pl.callbacks.repair import BaseRepairCallback
from antidote_pl.errors import bad_value, check_choice
from antidote_pl.stages.cli import parse_config
from antidote_pl.stages.tokenizer import parse_tokenizer_config

STAGE_COMMANDS = ("fit", "tokenizer")


def config_list(config: str | list[str]) -> list[str]:
    """Config files in composition order: one file, or a list of them (like repeated ``--config``)."""
    return [config] if isinstance(config, str) else list(config)


@dataclass
class StageSpec:
    """One training stage.

    Args:
        name: Short name used in the report (e.g. ``align``).
        config: Config file for ``python -m antidote_pl <command>``, or a list of them composed in
            order like repeated ``--config`` (e.g. a base config and a defense fragment).
        overrides: Extra command-line arguments for that run.
        command: ``fit`` (a model stage, writing ``model.init_args.output_dir``) or ``tokenizer``
            (trains a tokenizer, writing the config's ``output_dir``; :mod:`antidote_pl.stages.tokenizer`).
    """

    name: str
    config: str | list[str]
    overrides: list[str] = field(default_factory=list)
    command: str = "fit"

    @property
    def configs(self) -> list[str]:
        """The config files, in composition order (one for a single ``config`` string)."""
        return config_list(self.config)


@dataclass
class RepairSpec:
    """The repair sweep.

    Args:
        config: Repair config (``fit`` with ``max_epochs: 0`` on the fine-tuned adapter), or a list
            of config files composed in order; each method's fragment is composed after them.
        alphas: Fractions removed, each in (0, 1): the sweep of every pruning method.
        methods: Method name -> callback fragment (``callbacks/*.yaml``).
        values: Method name -> its knob values, for every weight-editing method (a callback built on
            :class:`~antidote_pl.callbacks.repair.BaseRepairCallback`: delta scaling, RESTA,
            SafeLoRA, Safe Delta, refusal re-alignment), whose knobs are not fractions removed.
        overrides: Extra command-line arguments for every scoring run (e.g. the fine-tuned adapter
            of one seed, see :mod:`antidote_pl.experiment.seeds`).
        method_overrides: Method name -> extra arguments for that method's scoring run only (e.g.
            ``--pruner.init_args.seed`` of the random ablation).
    """

    config: str | list[str]
    alphas: list[float]
    methods: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)

    @property
    def configs(self) -> list[str]:
        """The config files, in composition order."""
        return config_list(self.config)

    def swept(self, method: str, alphas: list[float]) -> list[float]:
        """The knob values ``method`` is evaluated at: its ``values``, else ``alphas``."""
        return sorted(self.values[method]) if method in self.values else alphas

    def args(self, method: str) -> list[str]:
        """The user's extra arguments for ``method``'s scoring run."""
        return [*self.overrides, *self.method_overrides.get(method, [])]


@dataclass
class BaselineSpec:
    """A baseline defense: its own training stages, evaluated as one report row.

    Args:
        name: Row name (e.g. ``vaccine``).
        stages: Stages run after the main ones (e.g. a Vaccine alignment, then the same harmful
            fine-tuning on top of it); the last one is evaluated.
        repair_fragment: Optionally also repair the last stage with this callback fragment (e.g.
            ``callbacks/wanda.yaml``), reported as ``<name>+<method>`` (a combined defense).
        repair_alpha: Alpha for that repair.
    """

    name: str
    stages: list[StageSpec]
    repair_fragment: str | None = None
    repair_alpha: float = 0.1

    @property
    def combined_name(self) -> str:
        """The combined defense's row name, ``<name>+<fragment stem>``."""
        return f"{self.name}+{Path(self.repair_fragment or '').stem}"


@dataclass
class DurabilitySpec:
    """The re-attack: the same harmful fine-tuning continued from repaired and unrepaired models.

    Args:
        checkpoints: Optimiser steps at which HS/FA are measured, e.g. ``[0, 10, 20]``.
        alpha: The repair's alpha (one of ``repair.alphas``).
        methods: Repair methods re-attacked at that alpha (the unrepaired model always is).
        from_budget: Also re-attack each of ``budget_methods`` at the knob value its validation split
            chose under this FA budget (points; :mod:`antidote_pl.experiment.budget`), so the
            leaderboard's "does it last" is measured on the setting it reports; a method with no
            setting within the budget is not re-attacked.
        budget_methods: The methods re-attacked at their budget choice (null: every repair method).
    """

    checkpoints: list[int]
    alpha: float = 0.1
    methods: list[str] = field(default_factory=lambda: ["wanda", "random"])
    from_budget: float | None = None
    budget_methods: list[str] | None = None


def read_config(path: str, field: str) -> str:
    """The text of a config file named by ``field``.

    Raises:
        ConfigError: when the file does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise bad_value(field, path, "an existing YAML file")
    return p.read_text()


def config_text(config: str | list[str], field: str) -> str:
    """The text of every config file (a list's items named ``<field>[i]``); a single file gives just
    its text, so the keys of caches written before lists existed stay valid."""
    if isinstance(config, str):
        return read_config(config, field)
    if not config:
        raise bad_value(field, config, "a config file or a non-empty list of them")
    return "\0".join(read_config(c, f"{field}[{i}]") for i, c in enumerate(config))


def parse_stage(spec: StageSpec, field: str) -> Any:
    """A stage's config files and overrides as its command parses them, with nothing built.

    Raises:
        ConfigError: for an unknown ``command``.
        argparse.ArgumentError: (jsonargparse's) for a key, value or file the command's parser refuses,
            exactly as the command would.
    """
    check_choice(f"{field}.command", spec.command, STAGE_COMMANDS)
    if spec.command == "tokenizer":
        return parse_tokenizer_config(spec.configs, spec.overrides)
    return parse_config(spec.configs, spec.overrides)


def stage_text(spec: StageSpec, field: str) -> str:
    """A stage's config text for its cache key; a tokenizer's ``corpus_config`` text is part of it,
    so editing the pretraining data retrains the tokenizer too."""
    check_choice(f"{field}.command", spec.command, STAGE_COMMANDS)
    text = config_text(spec.config, f"{field}.config")
    if spec.command == "tokenizer":
        corpus = parse_stage(spec, field).get("corpus_config")
        if corpus:
            text += "\0" + read_config(corpus, f"{field}.corpus_config")
    return text


def stage_output_dir(spec: StageSpec, field: str, parsed: Any = None) -> str:
    """The directory a stage writes, as its parser resolves it (files composed, then overrides).

    ``fit`` stages write ``model.init_args.output_dir``, ``tokenizer`` stages ``output_dir``.

    Args:
        spec: The stage.
        field: Its place in the pipeline config, for error messages (e.g. ``stages[0]``).
        parsed: The stage's config as :func:`parse_stage` (or a validation) returned it, if at hand.
    """
    cfg = parse_stage(spec, field) if parsed is None else parsed
    key = "model.init_args.output_dir" if spec.command == "fit" else "output_dir"
    out = cfg.get(key)
    if not out:
        raise bad_value(f"{field}.config", spec.config, f"a {spec.command} config that sets {key}")
    return str(out)


def check_last_is_fit(stages: list[StageSpec], field: str, why: str) -> None:
    """Raises a :class:`ConfigError` unless the last of ``stages`` is a ``fit`` (model) stage."""
    if stages[-1].command != "fit":
        raise bad_value(f"{field}[{len(stages) - 1}].command", stages[-1].command, f"'fit': {why}")


def run_inputs(
    stages: list[StageSpec],
    repair: RepairSpec,
    evaluation: str | list[str],
    baselines: list[BaselineSpec] | None,
) -> dict[str, Any]:
    """A run's config files, ``field -> paths``, which its output directory must stay apart from."""
    return {
        "stages": [c for s in stages for c in s.configs],
        "repair.config": repair.config,
        "repair.methods": list(repair.methods.values()),
        "evaluation": config_list(evaluation),
        "baselines": [c for b in baselines or [] for s in b.stages for c in s.configs],
    }


def pruner_class(configs: list[str], args: list[str] | None = None) -> type | None:
    """The class in the ``pruner:`` slot of composed configs and overrides (``None`` when empty)."""
    pruner = parse_config(configs, args).get("pruner")
    path = pruner.get("class_path") if pruner is not None else None
    if not path or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def check_method_kind(
    method: str, configs: list[str], has_values: bool, args: list[str] | None = None
) -> None:
    """A weight-editing callback needs ``repair.values`` (its knob is no alpha); a pruning one must
    have none (it is swept over ``repair.alphas``).

    Raises:
        ConfigError: naming the method, for either mismatch.
    """
    cls = pruner_class(configs, args)
    name = getattr(cls, "__name__", "its callback")
    edits = isinstance(cls, type) and issubclass(cls, BaseRepairCallback)
    if edits and not has_values:
        raise bad_value(
            f"repair.values.{method}", None, f"the knob values of {name} (a weight-editing repair)"
        )
    if has_values and not edits:
        raise bad_value(f"repair.values.{method}", "given", f"nothing: {name} is swept over repair.alphas")
