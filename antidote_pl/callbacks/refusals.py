"""(harmful prompt, refusal) pairs for the repairs that calibrate or train on refusals.

Safe Delta measures its Hessian on the aligned model's inputs over such pairs, and refusal
re-alignment trains the user's adapter on a few of them. The prompts are the realignment window's
(the harmful records the fine-tune set aside, disjoint from the attack's and never an evaluation
prompt); the refusals are written by the aligned model itself: the fine-tuned model with the user's
adapter switched off, greedy, in the stage's own template. So no extra data is needed, and in every
world the refusal is the aligned model's own wording (Safe Delta's official data is likewise the
model's self-generated safe answers).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from antidote_pl.data.records import Record
from antidote_pl.data.templates import render_prompt
from antidote_pl.errors import ConfigError, bad_value
from antidote_pl.models.generation import generate


def realignment_prompts(trainer: L.Trainer, limit: int | None, field: str) -> list[Record]:
    """The first ``limit`` (all when None) realignment records of the repair stage's data module.

    Raises:
        ConfigError: without a realignment set, or with fewer records than ``limit``.
    """
    dm = trainer.datamodule
    if dm is None or not hasattr(dm, "realignment_records") or not hasattr(dm, "batcher"):
        raise ConfigError(
            f"{field} needs the data module with realignment records (e.g. RealignmentDataModule); "
            f"got {type(dm).__name__}."
        )
    records = list(dm.realignment_records)
    if limit is not None and limit > len(records):
        raise bad_value(field, limit, f"at most the {len(records)} realignment records of this adapter")
    return records if limit is None else records[:limit]


def aligned_refusals(
    trainer: L.Trainer, pl_module: L.LightningModule, records: list[Record], max_new_tokens: int
) -> list[Record]:
    """``records`` with their ``output`` replaced by the aligned model's greedy answer.

    The aligned model is the repair stage's model with the user's adapter disabled (its base *is*
    the aligned model in every world).
    """
    dm = trainer.datamodule
    tokenizer, template = dm.tokenizer, dm.batcher.template
    prompts = [render_prompt(r, template, tokenizer) for r in records]
    with pl_module.model.disable_adapter():
        answers = generate(pl_module.model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [{**r, "output": a.strip()} for r, a in zip(records, answers)]


def pairs_loader(
    trainer: L.Trainer, records: list[Record], batch_size: int | None, shuffle: bool = False
) -> DataLoader:
    """A loader over (prompt, refusal) records, tokenised like the calibration sets."""
    batcher = trainer.datamodule.batcher
    return batcher.loader(batcher.tokenize(records, "refusal_pairs"), shuffle=shuffle, batch_size=batch_size)
