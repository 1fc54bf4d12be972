"""The torch thread count of a stage (issue #24, determinism): a setting, applied, recorded, validated.

A stage's result must not depend on the machine's core count; it runs with its own ``threads``
(default 1) whatever the calling process uses, and records it.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, quiet_trainer_kwargs
from safetensors.torch import load_file

from antidote_pl.commands.dispatch import main
from antidote_pl.errors import ConfigError
from antidote_pl.stages.cli import PinThreads, build_cli, run_fit, validate_config
from antidote_pl.training.sft import CausalLMSFTModule
from antidote_pl.utils.threads import DEFAULT_THREADS, check_threads, set_threads

PRETRAIN = str(REPO / "configs/tiny/pretrain.yaml")
EVAL = str(REPO / "configs/tiny/eval.yaml")


@pytest.fixture
def outer_threads():
    """Restores the test process's thread count, whatever a test sets."""
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def _pretrain(out, steps: int = 3, **values):
    """A few steps of the tiny world's pretraining stage (the small model) into ``out``."""
    run_fit(
        [PRETRAIN],
        {
            "model.init_args.output_dir": str(out),
            "trainer.max_steps": steps,
            "trainer.enable_progress_bar": False,
            "trainer.default_root_dir": str(out.parent / "logs"),
            **values,
        },
        args=["--model.init_args.model_config=tiny-world-fast"],
    )
    return json.loads((out / "antidote_stage.json").read_text())


def test_default_is_one_thread_and_deterministic_algorithms():
    cfg = validate_config([PRETRAIN])
    assert cfg.threads == DEFAULT_THREADS == 1
    assert cfg.trainer.deterministic == "warn"


def test_stage_runs_with_its_threads_and_restores_the_caller(tmp_path, monkeypatch, outer_threads):
    seen: dict[str, list[int]] = {"build": [], "step": []}
    build, step = CausalLMSFTModule._build_model, CausalLMSFTModule.training_step

    def record(kind, original):
        def wrapped(self, *args, **kwargs):
            seen[kind].append(torch.get_num_threads())
            return original(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(CausalLMSFTModule, "_build_model", record("build", build))
    monkeypatch.setattr(CausalLMSFTModule, "training_step", record("step", step))
    torch.set_num_threads(2)
    meta = _pretrain(tmp_path / "one", steps=2)
    # The model is built and trained with the stage's count, not the caller's.
    assert seen == {"build": [1], "step": [1, 1]}
    assert meta["threads"] == 1 and meta["precision"] == "32-true" and meta["deterministic_algorithms"]
    assert yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())["threads"] == 1
    assert torch.get_num_threads() == 2

    torch.set_num_threads(1)
    seen.update(build=[], step=[])
    meta = _pretrain(tmp_path / "two", steps=1, threads=2)
    assert seen == {"build": [2], "step": [2]} and meta["threads"] == 2
    assert torch.get_num_threads() == 1


def test_weights_do_not_depend_on_the_callers_thread_count(tmp_path, outer_threads):
    def weights(name: str, outer: int, **values):
        torch.set_num_threads(outer)
        _pretrain(tmp_path / name, **values)
        return load_file(tmp_path / name / "model.safetensors")

    one = weights("outer1", 1)
    pinned = weights("outer2", 2)
    assert all(torch.equal(one[k], pinned[k]) for k in one)
    # The stage is sensitive to the count (so the equality above is not trivially true).
    two = weights("threads2", 1, threads=2)
    assert not all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("value", [0, -1, "x", 2.5, True])
def test_bad_threads_are_config_errors_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"^threads=.* is invalid: expected an int >= 1"):
        validate_config([PRETRAIN], values={"threads": value})


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_threads_on_the_command_line_are_one_line(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", PRETRAIN, f"--threads={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("antidote_pl: error: threads=")
    assert "is invalid: expected an int >= 1 (torch CPU threads of the stage)." in err[0]
    assert value in err[0] and len(err) == 1  # one line, the --debug hint folded in


def test_check_threads_accepts_ints_and_digit_strings():
    assert check_threads(3) == 3 and check_threads("2") == 2
    with pytest.raises(ConfigError, match="my.field"):
        check_threads(None, "my.field")


def test_pin_threads_sets_the_count_per_run_and_restores_it(tmp_path, outer_threads):
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, *args):
            seen.append(torch.get_num_threads())

    module = CausalLMSFTModule(model_config="tiny-world-fast", tokenizer="tiny-world", finetuning="full")
    from conftest import tiny_finetune_data

    set_threads(1)
    trainer = L.Trainer(max_steps=1, callbacks=[PinThreads(2), Probe()], **quiet_trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=tiny_finetune_data(num_samples=8, realignment_size=2))
    assert seen == [2] and torch.get_num_threads() == 1


def test_evaluation_records_its_compute_settings(tmp_path, outer_threads):
    stage = tmp_path / "stage"
    _pretrain(stage, steps=1)
    torch.set_num_threads(2)
    cli = build_cli(
        [EVAL],
        {
            "model.init_args.stage": str(stage),
            "model.init_args.output_dir": str(tmp_path / "eval"),
            "data.init_args.harmful.init_args.limit": 2,
            "data.init_args.task_limit": 2,
            "data.init_args.fa_validation_size": 0,
            "trainer.enable_progress_bar": False,
            "trainer.default_root_dir": str(tmp_path / "logs"),
        },
    )
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["threads"] == 1 and metrics["dtype"] == "fp32" and metrics["precision"] == "32-true"
    assert metrics["deterministic_algorithms"] is True
    # How the answers were batched for the judge, so that rescore can judge them the same way.
    batching = {k: metrics[k] for k in ("batch_size", "sort_by_length", "world_size")}
    assert batching == {"batch_size": cli.datamodule.batch_size, "sort_by_length": False, "world_size": 1}
