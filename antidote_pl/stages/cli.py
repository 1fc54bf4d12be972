"""The stage runner: ``python -m antidote_pl {fit,validate,test,predict} --config a.yaml [--config b.yaml]``.

A thin :class:`~lightning.pytorch.cli.LightningCLI` subclass (the command line reaches it through
:mod:`antidote_pl.commands.stages`). Model and data are chosen with
``class_path`` in the YAML, so every stage (pretrain, align, fine-tune, repair, baselines) shares this
entry point, and callbacks are swapped with an extra ``--config callbacks/<name>.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse.typing import register_type
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from antidote_pl.errors import ConfigError, bad_file
from antidote_pl.models.loading import TINY_WORLD
from antidote_pl.utils.console import StageProgressBar
from antidote_pl.utils.files import read_yaml_file
from antidote_pl.utils.placeholders import RUN_NAMES, SEED, fill_placeholders
from antidote_pl.utils.threads import DEFAULT_THREADS, check_threads, pinned_threads, set_threads

DEFAULT_SEED = 42
#: ``trainer.deterministic`` unless a config says otherwise: torch's deterministic algorithms,
#: warning (not failing) on an op that has none. On CPU it changes no result and costs nothing
#: measurable; on CUDA Lightning also sets the cuBLAS workspace it needs.
DEFAULT_DETERMINISTIC = "warn"


class ThreadCount:
    """The type of the ``threads`` argument: an int >= 1 (see :mod:`antidote_pl.utils.threads`).

    Registered with jsonargparse so that a bad value is the one-line :class:`ConfigError` of
    :func:`~antidote_pl.utils.threads.check_threads`; parsed values are plain ints.
    """


register_type(ThreadCount, serializer=int, deserializer=lambda value: check_threads(value, "threads"))


class PinThreads(Callback):
    """Sets the stage's torch thread count for each run of its Trainer and restores the caller's after.

    The CLI sets the count before the model is built; this keeps it when a caller interleaves runs
    of several stages in one process (e.g. the re-attack trains one stage and evaluates with another).
    """

    def __init__(self, threads: int) -> None:
        self.threads = check_threads(threads)
        self._previous: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._previous = set_threads(self.threads)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            set_threads(self._previous)
            self._previous = None


class AntidoteCLI(LightningCLI):
    """LightningCLI with a fixed default seed, a pinned torch thread count (``threads``, see
    :mod:`antidote_pl.utils.threads`), deterministic algorithms, the ``pruner`` slot and the
    model -> data links (:func:`link_model_to_data`).

    Lightning's SaveConfigCallback is off: it wrote ``<default_root_dir>/config.yaml`` on every run,
    outside the output, and a stage records its resolved config in its own output directory.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("seed_everything_default", DEFAULT_SEED)
        kwargs.setdefault("save_config_callback", None)
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
        parser.add_lightning_class_args(Callback, "pruner", subclass_mode=True, required=False)
        parser.add_argument(
            "--threads",
            type=ThreadCount,
            default=DEFAULT_THREADS,
            help="torch CPU threads of this stage (a fixed number, so the result does not depend on "
            "the machine's core count); recorded in antidote_stage.json and metrics.json",
        )
        parser.set_defaults({"trainer.deterministic": DEFAULT_DETERMINISTIC})
        link_model_to_data(parser)
        add_run_names(parser)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        follow_model_adapter(cfg)

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, list | tuple):
            check_config_files(args)
        with _config_errors_unwrapped():
            super().parse_arguments(parser, args)

    def _set_seed(self) -> None:
        # The seed and the thread count are the process-wide settings a stage fixes before any
        # model work; subclasses that run nothing (validation) skip both by overriding this.
        super()._set_seed()
        set_threads(self._get(self.config, "threads"))

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
        callbacks.append(PinThreads(self._get(self.config, "threads")))
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
            # Link targets too (the data tokenizer, paths with run names filled in): the record says
            # what ran, not what the links would recompute.
            config = self.config[self.subcommand]
            self.model.resolved_config = parser.dump(config, skip_none=False, skip_link_targets=False)


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
        with _config_errors_unwrapped():
            self.config = parser.parse_object(self.config)


class _ValidatingCLI(_OverridingCLI):
    """Parses a config and builds its cheap parts only (see :func:`validate_config`)."""

    def _set_seed(self) -> None:
        pass  # nothing runs, and seeding here would only print "Seed set to ..."

    def instantiate_classes(self) -> None:
        self._prevalidate()


class _ParsingCLI(_ValidatingCLI):
    """Parses a config and builds nothing (see :func:`parse_config`)."""

    def instantiate_classes(self) -> None:
        pass


@contextlib.contextmanager
def _config_errors_unwrapped() -> Iterator[None]:
    """Re-raises a :class:`ConfigError` that jsonargparse wrapped in a parse error as itself.

    A link's or an argument type's ConfigError (e.g. a data tokenizer that differs from the model's,
    ``threads: 0``) arrives wrapped in jsonargparse's errors, as the cause or the context.
    """
    try:
        yield
    except argparse.ArgumentError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


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
        The CLI, after the fit finished. The caller's torch thread count is restored (the stage ran
        with its own ``threads``).
    """
    with pinned_threads():
        return _OverridingCLI(args=["fit", *_config_args(configs, args)], overrides=overrides)


def build_cli(
    configs: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    args: Sequence[str] = (),
    save_config: bool = False,
) -> AntidoteCLI:
    """Builds model, data module and trainer of a config without running anything.

    Arguments as :func:`run_fit`; the caller runs e.g. ``cli.trainer.test(cli.model, cli.datamodule)``.
    The model is built with the config's ``threads``, which stays set; each run of the trainer sets
    it again and restores what it found (:class:`PinThreads`).
    ``save_config=True`` adds Lightning's SaveConfigCallback (``<default_root_dir>/config.yaml``),
    which the project's commands leave out.
    """
    extra = {"save_config_callback": SaveConfigCallback, "save_config_kwargs": {"overwrite": True}}
    extra = extra if save_config else {}
    return _OverridingCLI(args=_config_args(configs, args), overrides=overrides, run=False, **extra)


def validate_config(
    configs: Sequence[str], overrides: Sequence[str] | None = None, values: Mapping[str, Any] | None = None
):
    """Checks a stage or evaluation config without loading any model or data.

    Parses the files and overrides exactly as ``python -m antidote_pl fit`` would (unknown keys,
    types, ``class_path`` imports, the model -> data links) and builds the data module, the pruner
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


def parse_config(configs: Sequence[str], overrides: Sequence[str] | None = None):
    """Composes config files and overrides exactly as ``python -m antidote_pl fit`` would, building
    nothing: what a run will use, read through the parser (repeated ``--config``, later values win,
    links, ``class_path`` resolution) rather than by merging YAML by hand.

    Args:
        configs: Config files, composed in order.
        overrides: Command-line style overrides, e.g. ``["--model.init_args.output_dir=x"]``.

    Returns:
        The parsed config (a jsonargparse namespace; ``cfg.get("model.init_args.output_dir")``).

    Raises:
        ConfigError: or a jsonargparse error, naming the key and the problem.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _ParsingCLI(args=_config_args(configs, overrides or ()), run=False).config


CONFIG_FLAGS = ("-c", "--config")


def check_config_files(args: Sequence[str]) -> None:
    """Reads every ``--config`` file of ``args`` before jsonargparse does.

    jsonargparse reports an empty file as "Unexpected config:" and a YAML error at a line of
    ``<unicode string>``; here both name the file.

    Raises:
        ConfigError: ``<file>: <problem>`` for an empty, broken or non-mapping config file.
    """
    what = "a YAML config mapping (trainer:, model:, data:, ...)"
    for i, arg in enumerate(args):
        flag, eq, value = str(arg).partition("=")
        if flag not in CONFIG_FLAGS:
            continue
        value = value if eq else (str(args[i + 1]) if i + 1 < len(args) else "")
        if value and Path(value).expanduser().is_file():
            data = read_yaml_file(Path(value).expanduser(), what)
            if not isinstance(data, dict):
                raise bad_file(value, f"holds a YAML {type(data).__name__}, not a mapping; expected {what}")


def link_model_to_data(parser) -> None:
    """States the tokenizer and the repaired adapter once, in the model, and links them into the data.

    * ``data.init_args.tokenizer`` is the model's tokenizer (``model.init_args.tokenizer``, else
      ``model_name_or_path``, else ``tiny-world``), so a config names it once. An explicit data
      tokenizer must name the same thing (see :func:`data_tokenizer`).

    A link is skipped when its model or data class has no such argument (e.g. the evaluator). The
    repaired adapter follows the model in :func:`follow_model_adapter` (``model.init_args.adapter_path``
    is itself a link target, of :func:`add_run_names`, and jsonargparse does not chain links).
    """
    sources = ("model.init_args.tokenizer", "model.init_args.model_name_or_path", "data.init_args.tokenizer")
    parser.link_arguments(sources, "data.init_args.tokenizer", compute_fn=data_tokenizer)


def follow_model_adapter(cfg) -> None:
    """Sets ``data.init_args.adapter_path`` (the repair stage's
    :class:`~antidote_pl.training.realignment.RealignmentDataModule`) to ``model.init_args.adapter_path``:
    the calibration sets are read from the adapter being repaired. A no-op for data modules without it.

    Raises:
        ConfigError: when both are given and differ.
    """
    data_key, model_key = "data.init_args.adapter_path", "model.init_args.adapter_path"
    if data_key not in cfg or model_key not in cfg:
        return
    given, model = cfg[data_key], cfg[model_key]
    if given is not None and model is not None and str(given) != str(model):
        raise ConfigError(
            f"{data_key}={given!r} differs from {model_key}={model!r}; leave {data_key} unset: the "
            "realignment window is read from the adapter being repaired."
        )
    cfg[data_key] = given if given is not None else model


def data_tokenizer(model_tokenizer: str | None, model_name_or_path: str | None, given: str | None) -> str:
    """The data module's tokenizer: the model's, which an explicit ``data.init_args.tokenizer`` may
    only repeat.

    Raises:
        ConfigError: when the data tokenizer is given and differs from the model's, before anything
            loads.
    """
    model = model_tokenizer or model_name_or_path or TINY_WORLD
    if given is not None and not _same_spec(given, model):
        raise ConfigError(
            f"data.init_args.tokenizer={given!r} differs from the model's tokenizer "
            f"(model.init_args.tokenizer / model_name_or_path = {model!r}); leave data.init_args.tokenizer "
            "unset: it follows the model."
        )
    return given or model


#: Path arguments of the stage and evaluation modules in which the run names are filled.
RUN_PATH_FIELDS = ("output_dir", "adapter_path", "merge_adapters", "stage")


def add_run_names(parser) -> None:
    """Adds ``run.model``, ``run.task`` and ``run.variant`` and fills them into stage paths.

    A path argument of the model (``output_dir``, ``adapter_path``, ``merge_adapters``, the
    evaluator's ``stage``) may say ``outputs/{model}/{task}/{variant}/finetune``; the names come from
    ``run:``, so a stage config states its paths once and a model fragment (``run: {model: ...}``)
    combines with a task fragment (``run: {task: ...}``) without either naming the other's paths.
    Paths without placeholders are left as they are (the syntax: :mod:`antidote_pl.utils.placeholders`).
    """
    for name in RUN_NAMES:
        parser.add_argument(
            f"--run.{name}",
            type=str | None,
            default=None,
            help=f"Fills {{{name}}} in the model's output and input paths (e.g. outputs/{{model}}/align).",
        )
    for field in RUN_PATH_FIELDS:
        target = f"model.init_args.{field}"
        sources = (*(f"run.{n}" for n in RUN_NAMES), target)
        parser.link_arguments(sources, target, compute_fn=_path_filler(target))


def _path_filler(field: str):
    def fill(model: str | None, task: str | None, variant: str | None, value: Any) -> Any:
        return fill_run_names(field, value, {"model": model, "task": task, "variant": variant})

    return fill


def fill_run_names(field: str, value: Any, names: dict[str, str | None]) -> Any:
    """``value`` (a path or a list of paths) with ``{model}``, ``{task}``, ``{variant}`` filled in.

    A ``{seed}`` still there is refused too: the pipeline fills it in the overrides it passes, never
    in a config file's paths, so one left here would name a directory literally.

    Raises:
        ConfigError: when a placeholder's ``run.<name>`` is not set, or on a ``{seed}``.
    """
    return fill_placeholders(field, value, {**names, SEED: None})


def _same_spec(a: str, b: str) -> bool:
    """Whether two tokenizer specs name the same thing (``./x`` and ``x`` are one local path)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
