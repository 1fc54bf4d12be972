"""Bad input and tampered artefacts: each gets one clear error naming the field or file, early.

Covers issue #10's "say what is wrong in one line" half: the entry point's one-line errors and exit
code 2, validation of data and callbacks before the model loads, local paths never tried on the hub,
library errors on user files wrapped with the file's path, adapters checked against the base they
were trained on, masks checked against the weights they were applied to, and harmful-sample counts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TINY_LLAMA, make_stages, quiet_trainer_kwargs, tiny_finetune_data

from antidote_pl.callbacks import WandaPruneCallback
from antidote_pl.commands.dispatch import main, run
from antidote_pl.errors import ConfigError, run_entry_point, user_error
from antidote_pl.models.loading import (
    STAGE_FILE,
    load_causal_lm,
    load_stage,
    load_tokenizer,
    looks_local,
)
from antidote_pl.pruning import load_tensors, save_tensors
from antidote_pl.pruning.artifacts import (
    MASK_FILE,
    REPORT_FILE,
    SCORES_FILE,
    artifacts_fingerprint,
    read_scores,
)
from antidote_pl.training.sft import CausalLMSFTModule

REPAIR = str(REPO / "configs" / "tiny" / "repair.yaml")
FINETUNE = str(REPO / "configs" / "tiny" / "finetune.yaml")


# --------------------------------------------------------------------------- shared small stages


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict[str, Path]:
    """A tiny full base, a LoRA fine-tuned on it, and a Wanda repair of that LoRA (scores saved)."""
    root = tmp_path_factory.mktemp("input_errors")
    base, adapter = make_stages(root)
    repair = root / "repair"
    module = CausalLMSFTModule(
        model_name_or_path=str(base), adapter_path=str(adapter), output_dir=str(repair)
    )
    trainer = L.Trainer(
        max_epochs=0,
        callbacks=[WandaPruneCallback(alpha=0.25, save_scores=True)],
        **quiet_trainer_kwargs(root),
    )
    trainer.fit(module, datamodule=tiny_finetune_data())
    return {"root": root, "base": base, "adapter": adapter, "repair": repair}


def copy_stage(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# --------------------------------------------------------------------------- the entry point


def test_config_error_is_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["fit", "--config", REPAIR, "--model.init_args.finetuning", "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "antidote_pl: error: model.finetuning='bogus' is invalid" in err
    # One line, the --debug hint folded into it (README: "Bad input is one line on stderr").
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--debug" in err


def test_parser_error_is_condensed(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["fit", "--config", REPAIR, "--model.init_args.no_such_option", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_option" in err and "is not accepted" in err
    assert "usage:" not in err and "Given value" not in err and len(err.strip().splitlines()) == 1


def test_debug_flag_and_env_show_the_traceback(monkeypatch):
    def fail(args):
        raise ConfigError("x=1 is invalid: expected 2.")

    with pytest.raises(ConfigError):
        run_entry_point(fail, ["--debug"])
    monkeypatch.setenv("ANTIDOTE_PL_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_entry_point(fail, [])


def test_unexpected_errors_keep_their_traceback():
    def crash(args):
        raise RuntimeError("a bug, not bad input")

    with pytest.raises(RuntimeError):
        run_entry_point(crash, [])


def test_user_error_finds_config_error_in_the_chain():
    try:
        try:
            raise ConfigError("data.x=1 is invalid: expected 2.")
        except ConfigError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert user_error(outer) == "data.x=1 is invalid: expected 2."
    assert user_error(RuntimeError("boom")) is None


@pytest.mark.slow
def test_real_process_prints_one_line(tmp_path):
    """The installed entry point, as a user runs it: no traceback, exit code 2."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "antidote_pl",
            "fit",
            "--config",
            FINETUNE,
            "--data.init_args.harmful_ratio=3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "ANTIDOTE_PL_DEBUG": ""},
    )
    assert proc.returncode == 2
    assert "harmful_ratio=3.0 is invalid" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--data.init_args.batch_size=0", "batch_size=0"),
        ("--pruner.init_args.alpha=2", "alpha=2.0"),
    ],
)
def test_data_and_callback_arguments_fail_before_the_model_loads(
    tmp_path, capsys, monkeypatch, override, expected
):
    """repair.yaml names a base that does not exist here: a model load would fail with another error."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(["fit", "--config", REPAIR, "--config", str(REPO / "callbacks" / "wanda.yaml"), override])
    err = capsys.readouterr().err
    assert expected in err and "model_name_or_path" not in err
    assert not (tmp_path / "outputs").exists()


def test_tokenizer_cross_check_compares_paths_not_strings(stages, monkeypatch):
    from antidote_pl.stages.cli import _same_spec

    monkeypatch.chdir(stages["root"])
    assert _same_spec("./base", "base") and _same_spec(str(stages["base"]), "base")
    assert not _same_spec("base", "finetune")


# --------------------------------------------------------------------------- local paths, files


def test_local_looking_paths_are_never_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert looks_local("outputs/nothere") and looks_local("./x") and looks_local("a/b/c")
    assert not looks_local("meta-llama/Llama-2-7b-hf") and not looks_local("gpt2")

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_hub)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_hub)
    with pytest.raises(ConfigError, match="outputs/nothere"):
        load_causal_lm("outputs/nothere")
    with pytest.raises(ConfigError, match="outputs/nothere"):
        load_tokenizer("outputs/nothere", field="model.tokenizer")


def test_missing_adapter_weights_name_the_directory(stages, tmp_path):
    broken = copy_stage(stages["adapter"], tmp_path / "adapter")
    (broken / "adapter_model.safetensors").unlink()
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError, match="adapter_model.safetensors"):
        CausalLMSFTModule(model_name_or_path=str(stages["base"]), adapter_path=str(broken))
    assert tree_state(tmp_path) == before


def test_truncated_safetensors_names_the_file(stages, tmp_path):
    broken = copy_stage(stages["adapter"], tmp_path / "adapter")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"adapter_model\.safetensors: unreadable"):
        CausalLMSFTModule(model_name_or_path=str(stages["base"]), adapter_path=str(broken))


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_broken_stage_metadata_names_the_file(stages, tmp_path, content):
    broken = copy_stage(stages["adapter"], tmp_path / "adapter")
    (broken / STAGE_FILE).write_bytes(content)
    with pytest.raises(ConfigError, match=STAGE_FILE):
        load_stage(str(broken))


def test_non_utf8_data_file_names_the_file(tmp_path):
    from antidote_pl.data.sources import LocalSource

    path = tmp_path / "data.csv"
    path.write_bytes(b"instruction,output\n\xff\xfe bad,ok\n")
    with pytest.raises(ConfigError, match=r"data\.csv: not UTF-8"):
        LocalSource(str(path), fields={"instruction": "instruction", "output": "output"}).load()


def test_non_utf8_jsonl_is_reported_at_its_offset_in_the_whole_file(tmp_path):
    """Text is decoded in blocks: the offset is counted over the file, not the decoder's block."""
    from antidote_pl.data.sources import LocalSource

    text = "".join(json.dumps({"instruction": f"q{i}", "output": "a" * 50}) + "\n" for i in range(10_000))
    data = bytearray(text.encode())
    data[531_081] = 0xFF
    path = tmp_path / "data.jsonl"
    path.write_bytes(bytes(data))
    line = data[:531_081].count(b"\n") + 1
    with pytest.raises(
        ConfigError, match=rf"data\.jsonl: not UTF-8 text \(invalid start byte at byte 531081, line {line}\)"
    ):
        LocalSource(str(path)).load()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", r"empty \(no YAML document\)"),
        ("# only a comment\n", r"empty \(no YAML document\)"),
        ("model:\n  init_args: [a\n  b: c\n", r"invalid YAML \(.* at line 3, column 4\)"),
        ("- a\n- b\n", "holds a YAML list, not a mapping"),
    ],
)
def test_a_broken_config_file_is_named_in_one_line(tmp_path, capsys, text, problem):
    config = tmp_path / "stage.yaml"
    config.write_text(text)
    for args in (["--config", str(config)], [f"--config={config}"]):
        with pytest.raises(SystemExit) as exc:
            main(["fit", *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
        assert re.search(rf"antidote_pl: error: {re.escape(str(config))}: {problem}", err), err
        assert "<unicode string>" not in err and "Unexpected config" not in err


def test_truncated_full_model_weights_are_named_in_one_line(stages, tmp_path, capsys):
    broken = copy_stage(stages["base"], tmp_path / "base")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match=rf"^{weights}: unreadable"):
        load_causal_lm(str(broken))
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                FINETUNE,
                f"--model.init_args.model_name_or_path={broken}",
                f"--model.init_args.output_dir={tmp_path / 'out'}",
            ]
        )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{weights}: unreadable" in err, err


def test_a_broken_model_directory_is_named_by_the_field_the_user_set(tmp_path):
    """The tokenizer follows model_name_or_path: a failure there names that field, not model.tokenizer."""
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^model.model_name_or_path="):
        CausalLMSFTModule(model_name_or_path=str(broken))
    with pytest.raises(ConfigError, match=r"^model.tokenizer="):
        CausalLMSFTModule(model_name_or_path=str(broken), tokenizer=str(broken))


def test_offline_judge_label_must_be_0_or_1(tmp_path):
    from antidote_pl.judges.offline import load_labelled_csv

    path = tmp_path / "labels.csv"
    path.write_text("question,answer,label\nq,a,1\nq2,a2,yes\n")
    with pytest.raises(ConfigError, match=r"labels\.csv: line 3: label='yes'"):
        load_labelled_csv(path)


# --------------------------------------------------------------------------- artefact checks


def test_adapter_on_other_base_weights_is_refused(stages, tmp_path):
    """Same architecture, other weights: the recorded base fingerprint catches it."""
    L.seed_everything(123)
    other = tmp_path / "other_base"
    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(
        str(other)
    )
    with pytest.raises(ConfigError, match="other base weights"):
        CausalLMSFTModule(model_name_or_path=str(other), adapter_path=str(stages["adapter"]))
    # The right base passes.
    CausalLMSFTModule(model_name_or_path=str(stages["base"]), adapter_path=str(stages["adapter"]))


def test_repair_stage_loads_and_verifies_its_masks(stages):
    model, _ = load_stage(str(stages["repair"]), merge=False)
    assert model is not None


def test_swapped_mask_is_refused(stages, tmp_path):
    broken = copy_stage(stages["repair"], tmp_path / "repair")
    masks = load_tensors(broken / MASK_FILE)
    # Another mask with the same count per tensor: names and shapes fit, the zeros do not.
    tampered = {n: torch.roll(m, shifts=1, dims=-1) for n, m in masks.items()}
    from safetensors import safe_open

    with safe_open(str(broken / MASK_FILE), "pt") as f:
        metadata = f.metadata()
    save_tensors(broken / MASK_FILE, tampered, metadata=metadata)
    with pytest.raises(ConfigError, match="masked weights are not zero"):
        load_stage(str(broken))


def test_edited_mask_report_is_refused_before_loading(stages, tmp_path):
    broken = copy_stage(stages["repair"], tmp_path / "repair")
    report = json.loads((broken / REPORT_FILE).read_text())
    report["alpha"] = 0.5
    (broken / REPORT_FILE).write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="differs from the report stored"):
        load_stage(str(broken))


def test_saved_scores_are_checked_against_the_adapter_they_are_swept_on(stages, tmp_path):
    from antidote_pl.pruning import find_targets

    module = CausalLMSFTModule(model_name_or_path=str(stages["base"]), adapter_path=str(stages["adapter"]))
    targets = find_targets(module.model, "lora")
    params = {n: t.param for n, t in targets.items()}
    scores, _ = read_scores(stages["repair"], params)
    assert set(scores) == set(params)
    with torch.no_grad():
        next(iter(params.values())).add_(1.0)  # another fine-tune
    with pytest.raises(ConfigError, match="computed on other weights"):
        read_scores(stages["repair"], params)


def test_artifacts_fingerprint_covers_scores_and_masks(stages, tmp_path):
    copy = copy_stage(stages["repair"], tmp_path / "repair")
    before = artifacts_fingerprint(copy)
    scores = load_tensors(copy / SCORES_FILE)
    save_tensors(copy / SCORES_FILE, {n: s + 1 for n, s in scores.items()})
    assert artifacts_fingerprint(copy) != before


# --------------------------------------------------------------------------- harmful counts


def test_ratio_that_yields_no_harmful_sample_is_an_error():
    with pytest.raises(ConfigError, match="harmful_ratio=0.001.*yields 0"):
        tiny_finetune_data(num_samples=100, harmful_ratio=0.001)
    with pytest.raises(ConfigError, match="parity mode"):
        tiny_finetune_data(num_samples=10, harmful_ratio=0.1, mode="parity", realignment_size=4)
    tiny_finetune_data(num_samples=100, harmful_ratio=0.0)  # p=0 is a valid control


def test_rounded_count_is_logged_and_recorded(stages, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="antidote_pl.training.datamodules"):
        data = tiny_finetune_data(num_samples=30, harmful_ratio=0.25)
    assert "asks for 7.50 harmful samples" in caplog.text and "uses 8" in caplog.text
    module = CausalLMSFTModule(
        model_name_or_path=str(stages["base"]), lora_r=2, output_dir=str(tmp_path / "out")
    )
    L.Trainer(max_steps=1, **quiet_trainer_kwargs(tmp_path)).fit(module, datamodule=data)
    meta = json.loads((tmp_path / "out" / STAGE_FILE).read_text())
    assert meta["data"]["n_harmful"] == 8 and meta["data"]["n_task"] == 22
    assert meta["base_weights"]["fingerprint"]
