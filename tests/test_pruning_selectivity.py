"""Selectivity-oriented scoring options of Wanda: subtractive contrast, decisive positions, budgets
per tensor and per layer. Known scores give known masks; the callback matches the pure functions.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import make_stages, quiet_trainer_kwargs, tiny_finetune_data

from antidote_pl.callbacks import WandaPruneCallback
from antidote_pl.errors import ConfigError
from antidote_pl.pruning import (
    ActivationStats,
    batch_token_mask,
    collect,
    contrast_statistic,
    contrastive_scores,
    find_targets,
    layer_of,
    load_tensors,
    masks_for_alphas,
    removed_count,
    run_calibration,
    select_masks,
    target_weights,
    wanda_scores,
)
from antidote_pl.training.sft import CausalLMSFTModule

T, F = True, False


# --------------------------------------------------------------------------- contrastive scores
HARM = {"w": torch.tensor([[4.0, 1.0, 3.0], [2.0, 5.0, 1.0]])}
BENIGN = {"w": torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])}


@pytest.mark.parametrize(
    ("weight", "mask"),
    [
        (0.0, [[T, F, F], [F, T, F]]),  # plain harm score: the largest per row
        (0.5, [[F, F, T], [F, T, F]]),  # [[2.5, 1, 3], [2, 3, 1]]
        (1.0, [[F, F, T], [T, F, F]]),  # [[1, 1, 3], [2, 1, 1]]
    ],
)
def test_contrastive_scores_give_known_masks(weight, mask):
    scores = contrastive_scores(HARM, BENIGN, weight)
    torch.testing.assert_close(scores["w"], HARM["w"] - weight * BENIGN["w"])
    # alpha 0.3 of 3 columns keeps floor(2.1) = 2 and removes the top one per row.
    assert select_masks(scores, 0.3, "row")["w"].tolist() == mask


def test_contrastive_scores_reject_bad_input():
    with pytest.raises(ConfigError, match="^contrast_lambda=-1"):
        contrastive_scores(HARM, BENIGN, -1)
    with pytest.raises(ConfigError, match=r"benign scores\[w\]: shape \(3,\)"):
        contrastive_scores(HARM, {"w": torch.ones(3)}, 1.0)
    with pytest.raises(ConfigError, match=r"benign scores\[w\]: shape None"):
        contrastive_scores(HARM, {}, 1.0)


# --------------------------------------------------------------------------- decisive positions
def decisive_batch() -> dict[str, torch.Tensor]:
    """Row 0: 3 prompt + 5 response tokens; row 1: 2 + 4 then right padding; row 2: left padded."""
    n = -100
    return {
        "input_ids": torch.arange(24).view(3, 8) + 1,
        "attention_mask": torch.tensor(
            [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]]
        ),
        "labels": torch.tensor(
            [[n, n, n, 4, 5, 6, 7, 8], [n, n, 11, 12, 13, 14, n, n], [n, n, n, n, 21, 22, 23, 24]]
        ),
    }


@pytest.mark.parametrize(
    ("k", "mask"),
    [
        (2, [[T, T, T, T, T, F, F, F], [T, T, T, T, F, F, F, F], [F, F, T, T, T, T, F, F]]),
        (0, [[T, T, T, F, F, F, F, F], [T, T, F, F, F, F, F, F], [F, F, T, T, F, F, F, F]]),
    ],
)
def test_decisive_mask_keeps_the_prompt_and_the_first_k_response_tokens(k, mask):
    assert batch_token_mask(decisive_batch(), "decisive", k).tolist() == mask


def test_decisive_mask_with_a_large_k_is_every_real_token_and_needs_labels():
    batch = decisive_batch()
    assert torch.equal(batch_token_mask(batch, "decisive", 10), batch["attention_mask"].bool())
    with pytest.raises(ConfigError, match="^decisive_tokens=-1"):
        batch_token_mask(batch, "decisive", -1)
    with pytest.raises(ConfigError, match="labels"):
        batch_token_mask({k: v for k, v in batch.items() if k != "labels"}, "decisive")


def test_decisive_statistic_sums_only_decisive_tokens():
    emb = torch.nn.Embedding(25, 4)

    class Net(torch.nn.Module):  # the HF-style keyword call of run_calibration
        def __init__(self):
            super().__init__()
            self.emb, self.lin = emb, torch.nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.lin(self.emb(input_ids))

    model = Net()
    targets = find_targets(model, "linear")
    batch = decisive_batch()
    with collect(model, targets) as stats:
        run_calibration(model, [batch], stats, token_mask="decisive", decisive_tokens=1)
    name = next(iter(targets))
    kept = batch["input_ids"][batch_token_mask(batch, "decisive", 1)]
    assert kept.tolist() == [1, 2, 3, 4, 9, 10, 11, 19, 20, 21]
    torch.testing.assert_close(stats.sum_sq[name], (emb.weight.detach()[kept] ** 2).sum(dim=0))
    assert (stats.n_tokens[name], stats.n_samples[name]) == (10, 3)


# --------------------------------------------------------------------------- per-tensor and per-layer budgets
def layered_scores() -> dict[str, torch.Tensor]:
    return {
        "m.layers.0.a.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "m.layers.0.b.weight": torch.tensor([[8.0, 0.0], [0.0, 0.0]]),
        "m.layers.1.a.weight": torch.tensor([[5.0, 6.0], [7.0, 1.0]]),
        "m.layers.1.b.weight": torch.tensor([[0.0, 0.0], [0.0, 9.0]]),
    }


@pytest.mark.parametrize(
    ("scope", "removed"),
    [
        # alpha 0.25: 1 of each tensor's 4 entries.
        ("matrix", {"0.a": [(1, 1)], "0.b": [(0, 0)], "1.a": [(1, 0)], "1.b": [(1, 1)]}),
        # 2 of each layer's 8 entries: 8 and 4 in layer 0, 9 and 7 in layer 1.
        ("layer", {"0.a": [(1, 1)], "0.b": [(0, 0)], "1.a": [(1, 0)], "1.b": [(1, 1)]}),
        # 4 of all 16 entries: 9, 8, 7, 6.
        ("global", {"0.a": [], "0.b": [(0, 0)], "1.a": [(0, 1), (1, 0)], "1.b": [(1, 1)]}),
    ],
)
def test_budget_scopes_give_known_masks(scope, removed):
    masks = masks_for_alphas(layered_scores(), [0.25], scope)[0.25]
    got = {
        n[len("m.layers.") : -len(".weight")]: [tuple(i) for i in m.nonzero().tolist()]
        for n, m in masks.items()
    }
    assert got == removed


def test_layer_budget_differs_from_per_tensor_when_layers_are_uneven():
    scores = layered_scores()
    scores["m.layers.0.a.weight"] = torch.tensor([[1.0, 2.0], [30.0, 40.0]])
    layer = masks_for_alphas(scores, [0.25], "layer")[0.25]
    # Layer 0's two largest entries are both in tensor a: b keeps everything, unlike per tensor.
    assert layer["m.layers.0.a.weight"].tolist() == [[F, F], [T, T]]
    assert not layer["m.layers.0.b.weight"].any()


def test_layer_budget_ranks_each_lora_factor_apart():
    """A layer whose lora_A scores are 1000x its lora_B scores: ranked together, A would lose the whole
    budget and B nothing; per factor, each loses alpha of its own entries (the exact count rule)."""
    lora = "model.layers.0.self_attn.{}.lora_{}.default.weight"
    torch.manual_seed(0)
    scores = {}
    for module in ("q_proj", "v_proj"):
        scores[lora.format(module, "A")] = 1000 * (1 + torch.rand(8, 64))  # [r, in]
        scores[lora.format(module, "B")] = 1 + torch.rand(64, 8)  # [out, r]
    scores["model.layers.1.mlp.up_proj.weight"] = torch.rand(4, 4)  # not LoRA: ranked as before
    for alpha in (0.1, 0.25):
        masks = masks_for_alphas(scores, [alpha], "layer")[alpha]
        for factor in ("A", "B"):
            names = [lora.format(m, factor) for m in ("q_proj", "v_proj")]
            removed = sum(int(masks[n].sum()) for n in names)
            assert removed == removed_count(2 * 512, alpha)  # 1024 entries per factor and layer
        assert int(masks["model.layers.1.mlp.up_proj.weight"].sum()) == removed_count(16, alpha)
    # The two factors are ranked jointly across the layer's modules: a module whose A scores are all
    # higher takes that factor's budget first.
    scores[lora.format("q_proj", "A")] += 5000
    masks = masks_for_alphas(scores, [0.25], "layer")[0.25]
    assert int(masks[lora.format("q_proj", "A")].sum()) == 256 and not masks[lora.format("v_proj", "A")].any()


def test_layer_of_names_the_transformer_layer():
    assert layer_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == (
        "base_model.model.model.layers.3"
    )
    assert layer_of("transformer.h.11.attn.c_attn.weight") == "transformer.h.11"
    assert layer_of("lm_head.weight") == "lm_head.weight"


# --------------------------------------------------------------------------- the Wanda callback
@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return make_stages(tmp_path_factory.mktemp("selectivity_stages"))


def repair_masks(stages, root, **kw) -> dict[str, torch.Tensor]:
    base, adapter = stages
    module = CausalLMSFTModule(model_name_or_path=str(base), adapter_path=str(adapter))
    cb = WandaPruneCallback(alpha=0.25, output_dir=str(root / "out"), **kw)
    L.Trainer(max_epochs=0, callbacks=[cb], **quiet_trainer_kwargs(root)).fit(
        module, datamodule=tiny_finetune_data()
    )
    return load_tensors(root / "out" / "mask.safetensors")


def pure_scores(stages, loader, statistic="sample_mean", **calibration) -> dict[str, torch.Tensor]:
    base, adapter = stages
    model = CausalLMSFTModule(model_name_or_path=str(base), adapter_path=str(adapter)).model
    targets = find_targets(model, "lora")
    with collect(model, targets) as stats:
        run_calibration(model, loader, stats, **calibration)
    return wanda_scores(target_weights(targets), stats, statistic)


def assert_same(got, want):
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_callback_contrast_is_the_pure_contrast_on_per_token_statistics(stages, tmp_path):
    data = tiny_finetune_data()
    harm = pure_scores(stages, data.realignment_dataloader(), "token_mean")
    benign = pure_scores(stages, data.task_calibration_dataloader(), "token_mean")
    got = repair_masks(stages, tmp_path, contrast_lambda=2.0)
    assert_same(got, masks_for_alphas(contrastive_scores(harm, benign, 2.0), [0.25])[0.25])
    assert any(not torch.equal(got[n], m) for n, m in select_masks(harm, 0.25).items())
    # The per-sample statistics the contrast used before (sets of different lengths) pick another mask.
    old = contrastive_scores(
        pure_scores(stages, data.realignment_dataloader()),
        pure_scores(stages, data.task_calibration_dataloader()),
        2.0,
    )
    assert any(not torch.equal(got[n], m) for n, m in select_masks(old, 0.25).items())
    report = json.loads((tmp_path / "out" / "mask.json").read_text())
    assert report["statistic"] == "sample_mean" and report["contrast_statistic"] == "token_mean"


def _stats(x: torch.Tensor) -> ActivationStats:
    stats = ActivationStats({"w": x.shape[-1]})
    stats.update("w", x)
    return stats


def test_contrast_lambda_does_not_depend_on_the_benign_sets_length():
    """Every benign sample repeated twice in length: the per-token contrast keeps its mask, the
    per-sample one (the old behaviour) weighs the benign side sqrt(2) more and flips it.

    One weight row of ones; harm activations [2.0, 1.8, 0, 0] give Wanda scores [2.0, 1.8, 0, 0],
    benign ones [0.18, 0, 0, 0] give [0.18, 0, 0, 0]; with lambda 1 the contrast is [1.82, 1.8, ...]
    and alpha 0.25 removes entry 0. Doubled in length, the per-sample benign score is 0.18 * sqrt(2)
    = 0.255, the contrast [1.745, 1.8, ...] and entry 1 is removed instead.
    """
    weights = {"w": torch.ones(1, 4)}
    harm = _stats(torch.tensor([[[2.0, 1.8, 0.0, 0.0]]]))
    benign_sample = torch.tensor([[[0.18, 0.0, 0.0, 0.0]], [[0.18, 0.0, 0.0, 0.0]]])  # 2 samples, 1 token
    short, long = _stats(benign_sample), _stats(torch.cat([benign_sample, benign_sample], dim=1))

    def removed(benign, statistic):
        scores = contrastive_scores(
            wanda_scores(weights, harm, statistic), wanda_scores(weights, benign, statistic), 1.0
        )
        return select_masks(scores, 0.25)["w"][0].nonzero().flatten().tolist()

    per_token = contrast_statistic("sample_mean")
    assert per_token == "token_mean" and contrast_statistic("sample_token_mean") == "sample_token_mean"
    assert removed(short, per_token) == removed(long, per_token) == [0]
    assert removed(short, "sample_token_mean") == removed(long, "sample_token_mean") == [0]
    assert removed(short, "sample_mean") == [0] and removed(long, "sample_mean") == [1]


def test_callback_decisive_is_the_pure_decisive_statistic(stages, tmp_path):
    scores = pure_scores(
        stages, tiny_finetune_data().realignment_dataloader(), token_mask="decisive", decisive_tokens=2
    )
    got = repair_masks(stages, tmp_path, token_mask="decisive", decisive_tokens=2)
    assert_same(got, select_masks(scores, 0.25))


def test_callback_layer_scope(stages, tmp_path):
    scores = pure_scores(stages, tiny_finetune_data().realignment_dataloader())
    got = repair_masks(stages, tmp_path, scope="layer")
    assert_same(got, masks_for_alphas(scores, [0.25], "layer")[0.25])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"contrast_lambda": -0.5}, "contrast_lambda"),
        ({"contrast_lambda": float("inf")}, "contrast_lambda"),
        ({"decisive_tokens": -1}, "decisive_tokens"),
        ({"decisive_tokens": 1.5}, "decisive_tokens"),
    ],
)
def test_bad_selectivity_options_fail_at_construction(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        WandaPruneCallback(**kwargs)
