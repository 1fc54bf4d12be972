"""The pruning callbacks end to end on a tiny adapter: artefacts, parity with the pure pruning math,
save/reload round trip, ablations, swapping through CLI fragments, bad input and device placement.

Every repair runs as the real pipeline does: ``trainer.max_epochs=0`` and the callback's ``on_fit_end``.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, make_stages, quiet_trainer_kwargs, tiny_finetune_data
from peft.tuners.lora import LoraLayer

from antidote_pl.callbacks import (
    MagnitudePruneCallback,
    NoPruneCallback,
    RandomPruneCallback,
    WandaPruneCallback,
)
from antidote_pl.data.records import fingerprint_records
from antidote_pl.errors import ConfigError
from antidote_pl.models.loading import load_stage
from antidote_pl.pruning import (
    apply_target_masks_,
    check_mask_shapes,
    collect,
    find_targets,
    load_tensors,
    magnitude_scores,
    masks_for_alphas,
    removed_count,
    run_calibration,
    save_tensors,
    select_masks,
    target_weights,
    wanda_scores,
)
from antidote_pl.training.sft import CausalLMSFTModule

ALPHA = 0.25  # with r=4, removes 1 of 4 entries per lora_B row and 8 of 32 per lora_A row
FRAGMENTS = sorted((REPO / "callbacks").glob("*.yaml"))
REPAIR_CONFIG = REPO / "configs" / "tiny" / "repair.yaml"


# --------------------------------------------------------------------------- fixtures and helpers


def repair_module(stages: tuple[Path, Path], **kw) -> CausalLMSFTModule:
    """The fine-tuned adapter loaded as trainable on its base, as ``configs/tiny/repair.yaml`` does."""
    base, adapter = stages
    return CausalLMSFTModule(model_name_or_path=str(base), adapter_path=str(adapter), **kw)


def run_repair(module, callbacks, root: Path, data=None, **trainer_kw) -> L.Trainer:
    """``fit`` with ``max_epochs=0``: no training, only the callbacks' ``on_fit_end``."""
    trainer = L.Trainer(max_epochs=0, callbacks=callbacks, **{**quiet_trainer_kwargs(root), **trainer_kw})
    trainer.fit(module, datamodule=data if data is not None else tiny_finetune_data())
    return trainer


def lora_snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}


def expected_wanda_masks(module, loader, alpha=ALPHA, statistic="sample_mean") -> dict[str, torch.Tensor]:
    """The mask from the pure functions alone, on the module's current (unpruned) weights."""
    targets = find_targets(module.model, "lora")
    with collect(module.model, targets) as stats:
        run_calibration(module.model, loader, stats)
    return select_masks(wanda_scores(target_weights(targets), stats, statistic), alpha, "row")


def assert_masks_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.bool, name
        assert torch.equal(got[name], want[name].cpu()), f"mask differs for {name}"


def assert_pruned(module, before: dict, masks: dict) -> None:
    """Masked entries are zero; every other adapter entry is unchanged."""
    params = dict(module.model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(params[name].detach(), before[name].masked_fill(mask, 0)), name
    for name in set(before) - set(masks):
        assert torch.equal(params[name].detach(), before[name]), name


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return make_stages(tmp_path_factory.mktemp("prune_stages"))


# --------------------------------------------------------------------------- Wanda, the Antidote path
def test_wanda_repair_writes_artifacts_and_matches_pure_math(stages, tmp_path):
    module, data = repair_module(stages), tiny_finetune_data()
    expected = expected_wanda_masks(module, data.realignment_dataloader())
    before = lora_snapshot(module)
    out = tmp_path / "repair"
    trainer = run_repair(module, [WandaPruneCallback(alpha=ALPHA, output_dir=str(out))], tmp_path, data)

    assert trainer.global_step == 0, "repair must not train"
    names = {p.name for p in out.iterdir()}
    assert {"mask.safetensors", "mask.json", "adapter_model.safetensors", "adapter_config.json"} <= names
    assert "scores.safetensors" not in names  # only with save_scores=True
    masks = load_tensors(out / "mask.safetensors")
    assert_masks_equal(masks, expected)
    assert len(masks) == 12  # A and B of q/k/v in 2 layers
    for name, mask in masks.items():
        per_row = mask.sum(dim=1)
        assert (per_row == removed_count(mask.shape[1], ALPHA)).all(), name
    assert_pruned(module, before, masks)

    report = json.loads((out / "mask.json").read_text())
    assert report["method"] == "wanda" and report["alpha"] == ALPHA
    assert report["device"] == str(trainer.strategy.root_device)
    assert report["dataset_fingerprint"] == fingerprint_records(data.realignment_records)
    assert report["calibration_samples"] == len(data.realignment_records) == 8
    assert report["scoring_seconds"] > 0 and report["peak_memory_bytes"] > 0
    assert report["per_tensor_fraction"] == {n: m.float().mean().item() for n, m in masks.items()}
    stage_meta = json.loads((out / "antidote_stage.json").read_text())
    assert stage_meta["pruning"]["per_tensor_fraction"] == report["per_tensor_fraction"]


def test_saved_mask_and_adapter_round_trip(stages, tmp_path):
    module = repair_module(stages)
    expected = expected_wanda_masks(module, tiny_finetune_data().realignment_dataloader())
    before = lora_snapshot(module)
    out = tmp_path / "repair"
    run_repair(module, [WandaPruneCallback(alpha=ALPHA, output_dir=str(out))], tmp_path)

    masks = load_tensors(out / "mask.safetensors")
    # The file holds exactly the mask that was applied: re-deriving it from the zeroed weights
    # cannot see entries that were already zero, so compare against the independent computation.
    assert_masks_equal(masks, expected)
    save_tensors(tmp_path / "again.safetensors", masks)
    assert_masks_equal(load_tensors(tmp_path / "again.safetensors"), masks)

    peft_model, _ = load_stage(str(out), merge=False)
    reloaded = dict(peft_model.named_parameters())
    in_memory = dict(module.model.named_parameters())
    for name, mask in masks.items():
        assert torch.count_nonzero(reloaded[name][mask]) == 0, f"{name}: pruned entries are not zero"
        assert torch.equal(reloaded[name], in_memory[name].detach()), name

    # The merged model computes W + scale * (B*~mB) @ (A*~mA) from the *unpruned* factors.
    scales = {
        name: layer.scaling["default"]
        for name, layer in peft_model.named_modules()
        if isinstance(layer, LoraLayer)
    }
    merged = dict(peft_model.merge_and_unload().named_parameters())
    base, _ = load_stage(str(stages[0]))
    base_params = dict(base.named_parameters())
    checked = 0
    for module_name, scale in scales.items():
        a_key, b_key = (f"{module_name}.lora_{f}.default.weight" for f in "AB")
        plain = re.sub(r"^base_model\.model\.", "", module_name) + ".weight"
        delta = (before[b_key] * ~masks[b_key]) @ (before[a_key] * ~masks[a_key])
        torch.testing.assert_close(merged[plain], base_params[plain] + scale * delta, rtol=0, atol=1e-6)
        checked += 1
    assert checked == 6


# --------------------------------------------------------------------------- ablations
def test_magnitude_matches_pure_math_and_differs_from_wanda(stages, tmp_path):
    module, data = repair_module(stages), tiny_finetune_data()
    weights = target_weights(find_targets(module.model, "lora"))
    expected = select_masks(magnitude_scores(weights), ALPHA, "row")
    wanda = expected_wanda_masks(module, data.realignment_dataloader())
    before = lora_snapshot(module)
    out = tmp_path / "magnitude"
    run_repair(module, [MagnitudePruneCallback(alpha=ALPHA, output_dir=str(out))], tmp_path, data)
    masks = load_tensors(out / "mask.safetensors")
    assert_masks_equal(masks, expected)
    assert_pruned(module, before, masks)
    assert json.loads((out / "mask.json").read_text())["method"] == "magnitude"
    # The activation statistic must matter, or the Wanda path would be magnitude pruning in disguise.
    assert any(not torch.equal(masks[n], wanda[n]) for n in masks)


@pytest.mark.parametrize("random_scope", ["row", "tensor"])
def test_random_is_seeded(stages, tmp_path, random_scope):
    def run(seed: int, tag: str) -> dict[str, torch.Tensor]:
        module = repair_module(stages)
        before = lora_snapshot(module)
        out = tmp_path / tag
        cb = RandomPruneCallback(alpha=ALPHA, seed=seed, random_scope=random_scope, output_dir=str(out))
        run_repair(module, [cb], tmp_path)
        masks = load_tensors(out / "mask.safetensors")
        assert_pruned(module, before, masks)
        report = json.loads((out / "mask.json").read_text())
        assert (report["method"], report["seed"], report["scope"]) == ("random", seed, random_scope)
        return masks

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert_masks_equal(again, first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    for name, mask in first.items():
        if random_scope == "row":
            assert (mask.sum(dim=1) == removed_count(mask.shape[1], ALPHA)).all(), name
        else:
            assert int(mask.sum()) == int(mask.numel() * ALPHA), name
    if random_scope == "tensor":
        # Positions over the whole tensor: per-row counts are not forced to the row budget.
        assert any((m.sum(dim=1) != removed_count(m.shape[1], ALPHA)).any() for m in first.values())


def test_no_prune_writes_the_adapter_unchanged(stages, tmp_path):
    out = tmp_path / "none"
    module = repair_module(stages, output_dir=str(out))
    before = lora_snapshot(module)
    run_repair(module, [NoPruneCallback()], tmp_path)
    assert_pruned(module, before, {})
    assert not (out / "mask.safetensors").exists()
    saved, _ = load_stage(str(out), merge=False)
    original, _ = load_stage(str(stages[1]), merge=False)
    reloaded = dict(saved.named_parameters())
    for name, value in original.named_parameters():
        assert torch.equal(reloaded[name], value), name


def test_task_calibration_differs_from_realignment(stages, tmp_path):
    module, data = repair_module(stages), tiny_finetune_data()
    expected = expected_wanda_masks(module, data.task_calibration_dataloader())
    realign = expected_wanda_masks(module, data.realignment_dataloader())
    out = tmp_path / "task"
    cb = WandaPruneCallback(alpha=ALPHA, calibration="task", output_dir=str(out))
    run_repair(module, [cb], tmp_path, data)
    masks = load_tensors(out / "mask.safetensors")
    assert_masks_equal(masks, expected)
    assert any(not torch.equal(masks[n], realign[n]) for n in masks)
    report = json.loads((out / "mask.json").read_text())
    assert report["calibration"] == "task"
    assert report["dataset_fingerprint"] == fingerprint_records(data.task_calibration_records)


def test_protect_fraction_never_removes_protected_entries(stages, tmp_path):
    module, data = repair_module(stages), tiny_finetune_data()
    targets = find_targets(module.model, "lora")
    with collect(module.model, targets) as task_stats:
        run_calibration(module.model, data.task_calibration_dataloader(), task_stats)
    protected = select_masks(wanda_scores(target_weights(targets), task_stats), 0.5, "row")
    plain = expected_wanda_masks(module, data.realignment_dataloader())
    # Protection must bite somewhere, or this test would pass without it.
    assert any((plain[n] & protected[n]).any() for n in plain)

    out = tmp_path / "protect"
    cb = WandaPruneCallback(alpha=ALPHA, protect_fraction=0.5, output_dir=str(out))
    run_repair(module, [cb], tmp_path, data)
    masks = load_tensors(out / "mask.safetensors")
    for name, mask in masks.items():
        assert not (mask & protected[name]).any(), f"{name}: a protected entry was removed"
        # Half the row stays unprotected, so the replacement keeps the full per-row budget.
        assert (mask.sum(dim=1) == removed_count(mask.shape[1], ALPHA)).all(), name
    assert json.loads((out / "mask.json").read_text())["protect_fraction"] == 0.5


def test_saved_scores_sweep_alphas_without_another_forward(stages, tmp_path):
    a1, a2 = 0.1, 0.3
    runs = {}
    for alpha in (a1, a2):
        out = tmp_path / f"alpha{alpha}"
        cb = WandaPruneCallback(alpha=alpha, save_scores=alpha == a1, output_dir=str(out))
        run_repair(repair_module(stages), [cb], tmp_path)
        runs[alpha] = load_tensors(out / "mask.safetensors")
    scores = load_tensors(tmp_path / f"alpha{a1}" / "scores.safetensors")
    assert not (tmp_path / f"alpha{a2}" / "scores.safetensors").exists()
    swept = masks_for_alphas(scores, [a1, a2], "row")
    assert_masks_equal(swept[a1], runs[a1])
    assert_masks_equal(swept[a2], runs[a2])
    assert any(not torch.equal(runs[a1][n], runs[a2][n]) for n in scores)


# --------------------------------------------------------------------------- swapping via CLI fragments
def print_config(capsys, *configs: Path) -> dict:
    """``antidote_pl fit --config ... --print_config``, in process; returns the parsed YAML."""
    from antidote_pl.commands.dispatch import run

    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def fragment_pruner(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["pruner"]


def test_fragments_exist():
    assert {p.stem for p in FRAGMENTS} >= {"wanda", "wanda_benign", "magnitude", "random", "none"}


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_cli_fragment_swaps_the_pruner_slot(capsys, fragment):
    expected = fragment_pruner(fragment)
    # A fragment lists every init argument of its class, so a swap cannot inherit a setting.
    module_name, _, class_name = expected["class_path"].rpartition(".")
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    assert set(expected.get("init_args") or {}) == set(inspect.signature(cls).parameters)

    printed = print_config(capsys, REPAIR_CONFIG, fragment)["pruner"]
    assert printed["class_path"] == expected["class_path"]
    assert (printed.get("init_args") or {}) == (expected.get("init_args") or {})


def test_cli_swap_does_not_leak_settings(capsys, tmp_path):
    modified = fragment_pruner(REPO / "callbacks" / "wanda.yaml")
    modified["init_args"].update(alpha=0.3, include=["q_proj"], output_dir="elsewhere", save_scores=True)
    wanda_mod = tmp_path / "wanda_mod.yaml"
    wanda_mod.write_text(yaml.safe_dump({"pruner": modified}))
    assert print_config(capsys, REPAIR_CONFIG, wanda_mod)["pruner"]["init_args"]["alpha"] == 0.3

    printed = print_config(capsys, REPAIR_CONFIG, wanda_mod, REPO / "callbacks" / "random.yaml")["pruner"]
    assert printed == fragment_pruner(REPO / "callbacks" / "random.yaml")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        *[(WandaPruneCallback, {"alpha": a}, "alpha") for a in (0, 1, -0.1, 1.5)],
        (MagnitudePruneCallback, {"alpha": 0}, "alpha"),
        (RandomPruneCallback, {"alpha": 1.5}, "alpha"),
        (WandaPruneCallback, {"target": "attention"}, "target"),
        (RandomPruneCallback, {"target": "mlp"}, "target"),
        (WandaPruneCallback, {"scope": "column"}, "scope"),
        (RandomPruneCallback, {"random_scope": "layer"}, "random_scope"),
        (WandaPruneCallback, {"calibration": "benign"}, "calibration"),
        (WandaPruneCallback, {"statistic": "median"}, "statistic"),
        (WandaPruneCallback, {"token_mask": "prompt"}, "token_mask"),
        (WandaPruneCallback, {"batch_size": 0}, "batch_size"),
        (WandaPruneCallback, {"protect_fraction": 1.0}, "protect_fraction"),
    ],
)
def test_bad_arguments_fail_at_construction(cls, kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}="):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("make_callback", "data", "field"),
    [
        (lambda: WandaPruneCallback(include=["nonexistent"]), None, "include"),
        (lambda: MagnitudePruneCallback(include=["nonexistent"]), None, "include"),
        (lambda: WandaPruneCallback(adapter_name="other"), None, "target"),
        (lambda: WandaPruneCallback(), "no_realignment", r"data \(realignment set\)"),
        (lambda: WandaPruneCallback(protect_fraction=0.5), "no_task", r"data \(task set\)"),
        (lambda: WandaPruneCallback(calibration="task"), "no_task", r"data \(task set\)"),
        (lambda: WandaPruneCallback(contrast_lambda=1.0), "no_task", r"data \(task set\)"),
    ],
    ids=[
        "include",
        "include-magnitude",
        "adapter",
        "empty-realignment",
        "protect-no-task",
        "task-no-task",
        "contrast-no-task",
    ],
)
def test_bad_setup_fails_before_any_forward(stages, tmp_path, monkeypatch, make_callback, data, field):
    module = repair_module(stages, output_dir=str(tmp_path / "out"))
    forwards = []
    module.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    datamodule = tiny_finetune_data(harmful_ratio=1.0) if data == "no_task" else tiny_finetune_data()
    if data == "no_realignment":
        # realignment_size=0 is already refused by the DataModule (below); a custom DataModule could
        # still hand over an empty set.
        monkeypatch.setattr(type(datamodule), "realignment_records", property(lambda self: []))
    with pytest.raises(ConfigError, match=field):
        run_repair(module, [make_callback()], tmp_path, datamodule)
    assert forwards == []
    assert not (tmp_path / "out").exists()


def test_realignment_size_zero_is_rejected():
    with pytest.raises(ConfigError, match="^realignment_size=0"):
        tiny_finetune_data(realignment_size=0)


def test_missing_output_dir_is_rejected(stages, tmp_path):
    with pytest.raises(ConfigError, match="output_dir"):
        run_repair(repair_module(stages), [WandaPruneCallback()], tmp_path)


def test_mask_file_with_wrong_shapes_is_rejected_before_any_change(stages, tmp_path):
    module = repair_module(stages)
    targets = find_targets(module.model, "lora")
    names = list(targets)
    good = {names[0]: torch.ones(targets[names[0]].param.shape, dtype=torch.bool)}
    bad = {names[1]: torch.ones(targets[names[1]].param.shape[::-1], dtype=torch.bool)}
    save_tensors(tmp_path / "mask.safetensors", {**good, **bad})
    masks = load_tensors(tmp_path / "mask.safetensors")
    before = lora_snapshot(module)
    with pytest.raises(ConfigError, match=re.escape(names[1]) + ".*shape"):
        check_mask_shapes(masks, dict(module.model.named_parameters()))
    with pytest.raises(ConfigError, match=re.escape(names[1]) + ".*shape"):
        apply_target_masks_(targets, masks)
    assert_pruned(module, before, {})  # the good mask was not applied either
    with pytest.raises(ConfigError, match="not among"):
        apply_target_masks_(targets, {"model.no_such.weight": torch.ones(2, 2, dtype=torch.bool)})


# --------------------------------------------------------------------------- device placement
class _MoveToCPU(L.Callback):
    """Runs before the pruner and moves the module away, as Lightning's teardown does on GPU."""

    def on_fit_end(self, trainer, pl_module):
        pl_module.cpu()


@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_scores_on_the_strategy_root_device(stages, tmp_path, accelerator):
    module = repair_module(stages)
    out = tmp_path / "repair"
    cb = WandaPruneCallback(alpha=ALPHA, output_dir=str(out))
    trainer = run_repair(module, [_MoveToCPU(), cb], tmp_path, accelerator=accelerator)
    device = trainer.strategy.root_device
    assert json.loads((out / "mask.json").read_text())["device"] == str(device)
    assert {p.device for p in module.parameters()} == {device}
