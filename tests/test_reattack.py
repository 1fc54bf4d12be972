"""Re-attack on the tiny world: continued harmful fine-tuning from a repaired adapter, a few steps."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import finetune_data_config, make_stages, tiny_finetune_data

from antidote_pl.errors import ConfigError
from antidote_pl.evaluation.evaluator import EvalDataModule, StageEvaluator
from antidote_pl.experiment.reattack import (
    check_checkpoints,
    continue_attack,
    evaluate_snapshots,
    reattack_from_configs,
    reattack_markdown,
    write_reattack_plot,
)
from antidote_pl.judges.base import TinyWorldJudge
from antidote_pl.pruning.targets import find_targets
from antidote_pl.tinyworld.world import TinyWorldSource
from antidote_pl.training.sft import CausalLMSFTModule

REPORT = {"target": "lora", "adapter_name": "default", "include": None}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return make_stages(tmp_path_factory.mktemp("reattack"))


def _module(base, adapter) -> CausalLMSFTModule:
    return CausalLMSFTModule(model_name_or_path=str(base), adapter_path=str(adapter), learning_rate=1e-2)


def _masks(module: CausalLMSFTModule, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    targets = find_targets(module.model, "lora")
    return {n: torch.rand(t.param.shape, generator=gen) < alpha for n, t in targets.items()}


def _eval_data() -> EvalDataModule:
    return EvalDataModule(
        harmful=TinyWorldSource("harmful_answer", split="eval", limit=4),
        task=TinyWorldSource("sentiment", split="eval", limit=4),
        task_name="sst2",
        template="tiny",
        batch_size=8,
    )


def _evaluator(adapter) -> StageEvaluator:
    return StageEvaluator(
        str(adapter),
        judge=TinyWorldJudge(),
        harmful_max_new_tokens=4,
        task_max_new_tokens=2,
        merge_adapter=False,
    )


def test_masked_weights_start_at_zero_and_regrow(stages):
    base, adapter = stages
    module = _module(base, adapter)
    masks = _masks(module)
    snaps = continue_attack(module, tiny_finetune_data(), [4, 0, 2], masks, REPORT)
    assert [s.step for s in snaps] == [0, 2, 4]
    assert snaps[0].masked_norm_ratio == 0.0  # the repair is applied before the attack
    assert 0 < snaps[1].masked_norm_ratio < snaps[2].masked_norm_ratio  # the attacker trains them back
    name = next(iter(masks))
    assert not torch.equal(snaps[0].tensors[name], snaps[2].tensors[name])
    assert snaps[0].tensors[name][masks[name]].abs().sum() == 0


def test_curve_evaluates_each_point_and_restores_the_evaluator(stages):
    base, adapter = stages
    evaluator, data = _evaluator(adapter), _eval_data()
    before = {n: p.detach().clone() for n, p in evaluator.model.named_parameters()}
    plain = evaluate_snapshots(
        evaluator, data, continue_attack(_module(base, adapter), tiny_finetune_data(), [0])
    )
    module = _module(base, adapter)
    masks = _masks(module, alpha=0.9)
    curve = evaluate_snapshots(
        evaluator, data, continue_attack(module, tiny_finetune_data(), [0, 3], masks, REPORT)
    )
    assert [p["step"] for p in curve] == [0, 3] and plain[0]["masked_norm_ratio"] is None
    for point in (*plain, *curve):
        assert point["n_harmful_score"] == 4 and point["n_finetune_accuracy"] == 4
        assert point["harmful_score"] is not None and "stage" not in point
    assert all(torch.equal(p, before[n]) for n, p in evaluator.model.named_parameters())
    text = reattack_markdown({"none": plain, "random a0.9": curve})
    assert "| random a0.9 | 3 |" in text and "| none | 0 |" in text and text.count("\n| ") == 4


def test_each_point_is_evaluated_on_its_own_weights(stages):
    base, adapter = stages
    module = _module(base, adapter)
    masks = _masks(module)
    snaps = continue_attack(module, tiny_finetune_data(), [0, 2], masks, REPORT)
    evaluator, name = _evaluator(adapter), next(iter(masks))
    seen = []

    class RecordingTrainer:
        def test(self, model, datamodule, verbose):
            seen.append(dict(model.model.named_parameters())[name].detach().clone())
            model.results = {"stage": "x", "harmful_score": 0.0}

    rows = evaluate_snapshots(evaluator, _eval_data(), snaps, RecordingTrainer())
    assert [r["step"] for r in rows] == [0, 2] and rows[0] == {
        "step": 0,
        "masked_norm_ratio": 0.0,
        "harmful_score": 0.0,
    }
    assert torch.equal(seen[0], snaps[0].tensors[name]) and seen[0][masks[name]].abs().sum() == 0
    assert torch.equal(seen[1], snaps[1].tensors[name])


def test_known_step0_is_not_evaluated_again(stages):
    """The repaired model's results from the sweep stand for step 0; later steps are evaluated."""
    base, adapter = stages
    module = _module(base, adapter)
    snaps = continue_attack(module, tiny_finetune_data(), [0, 2], _masks(module), REPORT)
    steps = []

    class CountingTrainer:
        def test(self, model, datamodule, verbose):
            steps.append(len(steps))
            model.results = {"stage": "x", "harmful_score": 50.0}

    known = {"stage": "sweep", "harmful_score": 12.5, "finetune_accuracy": 80.0}
    rows = evaluate_snapshots(_evaluator(adapter), _eval_data(), snaps, CountingTrainer(), step0=known)
    assert len(steps) == 1, "step 0 was evaluated although its results were given"
    assert rows[0] == {"step": 0, "masked_norm_ratio": 0.0, "harmful_score": 12.5, "finetune_accuracy": 80.0}
    assert rows[1]["step"] == 2 and rows[1]["harmful_score"] == 50.0


def test_known_results_need_the_same_evaluation(stages):
    base, adapter = stages
    with pytest.raises(ConfigError, match="reattack.evaluated"):
        reattack_from_configs(
            "a.yaml",
            "b.yaml",
            str(adapter),
            {"none": (None, None)},
            [0, 1],
            eval_overrides=["--data.init_args.task_limit=3"],
            evaluated={"none": {"harmful_score": 1.0}},
        )


def test_wrong_evaluator_is_refused(stages, tmp_path):
    base, adapter = stages
    snaps = continue_attack(_module(base, adapter), tiny_finetune_data(), [0])
    merged = StageEvaluator(
        str(adapter), judge=TinyWorldJudge(), harmful_max_new_tokens=2, merge_adapter=True
    )
    with pytest.raises(ConfigError, match="merge_adapter=False"):
        evaluate_snapshots(merged, _eval_data(), snaps)


def test_from_configs(stages, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base, adapter = stages
    finetune = {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "enable_model_summary": False},
        "model": {
            "class_path": "antidote_pl.training.sft.CausalLMSFTModule",
            "init_args": {
                "model_name_or_path": str(base),
                "learning_rate": 1e-2,
                "output_dir": str(tmp_path / "no"),
            },
        },
        "data": finetune_data_config(str(base), batch_size=8),
    }
    evaluation = {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_model_summary": False},
        "model": {
            "class_path": "antidote_pl.evaluation.evaluator.StageEvaluator",
            "init_args": {
                "stage": "x",
                "judge": {"class_path": "antidote_pl.judges.base.TinyWorldJudge"},
                "harmful_max_new_tokens": 4,
                "task_max_new_tokens": 2,
            },
        },
        "data": {
            "class_path": "antidote_pl.evaluation.evaluator.EvalDataModule",
            "init_args": {
                "template": "tiny",
                "task_name": "sst2",
                "harmful": {
                    "class_path": "antidote_pl.tinyworld.world.TinyWorldSource",
                    "init_args": {"kind": "harmful_answer", "split": "eval", "limit": 3},
                },
                "task": {
                    "class_path": "antidote_pl.tinyworld.world.TinyWorldSource",
                    "init_args": {"kind": "sentiment", "split": "eval", "limit": 3},
                },
            },
        },
    }
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(evaluation))
    masks = _masks(_module(base, adapter))
    # 32 samples in batches of 8 are 4 steps per epoch: 6 steps need a second epoch (max_epochs -1).
    curves = reattack_from_configs(
        str(tmp_path / "finetune.yaml"),
        str(tmp_path / "eval.yaml"),
        str(adapter),
        {"none": (None, None), "random": (masks, REPORT)},
        [0, 6],
    )
    assert list(curves) == ["none", "random"]
    assert [p["step"] for p in curves["random"]] == [0, 6]
    assert curves["random"][0]["masked_norm_ratio"] == 0.0 < curves["random"][1]["masked_norm_ratio"]
    assert all(p["n_harmful_score"] == 3 for c in curves.values() for p in c)
    # The re-attack writes nothing: no stage, no config copy, no logs.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.yaml", "finetune.yaml"]
    write_reattack_plot(curves, tmp_path / "reattack.png")
    assert (tmp_path / "reattack.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", [[], [-1], ["a"], "10"])
def test_bad_checkpoints(bad):
    with pytest.raises(ConfigError, match="checkpoints"):
        check_checkpoints(bad)


def test_masks_need_their_report(stages):
    base, adapter = stages
    module = _module(base, adapter)
    with pytest.raises(ConfigError, match="mask_report"):
        continue_attack(module, tiny_finetune_data(), [0], _masks(module), None)
