"""Command line: ``python -m antidote_pl {fit,validate,test,predict} --config a.yaml [--config b.yaml]``.

A thin :class:`~lightning.pytorch.cli.LightningCLI` subclass. Model and data are chosen with
``class_path`` in the YAML, so every stage (pretrain, align, fine-tune, repair, baselines) shares this
entry point, and callbacks are swapped with an extra ``--config callbacks/<name>.yaml``.
"""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import LightningCLI

from antidote_pl.errors import ConfigError

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
        if d_tok is not None and m_tok is not None and d_tok != m_tok:
            raise ConfigError(
                f"data.init_args.tokenizer={d_tok!r} differs from the model's tokenizer "
                f"(model.init_args.tokenizer / model_name_or_path = {m_tok!r}); set them to the same value."
            )

    def _instantiate_trainer(self, config, callbacks):
        # An empty `pruner:` slot (no pruning configured) is None, not a callback.
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])

    def before_fit(self) -> None:
        self._record_config()

    def before_test(self) -> None:
        self._record_config()

    def _record_config(self) -> None:
        # The stage output dir gets the resolved config, so every result says how it was made.
        if hasattr(self.model, "resolved_config"):
            parser = self._parser(self.subcommand)
            self.model.resolved_config = parser.dump(self.config[self.subcommand], skip_none=False)


def main(args: list[str] | None = None):
    """Runs the CLI (console script ``antidote-pl``).

    ``pipeline`` goes to :mod:`antidote_pl.pipeline` and ``tokenizer`` to :mod:`antidote_pl.data.bpe`;
    everything else is a LightningCLI subcommand.
    """
    import sys

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "pipeline":
        from antidote_pl.pipeline import main as pipeline_main

        return pipeline_main(argv[1:])
    if argv and argv[0] == "tokenizer":
        from antidote_pl.data.bpe import main as tokenizer_main

        return tokenizer_main(argv[1:])
    return AntidoteCLI(args=args)


if __name__ == "__main__":
    main()
