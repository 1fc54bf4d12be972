"""Score once, sweep many: the callback's ``sweep_alphas`` and the typed reader ``RepairArtifacts``.

The masks saved for every sweep alpha are the masks the pure functions give on the same scores, the
callback's own alpha among them is the mask it applied, and a fresh copy of the fine-tuned model
pruned with a saved sweep mask equals a repair run at that alpha. Tampered artefacts fail naming the
file.
"""

from __future__ import annotations

import json
import re
import shutil

import lightning as L
import pytest
import torch
from conftest import make_stages, quiet_trainer_kwargs, tiny_finetune_data

from antidote_pl.callbacks import MagnitudePruneCallback, RandomPruneCallback, WandaPruneCallback
from antidote_pl.errors import ConfigError
from antidote_pl.pruning import (
    apply_masks_,
    find_targets,
    load_tensors,
    masks_for_alphas,
    random_masks,
    save_tensors,
    target_weights,
    to_param_layout,
)
from antidote_pl.pruning.artifacts import (
    SWEEP_FILE,
    RepairArtifacts,
    artifacts_fingerprint,
    read_masks,
)
from antidote_pl.pruning.targets import merged_param_name
from antidote_pl.training.sft import CausalLMSFTModule

ALPHA = 0.25
SWEEP = [0.1, 0.5]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return make_stages(tmp_path_factory.mktemp("sweep_stages"))


def module_for(stages) -> CausalLMSFTModule:
    base, adapter = stages
    return CausalLMSFTModule(model_name_or_path=str(base), adapter_path=str(adapter))


def repair(stages, callback, root) -> CausalLMSFTModule:
    module = module_for(stages)
    trainer = L.Trainer(max_epochs=0, callbacks=[callback], **quiet_trainer_kwargs(root))
    trainer.fit(module, datamodule=tiny_finetune_data())
    return module


@pytest.fixture(scope="module")
def swept(stages, tmp_path_factory):
    """One Wanda repair with a sweep and saved scores."""
    root = tmp_path_factory.mktemp("swept")
    cb = WandaPruneCallback(alpha=ALPHA, sweep_alphas=SWEEP, save_scores=True, output_dir=str(root / "r"))
    repair(stages, cb, root)
    return root / "r"


def test_sweep_masks_are_the_pure_masks_of_the_saved_scores(swept, stages):
    art = RepairArtifacts.read(swept)
    assert art.alphas == sorted([ALPHA, *SWEEP])
    assert art.alpha == ALPHA and art.report["sweep_alphas"] == SWEEP
    assert art.fingerprint == artifacts_fingerprint(swept)
    scores = art.scores()
    # Scores of the tiny model's LoRA targets are in row layout already (no transposed targets).
    expected = masks_for_alphas(scores, art.alphas, "row")
    for alpha in art.alphas:
        got = art.masks(alpha)
        assert set(got) == set(scores)
        assert all(torch.equal(got[n], expected[alpha][n]) for n in scores), alpha
    # The own alpha's sweep mask is the mask applied and saved with the stage.
    applied, _ = read_masks(swept)
    assert all(torch.equal(art.masks()[n], applied[n]) for n in applied)
    assert any(not torch.equal(art.masks(0.1)[n], art.masks(0.5)[n]) for n in scores)
    fractions = art.report["sweep_removed_fraction"]
    assert set(fractions) == {"0.1", "0.25", "0.5"}


def test_a_saved_sweep_mask_reproduces_a_repair_at_that_alpha(swept, stages, tmp_path):
    art = RepairArtifacts.read(swept)
    fresh = module_for(stages)
    params = dict(fresh.model.named_parameters())
    art.scores({n: params[n] for n in art.scores()})  # checked against the weights they belong to
    apply_masks_(params, art.masks(0.5))
    direct = repair(stages, WandaPruneCallback(alpha=0.5, output_dir=str(tmp_path / "d")), tmp_path)
    for name, p in direct.model.named_parameters():
        assert torch.equal(p.detach(), params[name].detach()), name


def test_without_a_sweep_only_the_own_alpha_is_readable(stages, tmp_path):
    out = tmp_path / "plain"
    repair(stages, MagnitudePruneCallback(alpha=ALPHA, output_dir=str(out)), tmp_path)
    art = RepairArtifacts.read(out)
    assert art.alphas == [ALPHA] and not art.has_scores
    assert not (out / SWEEP_FILE).exists()
    masks, _ = read_masks(out)
    assert all(torch.equal(art.masks(ALPHA)[n], masks[n]) for n in masks)
    with pytest.raises(ConfigError, match=r"^alpha=0\.5 .*\[0\.25\]"):
        art.masks(0.5)
    with pytest.raises(ConfigError, match="scores.safetensors"):
        art.scores()


def test_random_tensor_scope_sweeps_with_its_own_function(stages, tmp_path):
    out = tmp_path / "random"
    cb = RandomPruneCallback(
        alpha=ALPHA, random_scope="tensor", seed=3, sweep_alphas=[0.5], output_dir=str(out)
    )
    repair(stages, cb, tmp_path)
    targets = find_targets(module_for(stages).model, "lora")
    art = RepairArtifacts.read(out)
    for alpha in (ALPHA, 0.5):
        want = to_param_layout(random_masks(target_weights(targets), alpha, "tensor", 3), targets)
        got = art.masks(alpha)
        assert all(torch.equal(got[n], want[n]) for n in want), alpha


def copy_of(swept, tmp_path):
    return shutil.copytree(swept, tmp_path / "copy")


def test_a_missing_sweep_file_is_named(swept, tmp_path):
    copy = copy_of(swept, tmp_path)
    (copy / SWEEP_FILE).unlink()
    with pytest.raises(ConfigError, match=re.escape(SWEEP_FILE) + ": missing"):
        RepairArtifacts.read(copy)


def test_an_edited_sweep_mask_is_named(swept, tmp_path):
    copy = copy_of(swept, tmp_path)
    tensors = load_tensors(copy / SWEEP_FILE)
    key = next(k for k in tensors if k.startswith("0.5/"))
    tensors[key].view(-1)[0] ^= True  # one entry more or less removed
    save_tensors(copy / SWEEP_FILE, tensors, metadata={"alphas": json.dumps([0.1, 0.25, 0.5])})
    art = RepairArtifacts.read(copy)
    assert art.fingerprint != artifacts_fingerprint(swept)
    name = key.partition("/")[2]
    assert torch.equal(art.masks(0.1)[name], RepairArtifacts.read(swept).masks(0.1)[name])
    with pytest.raises(ConfigError, match=re.escape(SWEEP_FILE) + ": removes"):
        art.masks(0.5)


def test_a_count_preserving_edit_of_a_sweep_mask_is_named(swept, tmp_path):
    """The same number of entries removed, other entries: caught by the recorded content hash."""
    copy = copy_of(swept, tmp_path)
    tensors = load_tensors(copy / SWEEP_FILE)
    key = next(k for k in tensors if k.startswith("0.5/"))
    tensors[key] = torch.roll(tensors[key], shifts=1, dims=-1)
    assert not torch.equal(tensors[key], load_tensors(swept / SWEEP_FILE)[key])
    save_tensors(copy / SWEEP_FILE, tensors, metadata={"alphas": json.dumps([0.1, 0.25, 0.5])})
    art = RepairArtifacts.read(copy)
    assert len(art.masks(0.1)) > 0  # the other alphas are untouched
    with pytest.raises(ConfigError, match=re.escape(SWEEP_FILE) + ": the masks of alpha 0.5 differ"):
        art.masks(0.5)


def test_sweep_alphas_that_disagree_with_the_report_are_named(swept, tmp_path):
    copy = copy_of(swept, tmp_path)
    tensors = load_tensors(copy / SWEEP_FILE)
    kept = {k: v for k, v in tensors.items() if not k.startswith("0.5/")}
    save_tensors(copy / SWEEP_FILE, kept, metadata={"alphas": json.dumps([0.1, 0.25])})
    with pytest.raises(ConfigError, match=re.escape(SWEEP_FILE) + r": holds alphas \[0\.1, 0\.25\]"):
        RepairArtifacts.read(copy)
    save_tensors(
        copy / SWEEP_FILE,
        {**kept, "0.5/x": torch.zeros(2, dtype=torch.bool)},
        metadata={"alphas": json.dumps([0.1, 0.25, 0.5])},
    )
    with pytest.raises(ConfigError, match="same tensors"):
        RepairArtifacts.read(copy)


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ([0.1, 1.2], "sweep_alphas[1]"),
        ([], "sweep_alphas"),
        ("0.1", "sweep_alphas"),
        ([0], "sweep_alphas[0]"),
    ],
)
def test_bad_sweep_alphas_fail_at_construction(value, field):
    for cls in (WandaPruneCallback, MagnitudePruneCallback, RandomPruneCallback):
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}="):
            cls(sweep_alphas=value)


def test_sweep_alphas_are_sorted_and_deduplicated():
    cb = WandaPruneCallback(alpha=0.2, sweep_alphas=[0.3, 0.05, 0.3])
    assert cb.sweep_alphas == [0.05, 0.3] and cb.mask_alphas == [0.05, 0.2, 0.3]


def test_merged_saves_keep_sweep_masks_under_the_pruned_model_names(stages, tmp_path):
    out = tmp_path / "delta"
    cb = WandaPruneCallback(alpha=ALPHA, target="lora_delta", sweep_alphas=[0.5], output_dir=str(out))
    repair(stages, cb, tmp_path)
    art = RepairArtifacts.read(out)
    targets = find_targets(module_for(stages).model, "lora_delta")
    assert art.report["merged_adapter"] and art.alphas == [ALPHA, 0.5]
    # The sweep file names the fine-tuned (peft) model's parameters, where sweeps are applied; the
    # applied mask is saved under the merged model's names, and is the same mask.
    assert set(art.masks(ALPHA)) == set(art.masks(0.5)) == set(targets)
    saved, _ = read_masks(out)
    assert set(saved) == {merged_param_name(n) for n in targets}
    assert all(torch.equal(saved[merged_param_name(n)], m) for n, m in art.masks(ALPHA).items())
