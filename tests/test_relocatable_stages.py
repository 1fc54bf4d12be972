"""Stage outputs are relocatable (issue #25): a moved project loads its own stages, and a copied one
its own copies, never the original tree's.

A tiny project (pretrain -> align -> finetune, with a data file of its own) is written in ``A``; it
is copied to ``C`` and moved to ``B``, and every stage is loaded from there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer_kwargs, tiny_finetune_data
from safetensors.torch import load_file, save_file

from antidote_pl.data.sources import LocalSource
from antidote_pl.data.window import read_window
from antidote_pl.errors import ConfigError
from antidote_pl.models.loading import load_stage
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.training.sft import CausalLMSFTModule
from antidote_pl.utils.files import STAGE_FILE, read_stage_metadata, relocatable_stage_metadata

STAGES = ("pretrain", "align", "finetune")


def _write_project(root: Path) -> None:
    """The tiny project, written as a user runs it: from its root, with relative paths."""
    data = root / "data" / "harmful.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in TinyWorldSource("harmful_answer").load()))
    L.seed_everything(0)
    full = {"tokenizer": "tiny-world", "finetuning": "full"}
    CausalLMSFTModule(model_config=TINY_LLAMA, **full).save_stage("outputs/pretrain")
    CausalLMSFTModule(model_name_or_path="outputs/pretrain", finetuning="full").save_stage("outputs/align")
    finetune = CausalLMSFTModule(
        model_name_or_path="outputs/align", lora_r=4, lora_alpha=8, output_dir="outputs/finetune"
    )
    dm = tiny_finetune_data(harmful=LocalSource("data/harmful.jsonl"))
    L.Trainer(max_steps=1, **quiet_trainer_kwargs(root.parent / "logs")).fit(finetune, datamodule=dm)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """``A`` written, copied to ``C`` and moved to ``B``; the working directory is none of them."""
    top = tmp_path_factory.mktemp("relocate")
    a = top / "A"
    a.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(a)
        _write_project(a)
    shutil.copytree(a, top / "C")
    shutil.move(a, top / "B")
    return {"A": a, "B": top / "B", "C": top / "C"}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_paths_inside_the_project_are_recorded_relative_to_the_stage(trees):
    meta = json.loads((trees["B"] / "outputs" / "finetune" / STAGE_FILE).read_text())
    assert meta["base_model"] == "../align" and meta["paths_relative_to"] == "stage_dir"
    window = meta["realignment_window"]["realignment"]
    assert window["source"]["init_args"]["path"] == "../../data/harmful.jsonl"
    assert window["files"] == ["../../data/harmful.jsonl"]
    assert (
        json.loads((trees["B"] / "outputs" / "align" / STAGE_FILE).read_text())["base_model"] == "../pretrain"
    )


def test_a_moved_project_loads_every_stage_and_its_window(trees):
    b = trees["B"] / "outputs"
    assert not trees["A"].exists()
    for name in STAGES:
        model, _ = load_stage(str(b / name))
        assert model is not None
    assert read_stage_metadata(str(b / "finetune"))["base_model"] == str(b / "align")
    window = read_window(str(b / "finetune"))
    records = window.records("realignment", window.source("realignment"))
    assert len(records) == 8


def test_a_copied_project_loads_its_own_aligned_base(trees, monkeypatch):
    b, c = trees["B"] / "outputs", trees["C"] / "outputs"
    # C's aligned model now differs from B's (in a weight the LoRA does not adapt).
    weights = load_file(str(c / "align" / "model.safetensors"))
    name = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
    weights[name] = weights[name] + 1.0
    save_file(weights, str(c / "align" / "model.safetensors"), metadata={"format": "pt"})

    # The adapter refuses the changed base, naming C's: it never silently falls back to another tree.
    with pytest.raises(ConfigError, match="other base weights") as err:
        load_stage(str(c / "finetune"))
    assert str(c / "align") in str(err.value) and str(b / "align") not in str(err.value)

    # With the base check off, what C's fine-tune loads is C's aligned weights, not B's.
    monkeypatch.setattr("antidote_pl.models.loading._check_recorded_base", lambda *a, **k: None)
    on_c = _weights(load_stage(str(c / "finetune"))[0])
    aligned_c, aligned_b = (
        _weights(load_stage(str(c / "align"))[0]),
        _weights(load_stage(str(b / "align"))[0]),
    )
    assert torch.equal(on_c[name], aligned_c[name]) and not torch.equal(on_c[name], aligned_b[name])
    assert _weights(load_stage(str(b / "finetune"), merge=False)[0].get_base_model())[name].equal(
        aligned_b[name]
    )


def test_a_stage_moved_without_its_base_names_the_recorded_path(trees, tmp_path):
    alone = tmp_path / "finetune"
    shutil.copytree(trees["B"] / "outputs" / "finetune", alone)
    with pytest.raises(
        ConfigError, match=rf"{alone / STAGE_FILE}: its base_model '{tmp_path / 'align'}' does not exist"
    ):
        load_stage(str(alone))


def test_paths_outside_the_project_and_old_records_stay_absolute(tmp_path):
    outside = tmp_path / "models" / "base"
    outside.mkdir(parents=True)
    project = tmp_path / "project"
    meta = {"kind": "adapter", "base_model": str(outside), "merged_adapters": [], "tokenizer": "tiny-world"}
    written = relocatable_stage_metadata(meta, project / "outputs" / "ft", root=project)
    assert written["base_model"] == str(outside) and written["tokenizer"] == "tiny-world"
    # A path relative to the working directory that leaves the project (../shared/data) is written
    # absolute: read back against the stage directory it would name another file.
    project.mkdir()
    cwd = os.getcwd()
    os.chdir(project)
    try:
        relative = {**meta, "base_model": "../models/base"}
        written = relocatable_stage_metadata(relative, project / "outputs" / "ft")
    finally:
        os.chdir(cwd)
    assert written["base_model"] == str(outside)
    # A record written before the rule (absolute, no paths_relative_to) is read as it is.
    stage = tmp_path / "old"
    stage.mkdir()
    (stage / STAGE_FILE).write_text(json.dumps({**meta, "base_model": "../relative/as/typed"}))
    assert read_stage_metadata(str(stage))["base_model"] == "../relative/as/typed"
