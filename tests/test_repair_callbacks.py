"""The weight-editing repair callbacks on tiny stages: neutral knob, reload, sweeps, math, errors.

Stages: a random tiny base (the model before alignment), a full fine-tune of it (the aligned model)
and a LoRA trained on the aligned model (the user's harmful fine-tune), so every method has an
alignment delta and a non-zero update to work on.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer_kwargs, tiny_finetune_data

from antidote_pl.callbacks import (
    DeltaScalingCallback,
    RefusalRealignCallback,
    RestaCallback,
    SafeDeltaCallback,
    SafeLoRACallback,
)
from antidote_pl.callbacks.repair import lora_slots
from antidote_pl.errors import ConfigError
from antidote_pl.models.loading import load_causal_lm, load_stage
from antidote_pl.pruning.apply import load_tensors, save_tensors
from antidote_pl.repair.artifacts import SWEEP_EDITS_FILE, EditArtifacts, apply_edits_, value_key
from antidote_pl.training.sft import CausalLMSFTModule
from antidote_pl.utils.files import STAGE_FILE

IDS = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(pre, aligned, adapter)`` stage directories."""
    root = tmp_path_factory.mktemp("repair_callbacks")
    L.seed_everything(0)
    pre, aligned, adapter = root / "pre", root / "aligned", root / "finetune"
    CausalLMSFTModule(model_config=TINY_LLAMA, tokenizer="tiny-world", finetuning="full").save_stage(str(pre))
    align = CausalLMSFTModule(model_name_or_path=str(pre), finetuning="full", learning_rate=1e-2)
    L.Trainer(max_steps=3, **quiet_trainer_kwargs(root)).fit(align, datamodule=tiny_finetune_data())
    align.save_stage(str(aligned))
    tune = CausalLMSFTModule(model_name_or_path=str(aligned), lora_r=4, lora_alpha=8, learning_rate=1e-2)
    L.Trainer(max_steps=3, **quiet_trainer_kwargs(root)).fit(tune, datamodule=tiny_finetune_data())
    tune.save_stage(str(adapter))
    return pre, aligned, adapter


def fine_tuned(stages, out: Path) -> CausalLMSFTModule:
    _, aligned, adapter = stages
    return CausalLMSFTModule(model_name_or_path=str(aligned), adapter_path=str(adapter), output_dir=str(out))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def repair(stages, tmp_path, callback) -> tuple[CausalLMSFTModule, torch.Tensor]:
    """Runs the repair stage; returns the module and the fine-tuned model's logits before it."""
    module = fine_tuned(stages, tmp_path / "repaired")
    before = logits(module.model)
    trainer = L.Trainer(max_epochs=0, callbacks=[callback], **quiet_trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=tiny_finetune_data())
    return module, before


FAST = {"refusal_tokens": 6}
METHODS = [
    (DeltaScalingCallback, 0.3, {}),
    (RestaCallback, 2.0, {}),
    (SafeLoRACallback, 1.0, {}),
    (SafeLoRACallback, 1.0, {"projector": "exact", "rank": 2}),
    (SafeDeltaCallback, 0.5, FAST),
    (RefusalRealignCallback, 2, {"k": 4, "learning_rate": 1e-2, **FAST}),
]
NEUTRAL = [
    (DeltaScalingCallback, 1.0, {}),
    (RestaCallback, 0.0, {}),
    (SafeLoRACallback, 0.0, {}),
    (SafeDeltaCallback, math.inf, FAST),
    (RefusalRealignCallback, 0, {"k": 2, **FAST}),
]


@pytest.mark.parametrize(("cls", "value", "kw"), NEUTRAL, ids=lambda x: getattr(x, "__name__", None))
def test_neutral_value_is_the_fine_tuned_model_exactly(stages, tmp_path, cls, value, kw):
    module, before = repair(stages, tmp_path, cls(value=value, **kw))
    assert torch.equal(logits(module.model), before)
    saved = json.loads((tmp_path / "repaired" / STAGE_FILE).read_text())
    assert saved["repair"]["relative_change"][repr(float(value))] == 0.0


@pytest.mark.parametrize(("cls", "value", "kw"), METHODS, ids=lambda x: getattr(x, "__name__", None))
def test_repair_changes_the_model_and_the_stage_reloads_to_it(stages, tmp_path, cls, value, kw):
    callback = cls(value=value, sweep_values=[value], **kw)
    module, before = repair(stages, tmp_path, callback)
    repaired = logits(module.model)
    assert not torch.allclose(before, repaired), "the repair changed nothing: the test would prove nothing"
    reloaded, _ = load_stage(str(tmp_path / "repaired"))
    torch.testing.assert_close(logits(reloaded), repaired, atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "repaired" / STAGE_FILE).read_text())
    assert meta["kind"] == ("full_model" if callback.report["merged_adapter"] else "adapter")
    # The sweep file holds the same edits: applied to a fresh fine-tuned model they give the repair.
    art = EditArtifacts.read(tmp_path / "repaired")
    fresh = fine_tuned(stages, tmp_path / "unused").model
    params = dict(fresh.named_parameters())
    art.check_source(params)
    apply_edits_(params, art.edits(value))
    torch.testing.assert_close(logits(fresh), repaired, atol=1e-6, rtol=1e-6)


def test_sweep_edits_refuse_other_weights(stages, tmp_path):
    repair(stages, tmp_path, DeltaScalingCallback(value=0.5, sweep_values=[0.0, 0.5]))
    art = EditArtifacts.read(tmp_path / "repaired")
    assert art.values == [0.0, 0.5]
    other = fine_tuned(stages, tmp_path / "x").model
    name = next(n for n in art.report["edited_shapes"])
    with torch.no_grad():
        dict(other.named_parameters())[name].add_(1.0)
    with pytest.raises(ConfigError, match="other weights"):
        art.check_source(dict(other.named_parameters()))
    with pytest.raises(ConfigError, match="lambda"):
        art.edits(0.25)


def test_an_edited_sweep_edit_is_named(stages, tmp_path):
    """Issue #25: a changed value in sweep_edits.safetensors (same names and shapes) is refused."""
    repair(stages, tmp_path, DeltaScalingCallback(value=0.5, sweep_values=[0.0, 0.5]))
    path = tmp_path / "repaired" / SWEEP_EDITS_FILE
    tensors = load_tensors(path)
    key = next(k for k in tensors if k.startswith(f"{value_key(0.5)}/"))
    tensors[key] = tensors[key] * 0.9
    save_tensors(path, tensors, metadata={"values": json.dumps([0.0, 0.5])})
    art = EditArtifacts.read(tmp_path / "repaired")
    assert art.edits(0.0)
    with pytest.raises(ConfigError, match=re.escape(SWEEP_EDITS_FILE) + ": the edits of lambda=0.5 differ"):
        art.edits(0.5)


def test_delta_scaling_is_lambda_times_the_update(stages, tmp_path):
    module, _ = repair(stages, tmp_path, DeltaScalingCallback(value=0.25))
    reference = fine_tuned(stages, tmp_path / "ref")
    params = dict(module.model.named_parameters())
    for slot in lora_slots(reference.model).values():
        ref = dict(reference.model.named_parameters())
        torch.testing.assert_close(params[slot.b], 0.25 * ref[slot.b])
        assert torch.equal(params[slot.a], ref[slot.a])


def test_resta_adds_beta_times_the_alignment_delta(stages, tmp_path):
    pre, aligned, _ = stages
    module, _ = repair(stages, tmp_path, RestaCallback(value=1.5))  # pre_alignment found from the stage
    pre_w = dict(load_causal_lm(str(pre)).named_parameters())
    aligned_w = dict(load_causal_lm(str(aligned)).named_parameters())
    params = dict(module.model.named_parameters())
    slots = lora_slots(module.model)
    assert slots
    for key, slot in slots.items():
        expected = aligned_w[key] + 1.5 * (aligned_w[key] - pre_w[key])
        torch.testing.assert_close(params[slot.base], expected, atol=1e-6, rtol=1e-6)


def test_safelora_projects_exactly_the_layers_below_the_threshold(stages, tmp_path):
    pre, aligned, _ = stages
    callback = SafeLoRACallback(value=0.9999, pre_alignment=str(pre))
    module, _ = repair(stages, tmp_path, callback)
    cosines = callback.report["cosines"]
    reference = dict(fine_tuned(stages, tmp_path / "ref").model.named_parameters())
    pre_w = dict(load_causal_lm(str(pre)).named_parameters())
    aligned_w = dict(load_causal_lm(str(aligned)).named_parameters())
    params = dict(module.model.named_parameters())
    projected = 0
    for key, slot in lora_slots(module.model).items():
        v = aligned_w[key] - pre_w[key]
        c = v @ v.T / torch.linalg.norm(v)  # the official projector, written out here
        if cosines[key] < 0.9999:
            projected += 1
            torch.testing.assert_close(params[slot.b], c @ reference[slot.b], atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(params[slot.b], reference[slot.b])
    assert projected == callback.report["projected_layers"][repr(0.9999)] > 0


def test_safe_delta_merges_a_smaller_update_and_zeroes_b(stages, tmp_path):
    callback = SafeDeltaCallback(value=0.05, sweep_values=[0.05, 50.0], **FAST)
    module, _ = repair(stages, tmp_path, callback)
    kept = callback.report["kept_fraction"]
    assert kept[repr(0.05)] < kept[repr(50.0)] <= 1.0
    slots = lora_slots(module.model)
    params = dict(module.model.named_parameters())
    assert all(not params[s.b].any() for s in slots.values())
    assert callback.report["calibration_pairs"] == len(tiny_finetune_data().realignment_records)


def test_refusal_realign_trains_on_the_aligned_models_refusals(stages, tmp_path):
    callback = RefusalRealignCallback(value=3, sweep_values=[1, 3], k=4, learning_rate=1e-2, **FAST)
    module, _ = repair(stages, tmp_path, callback)
    assert callback.report["pairs"] == 4
    art = EditArtifacts.read(tmp_path / "repaired")
    one, three = art.edits(1), art.edits(3)
    assert any(not torch.equal(one[n], three[n]) for n in one), "more epochs changed nothing"
    reference = dict(fine_tuned(stages, tmp_path / "ref").model.named_parameters())
    assert any(not torch.equal(one[n], reference[n]) for n in one)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (DeltaScalingCallback, {"value": 1.5}, "lambda"),
        (DeltaScalingCallback, {"value": 0.5, "sweep_values": [-0.1]}, "sweep_values"),
        (RestaCallback, {"value": -1.0}, "beta"),
        (RestaCallback, {"value": 1.0, "pre_alignment": ""}, "pre_alignment"),
        (SafeLoRACallback, {"value": 2.0}, "threshold"),
        (SafeLoRACallback, {"value": 0.5, "projector": "fast"}, "projector"),
        (SafeDeltaCallback, {"value": 0.0}, "budget"),
        (SafeDeltaCallback, {"value": "big"}, "budget"),
        (RefusalRealignCallback, {"value": 1.5}, "epochs"),
        (RefusalRealignCallback, {"value": 1, "k": 0}, "k"),
    ],
)
def test_bad_settings_are_one_line_errors_before_loading(cls, kwargs, field):
    with pytest.raises(ConfigError, match=field) as err:
        cls(**kwargs)
    assert "\n" not in str(err.value)


def test_refusal_k_larger_than_the_realignment_set_is_refused(stages, tmp_path):
    with pytest.raises(ConfigError, match="k=64"):
        repair(stages, tmp_path, RefusalRealignCallback(value=1, k=64, **FAST))
