"""What a command prints: the progress bar, the project's own messages, and no library chatter.

The project's one message channel: :func:`say` logs a message (progress, what was written) under
``antidote_pl`` on rank zero, to stderr; :func:`print_result` prints a command's result (a table,
JSON, a verdict) to stdout, where a user may redirect it. By default the entry point silences what
libraries print on every run (Lightning's accelerator report, seed and tips, transformers'
shard-writing bar, known deprecation warnings); ``-v``/``--verbose`` keeps everything.
"""

from __future__ import annotations

import logging
import sys
import warnings

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("antidote_pl")

VERBOSE_FLAGS = ("-v", "--verbose")

# Library loggers whose INFO lines repeat on every run ("GPU available", "Seed set to", tips).
_CHATTY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed")
# Warnings that are known, harmless here, and fixed upstream or by design of the project.
_KNOWN_WARNINGS = (
    r".*LeafSpec.*is deprecated.*",
    r".*Total length of `list` across ranks is zero.*",
    r".*does not have many workers.*",
    r".*args parameter is intended to run from within Python.*",
    r".*dataloader is not resumable.*",
    # A repair or evaluation stage runs the module's fit loop without validation data on purpose.
    r".*You defined a `validation_step` but have no `val_dataloader`.*",
    # peft saving an adapter on a GGUF base: the package directory holds no config.json to compare
    # vocabularies with; the embeddings are not adapted, so nothing is lost.
    r".*Could not find a config file in .* will assume that the vocabulary was not modified.*",
)


@rank_zero_only
def say(message: str) -> None:
    """Logs a project message on global rank zero (shown by default, unlike library INFO)."""
    log.info(message)


@rank_zero_only
def print_result(text: str) -> None:
    """Prints a command's result (a table, JSON, a verdict) to stdout, on global rank zero."""
    print(text, flush=True)


def configure(verbose: bool) -> None:
    """Sets up the project's logger and, unless ``verbose``, quiets library noise."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if verbose:
        return
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """Removes ``-v``/``--verbose`` from ``argv``; returns the rest and whether it was there."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS]
    return rest, len(rest) != len(argv)


class StageProgressBar(RichProgressBar):
    """Lightning's rich progress bar, without the ``Epoch 0/-2`` of step-limited runs."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            # Step-limited (max_epochs -1): show the step budget instead of a negative epoch count.
            steps = self.trainer.max_steps
            budget = f" (max {steps} steps)" if steps and steps > 0 else ""
            return f"Epoch {current_epoch}{budget}"
        return super()._get_train_description(current_epoch)
