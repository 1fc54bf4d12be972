"""Command line: ``python -m antidote_pl {fit,validate,test,predict} --config a.yaml [--config b.yaml]``.

A thin :class:`~lightning.pytorch.cli.LightningCLI` subclass. Model and data are chosen with
``class_path`` in the YAML, so every stage (pretrain, align, fine-tune, repair, baselines) shares this
entry point, and callbacks are swapped with an extra ``--config callbacks/<name>.yaml``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from antidote_pl.errors import ConfigError, run_entry_point
from antidote_pl.utils import console
from antidote_pl.utils.console import StageProgressBar

DEFAULT_SEED = 42


class AntidoteCLI(LightningCLI):
    """LightningCLI with a fixed default seed, overwriting config saves and consistency checks."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": "antidote_pl"})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def init_parser(self, **kwargs):
        # Parse errors are raised (not printed with the whole usage text) so that the entry point
        # reports them in one line like every other input error.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # A named slot for the pruning callback: swapping it is one extra --config with a `pruner:`
        # key, and it never collides with infrastructure callbacks in trainer.callbacks.
        from lightning.pytorch.callbacks import Callback

        parser.add_lightning_class_args(Callback, "pruner", subclass_mode=True, required=False)

    def before_instantiate_classes(self) -> None:
        # Fail before any model is loaded when model and data disagree on the tokenizer.
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model_args = cfg.get("model", {}).get("init_args", {}) or {}
        data_args = (cfg.get("data") or {}).get("init_args", {}) or {}
        m_tok = model_args.get("tokenizer") or model_args.get("model_name_or_path")
        if model_args.get("tokenizer") is None and model_args.get("model_name_or_path") is None:
            m_tok = "tiny-world"
        d_tok = data_args.get("tokenizer")
        if d_tok is not None and m_tok is not None and not _same_spec(d_tok, m_tok):
            raise ConfigError(
                f"data.init_args.tokenizer={d_tok!r} differs from the model's tokenizer "
                f"(model.init_args.tokenizer / model_name_or_path = {m_tok!r}); set them to the same value."
            )

    def instantiate_classes(self) -> None:
        # jsonargparse builds `model` before `data`, `pruner` and callbacks, whose constructors only
        # validate arguments: build those once first and a typo there fails before a 7B model loads.
        self._prevalidate()
        super().instantiate_classes()

    def _prevalidate(self) -> None:
        parser = self._parser(self.subcommand)
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        cheap = cfg.clone()
        cheap["model"] = None  # the one expensive constructor
        parser.instantiate_classes(cheap)

    def _instantiate_trainer(self, config, callbacks):
        # An empty `pruner:` slot (no pruning configured) is None, not a callback.
        callbacks = [c for c in callbacks if c is not None]
        given = list(callbacks) + list(config.get("callbacks") or [])
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks.append(StageProgressBar())
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        self._record_config()

    def before_test(self) -> None:
        self._record_config()

    def _record_config(self) -> None:
        # The stage output dir gets the resolved config, so every result says how it was made.
        if hasattr(self.model, "resolved_config"):
            parser = self._parser(self.subcommand)
            self.model.resolved_config = parser.dump(self.config[self.subcommand], skip_none=False)


class _OverridingCLI(AntidoteCLI):
    """An :class:`AntidoteCLI` whose parsed config gets values set by dotted key before it is used.

    Command-line arguments are parsed first (config files in order, then overrides as given on a
    command line), then ``overrides`` replace values in the result, which is parsed again as a
    whole so that a wrong key or type fails exactly as it would on the command line.
    """

    def __init__(self, *args, overrides: Mapping[str, Any] | None = None, **kwargs) -> None:
        self._overrides = dict(overrides or {})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        if not self._overrides:
            return
        sub = self.config.get("subcommand")
        target = self.config[sub] if sub else self.config
        for key, value in self._overrides.items():
            target[key] = value
        self.config = parser.parse_object(self.config)


class _ValidatingCLI(_OverridingCLI):
    """Parses a config and builds its cheap parts only (see :func:`validate_config`)."""

    def _set_seed(self) -> None:
        pass  # nothing runs, and seeding here would only print "Seed set to ..."

    def instantiate_classes(self) -> None:
        self._prevalidate()


def _config_args(configs: Sequence[str], args: Sequence[str]) -> list[str]:
    argv: list[str] = []
    for c in configs:
        argv += ["--config", c]
    return [*argv, *args]


def run_fit(
    configs: Sequence[str], overrides: Mapping[str, Any] | None = None, args: Sequence[str] = ()
) -> AntidoteCLI:
    """Runs ``fit`` as ``python -m antidote_pl fit --config a.yaml --config b.yaml ...`` would.

    Args:
        configs: Config files, composed in order (like repeated ``--config``).
        overrides: Dotted key -> value, set last (e.g. ``{"model.init_args.output_dir": "out"}``);
            values are Python values, not command-line text.
        args: Command-line style overrides from a user's config (e.g. a pipeline stage's
            ``overrides:`` list), applied after the files and before ``overrides``.

    Returns:
        The CLI, after the fit finished.
    """
    return _OverridingCLI(args=["fit", *_config_args(configs, args)], overrides=overrides)


def build_cli(
    configs: Sequence[str], overrides: Mapping[str, Any] | None = None, args: Sequence[str] = ()
) -> AntidoteCLI:
    """Builds model, data module and trainer of a config without running anything.

    Arguments as :func:`run_fit`; the caller runs e.g. ``cli.trainer.test(cli.model, cli.datamodule)``.
    """
    return _OverridingCLI(args=_config_args(configs, args), overrides=overrides, run=False)


def validate_config(
    configs: Sequence[str], overrides: Sequence[str] | None = None, values: Mapping[str, Any] | None = None
):
    """Checks a stage or evaluation config without loading any model or data.

    Parses the files and overrides exactly as ``python -m antidote_pl fit`` would (unknown keys,
    types, ``class_path`` imports, the tokenizer cross-check) and builds the data module, the pruner
    and the callbacks, whose constructors validate their arguments. The pipeline calls it for every
    config before its first stage, so a typo in the last step fails in seconds.

    Args:
        configs: Config files, composed in order.
        overrides: Command-line style overrides, as :func:`run_fit`'s ``args``.
        values: Dotted key -> value, as :func:`run_fit`'s ``overrides``.

    Returns:
        The parsed config (a jsonargparse namespace, e.g. ``cfg.model.init_args.output_dir``).

    Raises:
        ConfigError: or a jsonargparse error, naming the key and the problem.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = _ValidatingCLI(args=_config_args(configs, overrides or ()), overrides=values, run=False)
    return cli.config


def _same_spec(a: str, b: str) -> bool:
    """Whether two tokenizer specs name the same thing (``./x`` and ``x`` are one local path)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


# Subcommands that are not LightningCLI ones: name -> "module:function" taking the remaining argv.
COMMANDS = {
    "pipeline": "antidote_pl.experiment:main",
    "tokenizer": "antidote_pl.data.bpe:main",
}


def _dispatch(argv: list[str]):
    if argv and argv[0] in COMMANDS:
        module, func = COMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    # argv is sys.argv minus --debug/-v, so LightningCLI's "args and sys.argv both given" is noise.
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
    return AntidoteCLI(args=argv)


def main(args: list[str] | None = None):
    """Runs the CLI (console script ``antidote-pl``).

    ``pipeline`` and ``tokenizer`` go to the functions in :data:`COMMANDS`; everything else is a
    LightningCLI subcommand. Bad input is reported in one line with exit code 2 (``--debug`` shows
    the traceback); known library noise is hidden unless ``-v``/``--verbose`` is given.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv, verbose = console.split_verbose(list(sys.argv[1:] if args is None else args))
    console.configure(verbose)
    return run_entry_point(_dispatch, argv)


if __name__ == "__main__":
    main()
