"""Align -> finetune -> repair -> evaluate on tiny random-init Llama, Mistral, Gemma, Qwen2 and GPT-2.

Each architecture runs what the paper configs run at scale: LoRA alignment, merge + a fresh LoRA for
harmful fine-tuning, then the Wanda repair (``max_epochs=0`` with the fine-tune loaded as
``adapter_path``), all through :class:`CausalLMSFTModule` on the tiny world data. Nothing in the code
is Llama-specific, so the same stages must produce the same kind of outputs on every architecture.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA, quiet_trainer_kwargs, tiny_finetune_data

from antidote_pl.callbacks import WandaPruneCallback
from antidote_pl.evaluation.evaluator import EvalDataModule, StageEvaluator
from antidote_pl.judges.base import TinyWorldJudge
from antidote_pl.pruning import load_tensors
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.training.datamodules import AlignmentDataModule
from antidote_pl.training.sft import CausalLMSFTModule
from antidote_pl.utils.files import STAGE_FILE

pytestmark = pytest.mark.slow

_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "max_position_embeddings": 128}
# Vocabulary sizes come from the tiny world tokenizer (CausalLMSFTModule passes len(tokenizer)).
ARCHITECTURES = {
    "llama": TINY_LLAMA,
    "mistral": {"model_type": "mistral", **_SMALL, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gemma": {
        "model_type": "gemma",
        **_SMALL,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 8,
    },
    "qwen2": {"model_type": "qwen2", **_SMALL, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
}
# What default_lora_target_modules finds: the attention input projections.
TARGETS = {"gpt2": ["c_attn"]}
ALPHA = 0.25
LORA = {"lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2}


def quiet_trainer(root, **kw) -> L.Trainer:
    return L.Trainer(**quiet_trainer_kwargs(root, **kw))


def alignment_data() -> AlignmentDataModule:
    return AlignmentDataModule(
        "tiny-world", harmful=TinyWorldSource("harmful_refusal", limit=16), template="tiny", max_length=64
    )


def lora_weights(module: CausalLMSFTModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}


def assert_adapter_stage(path, targets) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(targets)
    assert json.loads((path / STAGE_FILE).read_text())["kind"] == "adapter"


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # GPT-2's Conv1D
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_align_finetune_repair(arch, tmp_path):
    L.seed_everything(0)
    base, align, finetune, repair = (tmp_path / d for d in ("base", "align", "finetune", "repair"))
    # Later stages load by path, so the random base is saved first as a full model.
    CausalLMSFTModule(model_config=ARCHITECTURES[arch], tokenizer="tiny-world", finetuning="full").save_stage(
        str(base)
    )

    aligner = CausalLMSFTModule(model_name_or_path=str(base), output_dir=str(align), **LORA)
    targets = TARGETS.get(arch, ["q_proj", "k_proj", "v_proj"])
    assert sorted(aligner.model.peft_config["default"].target_modules) == sorted(targets)
    quiet_trainer(tmp_path, max_steps=2).fit(aligner, datamodule=alignment_data())
    assert_adapter_stage(align, targets)

    attacker = CausalLMSFTModule(
        model_name_or_path=str(base), merge_adapters=[str(align)], output_dir=str(finetune), **LORA
    )
    before = lora_weights(attacker)
    quiet_trainer(tmp_path, max_steps=2).fit(attacker, datamodule=tiny_finetune_data(num_samples=16))
    trained = lora_weights(attacker)
    assert any(not torch.equal(trained[n], before[n]) for n in trained if "lora_B" in n)
    assert_adapter_stage(finetune, targets)

    repairer = CausalLMSFTModule(
        model_name_or_path=str(base),
        merge_adapters=[str(align)],
        adapter_path=str(finetune),
        output_dir=str(repair),
    )
    loaded = lora_weights(repairer)
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)  # the fine-tune, not a fresh LoRA
    callback = WandaPruneCallback(alpha=ALPHA)
    quiet_trainer(tmp_path, max_epochs=0, callbacks=[callback]).fit(
        repairer, datamodule=tiny_finetune_data(num_samples=16)
    )

    masks = load_tensors(repair / "mask.safetensors")
    report = json.loads((repair / "mask.json").read_text())
    assert_adapter_stage(repair, targets)
    assert report["method"] == "wanda" and report["calibration_samples"] == 8
    # One mask per LoRA A and B of every adapted projection in both layers.
    assert len(masks) == 2 * 2 * len(targets)
    params = dict(repairer.model.named_parameters())
    for name, mask in masks.items():
        # Per row: int(cols * (1 - alpha)) entries are kept, the rest are zeroed (reference B.4).
        cols = mask.shape[-1]
        assert torch.all(mask.sum(dim=-1) == cols - int(cols * (1 - ALPHA))), name
        weight = params[name].detach()
        assert torch.all(weight[mask] == 0), name
        assert torch.equal(weight[~mask], loaded[name][~mask]), name
    assert 0 < report["removed_fraction"] <= ALPHA

    # Evaluate the repaired stage: reloaded from disk (base + merged alignment + pruned adapter).
    evaluator = StageEvaluator(
        str(repair), judge=TinyWorldJudge(), harmful_max_new_tokens=4, task_max_new_tokens=2
    )
    eval_data = EvalDataModule(
        harmful=TinyWorldSource("harmful_answer", split="eval", limit=6),
        task=TinyWorldSource("sentiment", split="eval", limit=6),
        task_name="sst2",
        template="tiny",
        batch_size=4,
    )
    quiet_trainer(tmp_path / "eval").test(evaluator, datamodule=eval_data, verbose=False)
    results = evaluator.results
    assert results["n_harmful_score"] == 6 and results["n_finetune_accuracy"] == 6
    assert 0.0 <= results["harmful_score"] <= 100.0 and 0.0 <= results["finetune_accuracy"] <= 100.0
