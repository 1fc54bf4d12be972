"""The command line: a real `python -m antidote_pl fit` run, single process and 2-process DDP on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, TINY_LLAMA, finetune_data_config

from antidote_pl.utils.files import STAGE_FILE


def write_config(tmp_path, **trainer) -> str:
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "logs"),
            **trainer,
        },
        "model": {
            "class_path": "antidote_pl.training.sft.CausalLMSFTModule",
            "init_args": {
                "model_config": TINY_LLAMA,
                "tokenizer": "tiny-world",
                "lora_r": 4,
                "learning_rate": 1e-2,
                "output_dir": str(tmp_path / "out"),
            },
        },
        "data": finetune_data_config("tiny-world", batch_size=4),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "antidote_pl", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fit_writes_stage_output_and_config(tmp_path):
    run_cli("fit", "--config", write_config(tmp_path), cwd=tmp_path)
    out = tmp_path / "out"
    meta = json.loads((out / STAGE_FILE).read_text())
    assert meta["global_step"] == 4 and meta["kind"] == "adapter"
    # The resolved config is saved beside the outputs and records the fixed seed.
    assert yaml.safe_load((out / "config.yaml").read_text())["seed_everything"] == 7


def test_a_default_fit_prints_no_library_warning_and_writes_only_its_output(tmp_path):
    """Issue #25: no FutureWarning (peft's is_gradient_checkpointing) or any other library warning on
    a default run, and no config.yaml in default_root_dir: the stage's config is in its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "antidote_pl", "fit", "--config", write_config(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "warn(" not in proc.stderr, proc.stderr
    assert (tmp_path / "out" / "config.yaml").is_file()
    assert not (tmp_path / "logs" / "config.yaml").exists()


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    config = write_config(tmp_path, devices=2, strategy="ddp")
    # -v: Lightning's own "distributed_backend=gloo" line is library output, hidden by default.
    proc = run_cli("fit", "--config", config, "-v", cwd=tmp_path)
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    meta = json.loads((tmp_path / "out" / STAGE_FILE).read_text())
    assert meta["global_step"] == 4
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_help_names_the_program():
    proc = run_cli("fit", "--help", cwd=REPO)
    assert "antidote_pl" in proc.stdout
