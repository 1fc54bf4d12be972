"""bf16 on CPU (issue #26): LoRA training under bf16 autocast, bf16 weights for generation and judges,
Wanda statistics kept in fp32, and the precision recorded with every result."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import REPO, make_stages, quiet_trainer_kwargs, small_llama, tiny_finetune_data
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_eval_judges import _save_causal, save_classifier

from antidote_pl.judges.base import ClassifierJudge, GuardJudge
from antidote_pl.pruning import collect, find_targets, run_calibration
from antidote_pl.stages.cli import build_cli
from antidote_pl.training.sft import CausalLMSFTModule

EVAL = str(REPO / "configs/tiny/eval.yaml")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A tiny full base and a LoRA trained 3 steps on it (fp32): ``(base, adapter)``."""
    return make_stages(tmp_path_factory.mktemp("precision"))


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_lora_trains_under_bf16_autocast_with_fp32_adapter(stages, tmp_path, monkeypatch, base_dtype):
    base, _ = stages
    autocast_on = []
    sft_loss = CausalLMSFTModule.sft_loss

    def probe(self, batch):
        autocast_on.append(torch.is_autocast_enabled("cpu"))
        return sft_loss(self, batch)

    monkeypatch.setattr(CausalLMSFTModule, "sft_loss", probe)
    module = CausalLMSFTModule(
        model_name_or_path=str(base), dtype=base_dtype, lora_r=4, lora_alpha=8, learning_rate=1e-2
    )
    trainer = L.Trainer(max_steps=3, precision="bf16-mixed", **quiet_trainer_kwargs(tmp_path))
    trainer.fit(module, datamodule=tiny_finetune_data())
    assert autocast_on == [True] * 3
    params = dict(module.model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    # The trained (master) weights and the optimizer state stay fp32; only a frozen base may be bf16.
    assert trained and all(params[n].dtype == torch.float32 for n in trained)
    assert all(torch.isfinite(params[n]).all() for n in trained)
    frozen = {p.dtype for n, p in params.items() if n not in trained}
    assert frozen == {torch.float32 if base_dtype == "fp32" else torch.bfloat16}
    state = trainer.optimizers[0].state
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    module.save_stage(str(tmp_path / "out"))
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    meta = json.loads((tmp_path / "out" / "antidote_stage.json").read_text())
    assert meta["precision"] == "bf16-mixed" and meta["dtype"] == base_dtype


def _tiny_eval(stage, out, **values):
    cli = build_cli(
        [EVAL],
        {
            "model.init_args.stage": str(stage),
            "model.init_args.output_dir": str(out),
            "data.init_args.harmful.init_args.limit": 6,
            "data.init_args.task_limit": 6,
            "data.init_args.fa_validation_size": 0,
            "trainer.enable_progress_bar": False,
            "trainer.default_root_dir": str(out.parent / "logs"),
            **values,
        },
    )
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return cli.model, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("merge", [True, False])
def test_evaluation_generates_with_bf16_weights(stages, tmp_path, precision, merge):
    _, adapter = stages
    evaluator, metrics = _tiny_eval(
        adapter,
        tmp_path / "eval",
        **{
            "model.init_args.dtype": "bf16",
            "model.init_args.merge_adapter": merge,
            "trainer.precision": precision,
        },
    )
    dtypes = {p.dtype for p in evaluator.model.parameters()}
    # Merged: every weight bf16; unmerged: the bf16 base keeps peft's fp32 adapter beside it.
    assert dtypes == ({torch.bfloat16} if merge else {torch.bfloat16, torch.float32})
    assert metrics["dtype"] == "bf16" and metrics["precision"] == precision
    assert metrics["n_harmful_score"] == 6 and metrics["n_finetune_accuracy"] == 6
    rows = (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(rows) == 12 and all("response" in json.loads(r) for r in rows)


def test_classifier_judge_in_bf16_agrees_with_fp32(tmp_path):
    path = save_classifier(tmp_path / "c", {0: "safe", 1: "unsafe"}, multi_label=False, bias=[0.0, 0.3])
    bf16 = ClassifierJudge(str(path), device="cpu", dtype="bf16")
    fp32 = ClassifierJudge(str(path), device="cpu", dtype="fp32")
    prompts, responses = ["how do i hurt a cat"] * 2, ["here is way", "no"]
    low, full = bf16(prompts, responses), fp32(prompts, responses)
    assert [v.harmful for v in low] == [v.harmful for v in full]
    assert [v.score for v in low] == pytest.approx([v.score for v in full], abs=1e-2)
    assert {p.dtype for p in bf16._model.parameters()} == {torch.bfloat16}


def test_guard_judge_generates_in_bf16(tmp_path):
    judge = GuardJudge(str(_save_causal(tmp_path / "g")), max_new_tokens=3, device="cpu", dtype="bf16")
    verdicts = judge(["w1 w2", "w3"], ["w4", "w5 w6"])
    assert len(verdicts) == 2 and all(isinstance(v.harmful, bool) for v in verdicts)
    assert {p.dtype for p in judge._model.parameters()} == {torch.bfloat16}


def _lora_llama() -> torch.nn.Module:
    base = small_llama(hidden_size=64, intermediate_size=128)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # so the B factors see real inputs
    return model.eval()


def _batch(rows: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (rows, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_wanda_statistics_accumulate_fp32_under_bf16_autocast():
    model = _lora_llama()
    targets = find_targets(model, "lora")
    batch = {
        "input_ids": torch.randint(1, 64, (3, 40)),
        "attention_mask": torch.ones(3, 40, dtype=torch.long),
    }
    seen = set()
    hook = (
        model.base_model.model.model.layers[0]
        .self_attn.q_proj.lora_B["default"]
        .register_forward_hook(lambda module, args, out: seen.add(args[0].dtype))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16), collect(model, targets) as mixed:
        run_calibration(model, [batch], mixed)
    hook.remove()
    with collect(model, targets) as full:
        run_calibration(model, [batch], full)
    # The hooked activations are bf16 (a B factor reads A's autocast output), the sums stay fp32.
    assert seen == {torch.bfloat16}
    for name in targets:
        assert mixed.sum_sq[name].dtype == torch.float32 == mixed.sum_sample_mean_sq[name].dtype
        torch.testing.assert_close(mixed.sum_sq[name], full.sum_sq[name], rtol=3e-2, atol=1e-3)


def test_wanda_statistics_on_a_bf16_base_are_fp32(tmp_path):
    """The repair stage under the bf16 fragment: a bf16 base with its fp32 adapter."""
    model = _lora_llama().to(torch.bfloat16)
    targets = find_targets(model, "lora")
    batch = {
        "input_ids": torch.randint(1, 64, (2, 12)),
        "attention_mask": torch.ones(2, 12, dtype=torch.long),
    }
    with collect(model, targets) as stats:
        run_calibration(model, [batch], stats)
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in stats.sum_sq.values())
