"""Target discovery on tiny random models of five architectures (no hub access needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_DECODER
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from antidote_pl.errors import ConfigError
from antidote_pl.pruning import (
    apply_target_masks_,
    collect,
    default_lora_target_modules,
    find_targets,
    lora_delta_weight,
    run_calibration,
    select_masks,
    target_weights,
    to_param_layout,
    wanda_scores,
)

_DECODER = SMALL_DECODER
ARCHS = {
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)), ["q_proj", "k_proj", "v_proj"]),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**_DECODER)), ["q_proj", "k_proj", "v_proj"]),
    "gemma": (lambda: GemmaForCausalLM(GemmaConfig(**_DECODER, head_dim=8)), ["q_proj", "k_proj", "v_proj"]),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)), ["q_proj", "k_proj", "v_proj"]),
    "gpt2": (
        lambda: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
            )
        ),
        ["c_attn"],
    ),
}


def _build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch][0]().eval()


def _lora(model: nn.Module) -> nn.Module:
    config = LoraConfig(
        target_modules=default_lora_target_modules(model),
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        fan_in_fan_out=isinstance(model, GPT2LMHeadModel),  # GPT-2's Conv1D stores [in, out]
    )
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    return peft_model.eval()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_lora_target_modules(arch):
    assert default_lora_target_modules(_build(arch)) == ARCHS[arch][1]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_targets_are_a_and_b_of_every_lora_layer_and_their_hooks_fire(arch):
    model = _lora(_build(arch))
    targets = find_targets(model, "lora")
    params = dict(model.named_parameters())
    n_layers = 2 * len(ARCHS[arch][1])
    assert len(targets) == 2 * n_layers
    assert [t.kind for t in targets.values()] == ["lora_A", "lora_B"] * n_layers
    for name, info in targets.items():
        assert params[name] is info.param
        assert info.param.shape == (info.out_features, info.in_features)
        assert info.hook_module.weight is info.param
    a_info, b_info = list(targets.values())[:2]
    assert b_info.in_features == a_info.out_features == 4  # lora_B's input is lora_A's rank-r output

    batch = _batch()
    with collect(model, targets) as stats:
        run_calibration(model, [batch], stats)
    assert set(stats.n_tokens.values()) == {int(batch["attention_mask"].sum())}
    assert all(bool((stats.sum_sq[n] > 0).all()) for n in targets)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_delta_targets_key_the_base_weight_and_give_scale_b_a(arch):
    model = _lora(_build(arch))
    targets = find_targets(model, "lora_delta")
    params = dict(model.named_parameters())
    assert len(targets) == 2 * len(ARCHS[arch][1])
    for name, info in targets.items():
        assert name.endswith("base_layer.weight") and params[name] is info.param
        layer, adapter = info.lora_layer, info.adapter_name
        expected = layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
        torch.testing.assert_close(info.weight(), expected)
        assert info.weight().shape == (info.out_features, info.in_features)
        assert info.to_param_layout(info.weight()).shape == info.param.shape
        assert info.transposed == (arch == "gpt2")
    # Statistic of a delta target is the LoraLayer input (= lora_A input): same values as for lora_A.
    factor_targets = find_targets(model, "lora")
    with collect(model, targets) as delta_stats:
        run_calibration(model, [_batch()], delta_stats)
    with collect(model, factor_targets) as factor_stats:
        run_calibration(model, [_batch()], factor_stats)
    for name in targets:
        a_name = name.replace("base_layer.weight", "lora_A.default.weight")
        torch.testing.assert_close(delta_stats.sum_sq[name], factor_stats.sum_sq[a_name])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_delta_with_empty_mask_merges_the_adapter_exactly(arch):
    model = _lora(_build(arch))
    targets = find_targets(model, "lora_delta")
    batch = _batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
        masks = {n: torch.zeros_like(t.param, dtype=torch.bool) for n, t in targets.items()}
        apply_target_masks_(targets, masks)
        after = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert all(bool((t.lora_layer.lora_B["default"].weight == 0).all()) for t in targets.values())


def test_linear_targets_filter_by_include_and_skip_lm_head():
    model = _build("llama")
    all_linear = find_targets(model, "linear")
    assert len(all_linear) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any("lm_head" in n for n in all_linear)
    assert all(
        t.param.shape == (t.out_features, t.in_features) and not t.transposed for t in all_linear.values()
    )
    qkv = find_targets(model, "linear", include=["q_proj", "k_proj", "v_proj"])
    assert sorted(qkv) == sorted(
        f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
    )


def test_linear_targets_on_peft_model_skip_lora_factors():
    names = list(find_targets(_lora(_build("llama")), "linear"))
    assert names and not any("lora_" in n for n in names)


def test_gpt2_conv1d_is_handled_in_row_layout():
    model = _build("gpt2")
    targets = find_targets(model, "linear", include=["c_attn"])
    info = next(iter(targets.values()))
    assert isinstance(info.hook_module, Conv1D) and info.transposed
    assert info.param.shape == (32, 96)  # Conv1D stores [in, out]
    assert (info.out_features, info.in_features) == (96, 32)
    assert torch.equal(info.weight(), info.param.t())

    with collect(model, targets) as stats:
        run_calibration(model, [_batch()], stats)
    scores = wanda_scores(target_weights(targets), stats)
    masks = to_param_layout(select_masks(scores, 0.25), targets)
    assert all(m.shape == targets[n].param.shape for n, m in masks.items())
    # Per-row selection runs over output features: each *column* of the stored [in, out] weight.
    assert set(masks[info.name].sum(dim=0).tolist()) == {8}
    apply_target_masks_(targets, masks)
    assert bool((info.param[masks[info.name]] == 0).all())


def test_lora_delta_weight_formula():
    a, b = torch.randn(3, 5), torch.randn(4, 3)
    torch.testing.assert_close(lora_delta_weight(a, b, 2.0), 2.0 * b @ a)


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match="target='conv'"):
        find_targets(_build("llama"), "conv")


def test_lora_target_on_plain_model_says_what_was_found():
    with pytest.raises(ConfigError, match="found 0 LoraLayer"):
        find_targets(_build("llama"), "lora")


def test_wrong_adapter_name_lists_available_adapters():
    with pytest.raises(ConfigError, match=r"\['default'\]"):
        find_targets(_lora(_build("llama")), "lora", adapter_name="second")


def test_include_without_match_names_include_and_candidates():
    with pytest.raises(ConfigError, match=r"include=\['nope'\].*q_proj"):
        find_targets(_build("llama"), "linear", include=["nope"])


def test_no_attention_projections_is_a_config_error():
    with pytest.raises(ConfigError, match="lora.target_modules"):
        default_lora_target_modules(nn.Sequential(nn.Linear(4, 4)))


def test_collect_rejects_targets_of_another_model_and_removes_hooks():
    model, other = _build("llama"), _build("llama")
    targets = find_targets(model, "linear", include=["q_proj"])
    with pytest.raises(ConfigError, match="same model instance"), collect(other, targets):
        pass
    with collect(model, targets) as stats:
        run_calibration(model, [_batch()], stats)
    counted = dict(stats.n_tokens)
    run_calibration(model, [_batch()], stats)  # hooks are gone: nothing more is counted
    assert stats.n_tokens == counted
