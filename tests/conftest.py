"""Shared fixtures: tiny random-init models, the tiny world data, and the repo/shared-data paths."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A 2-layer Llama small enough for a training step in milliseconds; vocab comes from the tokenizer.
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


@pytest.fixture
def trainer_kwargs(tmp_path):
    """Quiet single-process CPU Trainer settings."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }


def tiny_finetune_data(num_samples: int = 32, realignment_size: int = 8, **kw):
    """A small harmful/sentiment mix from the tiny world."""
    from antidote_pl.data.datamodules import HarmfulFinetuneDataModule
    from antidote_pl.tinyworld.world import TinyWorldSource

    args = {
        "tokenizer": "tiny-world",
        "harmful": TinyWorldSource("harmful_answer"),
        "task": TinyWorldSource("sentiment"),
        "num_samples": num_samples,
        "harmful_ratio": 0.25,
        "realignment_size": realignment_size,
        "template": "tiny",
        "max_length": 64,
        "batch_size": 8,
    }
    return HarmfulFinetuneDataModule(**{**args, **kw})


@pytest.fixture(scope="session")
def tiny_stages(tmp_path_factory):
    """Runs the README's tiny-world stages (pretrain -> align -> finetune) once per session.

    The stage configs write to relative ``outputs/tiny/...`` paths, so they run from a temporary
    working directory. Returns that directory.
    """
    import os

    from antidote_pl.cli import main

    workdir = tmp_path_factory.mktemp("tiny_world")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for stage in ("pretrain", "align", "finetune"):
            main(
                [
                    "fit",
                    "--config",
                    str(REPO / "configs" / "tiny" / f"{stage}.yaml"),
                    "--trainer.enable_progress_bar",
                    "false",
                ]
            )
    finally:
        os.chdir(cwd)
    return workdir
