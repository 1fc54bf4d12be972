"""The SFT LightningModule: LoRA invariants, merge-then-new-LoRA, checkpoints, stage outputs, bad input."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, tiny_finetune_data
from lightning.pytorch.callbacks import ModelCheckpoint

from antidote_pl.errors import ConfigError
from antidote_pl.models.loading import load_stage
from antidote_pl.training.sft import CausalLMSFTModule
from antidote_pl.utils.files import STAGE_FILE


def module(**kw) -> CausalLMSFTModule:
    args = {"model_config": TINY_LLAMA, "tokenizer": "tiny-world", "lora_r": 4, "lora_alpha": 8}
    return CausalLMSFTModule(**{**args, **kw})


def snapshot(m: CausalLMSFTModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.model.named_parameters()}


def fit(m, trainer_kwargs, steps=3, **kw):
    trainer = L.Trainer(max_steps=steps, **{**trainer_kwargs, **kw})
    trainer.fit(m, datamodule=tiny_finetune_data())
    return trainer


def test_lora_invariants(trainer_kwargs):
    L.seed_everything(0)
    m = module(learning_rate=1e-2)
    before = snapshot(m)
    # q, k, v in each of 2 layers: A is [r, 32] and B is [32, r].
    assert m.trainable_parameter_count() == 2 * 3 * (4 * 32 + 32 * 4)
    assert sorted(m.model.peft_config["default"].target_modules) == ["k_proj", "q_proj", "v_proj"]
    fit(m, trainer_kwargs)
    after = snapshot(m)
    lora = [n for n in after if "lora_" in n]
    assert len(lora) == 12
    for name, value in after.items():
        if "lora_" in name:
            assert not torch.equal(value, before[name]), f"adapter weight {name} did not change"
        else:
            assert torch.equal(value, before[name]), f"base weight {name} changed"


def test_full_finetuning_trains_every_weight(trainer_kwargs):
    m = module(finetuning="full", learning_rate=1e-2)
    assert m.trainable_parameter_count() == sum(p.numel() for p in m.model.parameters())
    before = snapshot(m)
    fit(m, trainer_kwargs, steps=2)
    changed = [not torch.equal(p, before[n]) for n, p in snapshot(m).items()]
    assert sum(changed) >= len(changed) - 1  # every weight but possibly unused embedding rows' tensor


def test_merge_then_new_lora(tmp_path, trainer_kwargs):
    L.seed_everything(0)
    base_dir = tmp_path / "base"
    module(finetuning="full").save_stage(str(base_dir))
    first = module(model_name_or_path=str(base_dir), model_config=None, tokenizer=None, learning_rate=1e-2)
    fit(first, trainer_kwargs)
    first.save_stage(str(tmp_path / "align"))
    layer = first.model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ (
        layer.lora_A["default"].weight
    )

    second = module(
        model_name_or_path=str(base_dir),
        model_config=None,
        tokenizer=None,
        merge_adapters=[str(tmp_path / "align")],
    )
    q = second.model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.base_layer.weight, expected, rtol=0, atol=1e-6)
    assert torch.count_nonzero(q.lora_B["default"].weight) == 0, "the new LoRA starts from B = 0"
    assert second.trainable_parameter_count() == first.trainable_parameter_count()


def test_checkpoint_holds_trainable_weights_only_and_resumes(tmp_path, trainer_kwargs):
    L.seed_everything(0)
    m = module(learning_rate=1e-2)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(m, {**trainer_kwargs, "enable_checkpointing": True}, steps=2, callbacks=[ckpt_cb])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    trainable = {f"model.{n}" for n, p in m.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    saved = {k: v.clone() for k, v in ckpt["state_dict"].items()}

    L.seed_everything(0)
    resumed = module(learning_rate=1e-2)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({f"model.{n}": p.detach().clone() for n, p in pl_module.model.named_parameters()})

    trainer = L.Trainer(max_steps=4, callbacks=[Probe()], **trainer_kwargs)
    trainer.fit(resumed, datamodule=tiny_finetune_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 4
    for k, v in saved.items():
        assert torch.equal(seen[k], v), f"{k} was not restored"


def test_stage_output_is_huggingface_format(tmp_path, trainer_kwargs):
    L.seed_everything(0)
    base_dir = tmp_path / "base"
    module(finetuning="full").save_stage(str(base_dir))
    out = tmp_path / "ft"
    m = module(
        model_name_or_path=str(base_dir),
        model_config=None,
        tokenizer=None,
        learning_rate=1e-2,
        output_dir=str(out),
        save_merged=True,
    )
    fit(m, trainer_kwargs)
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        STAGE_FILE,
        "tokenizer.json",
        "merged",
    } <= names
    meta = json.loads((out / STAGE_FILE).read_text())
    assert meta["kind"] == "adapter" and meta["base_model"] == str(base_dir)
    loaded, tok = load_stage(str(out))
    ids = torch.tensor([tok("user : how do i bake a cake assistant :")["input_ids"]])
    m.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m.model(ids).logits, rtol=1e-4, atol=1e-5)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, m.model(ids).logits, rtol=1e-4, atol=1e-5)


def test_no_partial_stage_output_on_crash(tmp_path, monkeypatch):
    m = module()
    out = tmp_path / "stage"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(m.tokenizer, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        m.save_stage(str(out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model_config": None, "model_name_or_path": "/no/such/model"}, "model.model_name_or_path"),
        ({"model_config": {"model_type": "nope"}}, "model.model_config.model_type"),
        ({"finetuning": "qlora"}, "model.finetuning"),
        ({"scheduler": "step"}, "model.scheduler"),
        ({"dtype": "fp8"}, "model.dtype"),
        ({"lora_r": 0}, "model.lora_r"),
        ({"learning_rate": -1.0}, "model.learning_rate"),
        ({"lora_target_modules": ["nonexistent_proj"]}, "model.lora_target_modules"),
        ({"tokenizer": "/no/such/tokenizer"}, "model.tokenizer"),
        ({"merge_adapters": ["/no/such/adapter"]}, "model.merge_adapters[0]"),
    ],
)
def test_bad_input(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        module(**kwargs)


def test_adapter_from_another_base_is_rejected(tmp_path, trainer_kwargs):
    other = dict(TINY_LLAMA, hidden_size=64, intermediate_size=128)
    base_dir = tmp_path / "other_base"
    module(model_config=other, finetuning="full").save_stage(str(base_dir))
    adapter = module(model_name_or_path=str(base_dir), model_config=None, tokenizer=None)
    adapter.save_stage(str(tmp_path / "adapter"))
    with pytest.raises(ConfigError, match="another base model"):
        module(merge_adapters=[str(tmp_path / "adapter")])
    with pytest.raises(ConfigError, match="model.adapter_path"):
        module(adapter_path=str(tmp_path / "adapter"))
