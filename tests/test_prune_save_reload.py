"""A saved repair stage is the model that was pruned in memory, for every target kind, and one write.

``lora_delta`` (and ``linear`` on a peft model) change weights outside the adapter; an adapter-only
save used to drop them, so the saved stage was the base model with the fine-tune erased. The stage
is now saved merged when that happens; reloading it must give the in-memory pruned model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_stages, quiet_trainer_kwargs, tiny_finetune_data

from antidote_pl.callbacks import MagnitudePruneCallback, WandaPruneCallback
from antidote_pl.models.loading import load_stage
from antidote_pl.pruning.artifacts import read_masks
from antidote_pl.training.sft import CausalLMSFTModule
from antidote_pl.utils.files import STAGE_FILE


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny full base, a LoRA trained on it (B != 0) and a fully fine-tuned copy."""
    root = tmp_path_factory.mktemp("save_reload")
    base, adapter = make_stages(root)
    full = root / "full"
    tuned = CausalLMSFTModule(model_name_or_path=str(base), finetuning="full", learning_rate=1e-3)
    L.Trainer(max_steps=2, **quiet_trainer_kwargs(root)).fit(tuned, datamodule=tiny_finetune_data())
    tuned.save_stage(str(full))
    return base, adapter, full


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("target", "on_full", "include"),
    [
        ("lora", False, None),
        ("lora_delta", False, None),
        ("linear", False, ["q_proj"]),
        ("linear", True, None),
    ],
)
def test_saved_stage_reloads_to_the_pruned_model(stages, tmp_path, target, on_full, include):
    base, adapter, full = stages
    if on_full:
        module = CausalLMSFTModule(
            model_name_or_path=str(full), finetuning="full", output_dir=str(tmp_path / "r")
        )
    else:
        module = CausalLMSFTModule(
            model_name_or_path=str(base), adapter_path=str(adapter), output_dir=str(tmp_path / "r")
        )
    ids = torch.randint(5, 60, (2, 12))
    before = logits(module.model.eval(), ids)
    callback = MagnitudePruneCallback(alpha=0.3, target=target, include=include)
    trainer = L.Trainer(max_epochs=0, callbacks=[callback], **quiet_trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=tiny_finetune_data())
    pruned = logits(module.model.eval(), ids)
    assert not torch.allclose(before, pruned), "pruning changed nothing: the test would prove nothing"
    reloaded, _ = load_stage(str(tmp_path / "r"))
    torch.testing.assert_close(logits(reloaded, ids), pruned, atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "r" / STAGE_FILE).read_text())
    merged = target != "lora" and not on_full
    assert meta["merged_adapter"] is merged and meta["pruning"]["merged_adapter"] is merged
    assert meta["kind"] == ("adapter" if target == "lora" else "full_model")
    masks, _ = read_masks(tmp_path / "r")
    assert set(masks) <= {n for n, _ in reloaded.named_parameters()} or target == "lora"


def test_callback_output_dir_is_the_only_write(stages, tmp_path):
    """With its own output_dir the callback's stage is the one write; model.output_dir stays empty."""
    base, adapter, _ = stages
    module = CausalLMSFTModule(
        model_name_or_path=str(base), adapter_path=str(adapter), output_dir=str(tmp_path / "module_out")
    )
    callback = WandaPruneCallback(alpha=0.25, output_dir=str(tmp_path / "callback_out"))
    L.Trainer(max_epochs=0, callbacks=[callback], **quiet_trainer_kwargs(tmp_path)).fit(
        module, datamodule=tiny_finetune_data()
    )
    assert (tmp_path / "callback_out" / STAGE_FILE).is_file()
    assert "pruning" in json.loads((tmp_path / "callback_out" / STAGE_FILE).read_text())
    assert not (tmp_path / "module_out").exists() or not any((tmp_path / "module_out").iterdir())
