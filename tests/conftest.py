"""Shared fixtures: tiny random-init models, the tiny world data, and the repo/shared-data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: Test files whose fixtures run a whole pipeline (minutes). They are collected first so that with
#: README's ``-n 2`` (files kept whole, ``--dist loadfile --no-loadscope-reorder`` in pyproject)
#: each starts at once on a worker and the other worker runs the rest meanwhile; collected last,
#: one of them would start only when the other tests were nearly done and add its whole time.
LONG_FILES = ("test_tiny_world_e2e.py", "test_smol_world.py")


def pytest_configure(config) -> None:
    """One torch thread per xdist worker: two workers on 2 cores, each with torch's default of every
    core, would run 4 threads on 2 cores and slow each other down."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Moves :data:`LONG_FILES` to the front, keeping every other test in its order."""
    items.sort(key=lambda item: item.path.name not in LONG_FILES)


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


@pytest.fixture(scope="session")
def data() -> Path:
    """The real public datasets in ``../shared/data``; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def assert_schema(records) -> None:
    """Every record has string ``instruction``, ``input`` and ``output``."""
    from antidote_pl.data.records import REQUIRED_FIELDS

    for r in records:
        assert all(isinstance(r[k], str) for k in REQUIRED_FIELDS), r


def quiet_trainer_kwargs(root, **overrides) -> dict:
    """Single-process CPU Trainer settings without loggers, checkpoints or progress bars."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        **overrides,
    }


@pytest.fixture
def trainer_kwargs(tmp_path):
    """Quiet single-process CPU Trainer settings."""
    return quiet_trainer_kwargs(tmp_path)


def tiny_finetune_data(num_samples: int = 32, realignment_size: int = 8, **kw):
    """A small harmful/sentiment mix from the tiny world."""
    from antidote_pl.tinyworld.world import TinyWorldSource
    from antidote_pl.training.datamodules import HarmfulFinetuneDataModule

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


def finetune_data_config(tokenizer: str, batch_size: int = 8) -> dict:
    """The ``data:`` block of a small tiny-world fine-tune config (what :func:`tiny_finetune_data` builds)."""
    world = "antidote_pl.tinyworld.world.TinyWorldSource"
    return {
        "class_path": "antidote_pl.training.datamodules.HarmfulFinetuneDataModule",
        "init_args": {
            "tokenizer": tokenizer,
            "template": "tiny",
            "max_length": 64,
            "batch_size": batch_size,
            "num_samples": 32,
            "harmful_ratio": 0.25,
            "realignment_size": 8,
            "harmful": {"class_path": world, "init_args": {"kind": "harmful_answer"}},
            "task": {"class_path": world, "init_args": {"kind": "sentiment"}},
        },
    }


def make_stages(root: Path) -> tuple[Path, Path]:
    """Saves a tiny full base and a LoRA (r=4) trained 3 steps on it at lr 1e-2, so B != 0.

    Returns:
        ``(base, adapter)``: ``root/base`` and ``root/finetune``.
    """
    import lightning as L

    from antidote_pl.training.sft import CausalLMSFTModule

    L.seed_everything(0)
    base, adapter = root / "base", root / "finetune"
    full = CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full")
    full.save_stage(str(base))
    finetune = CausalLMSFTModule(model_name_or_path=str(base), lora_r=4, lora_alpha=8, learning_rate=1e-2)
    L.Trainer(max_steps=3, **quiet_trainer_kwargs(root)).fit(finetune, datamodule=tiny_finetune_data())
    finetune.save_stage(str(adapter))
    return base, adapter


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """Runs the README's main job (the tiny-world pipeline) once per session, in a temporary cwd.

    The configs write to relative ``outputs/tiny/...`` paths. Returns ``(workdir, report)``.
    """
    import os

    import yaml

    from antidote_pl.commands.dispatch import run

    workdir = tmp_path_factory.mktemp("tiny_world")
    # The pipeline's config paths are relative to the repository root; outputs to the cwd.
    cfg = yaml.safe_load((REPO / "configs" / "tiny" / "pipeline.yaml").read_text())
    for stage in cfg["stages"]:
        stage["config"] = str(REPO / stage["config"])
    cfg["repair"]["config"] = str(REPO / cfg["repair"]["config"])
    cfg["repair"]["methods"] = {m: str(REPO / f) for m, f in cfg["repair"]["methods"].items()}
    cfg["evaluation"] = str(REPO / cfg["evaluation"])
    (workdir / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        report = run(["pipeline", "--config", str(workdir / "pipeline.yaml")])
    finally:
        os.chdir(cwd)
    return workdir, report


#: A 2-layer decoder's config fields (hidden 32, 4 heads, 2 KV heads, vocab 64), shared by the tests
#: that build Llama-style models of several architectures.
SMALL_DECODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def small_llama(seed: int = 0, **overrides):
    """A randomly initialised :data:`SMALL_DECODER` Llama for tests that need a real decoder's module
    layout; ``overrides`` change any config field."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(SMALL_DECODER | overrides)))


def small_eval_config() -> dict:
    """``configs/tiny/eval.yaml`` shrunk for pipeline tests: 60 harmful prompts, 40 test and 20
    validation questions (the FA budget's choice)."""
    import yaml

    ev = yaml.safe_load((REPO / "configs/tiny/eval.yaml").read_text())
    data = ev["data"]["init_args"]
    data["harmful"]["init_args"]["limit"] = data["task"]["init_args"]["limit"] = 60
    data["task_limit"], data["fa_validation_size"] = 40, 20
    return ev


def small_tiny_stages(finetune_config: str | list[str] | None = None) -> list[dict]:
    """The tiny world's pretrain, aligned and finetuned stages, shrunk to seconds (pipeline specs)."""
    quiet = "--trainer.enable_progress_bar=false"
    fast = "--model.init_args.model_config=tiny-world-fast"
    return [
        {
            "name": "pretrain",
            "config": str(REPO / "configs/tiny/pretrain.yaml"),
            "overrides": [fast, "--trainer.max_steps=20", quiet],
        },
        {
            "name": "aligned",
            "config": str(REPO / "configs/tiny/align.yaml"),
            "overrides": ["--trainer.max_steps=5", quiet],
        },
        {
            "name": "finetuned",
            "config": finetune_config or str(REPO / "configs/tiny/finetune.yaml"),
            "overrides": ["--trainer.max_epochs=1", "--data.init_args.num_samples=64", quiet],
        },
    ]
