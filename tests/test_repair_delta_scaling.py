"""Delta scaling (pre/post-tuning merge, arXiv 2412.19512): ``B ← λ·B`` per LoRA target."""

from __future__ import annotations

import pytest
import torch

from antidote_pl.errors import ConfigError
from antidote_pl.pruning.targets import lora_delta_weight
from antidote_pl.repair import scale_lora, scale_lora_b


def _factors(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.q_proj": (6, 2, 5), "layers.0.v_proj": (4, 2, 5), "layers.1.q_proj": (6, 3, 7)}
    lora_a = {n: torch.randn(r, i, generator=g).to(dtype) for n, (_, r, i) in shapes.items()}
    lora_b = {n: torch.randn(o, r, generator=g).to(dtype) for n, (o, r, _) in shapes.items()}
    return lora_a, lora_b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lambda_one_returns_the_inputs_exactly(dtype):
    lora_a, lora_b = _factors(dtype=dtype)
    new_a, new_b = scale_lora(lora_a, lora_b, 1.0)
    for name in lora_b:
        assert new_a[name] is lora_a[name] and new_b[name] is lora_b[name]
        assert torch.equal(new_b[name], lora_b[name])
    assert all(scale_lora_b(lora_b, 1)[n] is lora_b[n] for n in lora_b)  # an int 1 too


def test_hand_computed_example():
    lora_a = {"t": torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])}
    lora_b = {"t": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    new_a, new_b = scale_lora(lora_a, lora_b, 0.5)
    assert torch.equal(new_b["t"], torch.tensor([[0.5, 1.0], [1.5, 2.0]]))
    assert new_a["t"] is lora_a["t"]
    # scale 2: dW = 2·B@A = 2·[[5, 2, -1], [11, 4, -3]]; the merge at λ = 0.5 halves it.
    assert torch.equal(
        lora_delta_weight(new_a["t"], new_b["t"], 2.0), torch.tensor([[5.0, 2, -1], [11, 4, -3]])
    )
    assert torch.equal(scale_lora_b(lora_b, 0.0)["t"], torch.zeros(2, 2))


def test_scaled_adapter_is_the_linear_merge_of_pre_and_post_models():
    lora_a, lora_b = _factors(seed=1)
    g = torch.Generator().manual_seed(2)
    lam, scale = 0.3, 16 / 2
    new_a, new_b = scale_lora(lora_a, lora_b, lam)
    for name in lora_b:
        base = torch.randn(lora_b[name].shape[0], lora_a[name].shape[1], generator=g)
        tuned = base + lora_delta_weight(lora_a[name], lora_b[name], scale)
        merged = (1 - lam) * base + lam * tuned  # the paper's interpolation, written independently
        assert torch.allclose(base + lora_delta_weight(new_a[name], new_b[name], scale), merged, atol=1e-5)


def test_dtype_is_kept():
    _, lora_b = _factors(dtype=torch.bfloat16)
    out = scale_lora_b(lora_b, 0.25)
    for name, b in lora_b.items():
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], (b.float() * 0.25).to(torch.bfloat16))  # exact: power of two


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), True, "0.5", None])
def test_bad_lambda_is_refused_naming_field_value_and_range(lam):
    lora_a, lora_b = _factors()
    lora_b["layers.0.q_proj"] = torch.zeros(6, 9)  # a shape error too: the knob is reported first
    with pytest.raises(ConfigError, match=r"lam=.* is invalid: expected a number >= 0\.0"):
        scale_lora(lora_a, lora_b, lam)
    with pytest.raises(ConfigError, match=r"lam="):
        scale_lora_b(lora_b, lam)


def test_mismatched_factors_name_the_target():
    lora_a, lora_b = _factors()
    lora_b["layers.0.v_proj"] = torch.zeros(4, 3)  # rank 3 against A's rank 2
    with pytest.raises(ConfigError, match=r"layers\.0\.v_proj"):
        scale_lora(lora_a, lora_b, 0.5)
    lora_a, lora_b = _factors()
    del lora_a["layers.1.q_proj"]
    with pytest.raises(ConfigError, match=r"lora_a\[layers\.1\.q_proj\]: missing"):
        scale_lora(lora_a, lora_b, 0.5)
    with pytest.raises(ConfigError, match=r"lora_b=\{\} is invalid"):
        scale_lora_b({}, 0.5)
