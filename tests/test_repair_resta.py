"""RESTA (arXiv 2402.11746): safety-vector re-addition ``W + β·V`` and harm negation ``W − γ·H``."""

from __future__ import annotations

import pytest
import torch

from antidote_pl.errors import ConfigError
from antidote_pl.repair import add_safety_vector, alignment_delta, harm_delta, subtract_harm_vector

SHAPES = {"layers.0.q_proj": (4, 6), "layers.0.v_proj": (2, 6), "layers.1.q_proj": (4, 6)}


def _weights(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in SHAPES.items()}


def test_hand_computed_example():
    w = {"t": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    aligned = {"t": torch.tensor([[2.0, 2.0], [3.0, 5.0]])}
    pre = {"t": torch.tensor([[1.0, 1.0], [3.0, 3.0]])}
    v = alignment_delta(aligned, pre)
    assert torch.equal(v["t"], torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    assert torch.equal(add_safety_vector(w, v, 0.5)["t"], torch.tensor([[1.5, 2.5], [3.0, 5.0]]))
    harmful = {"t": torch.tensor([[3.0, 2.0], [3.0, 6.0]])}
    h = harm_delta(harmful, aligned)
    assert torch.equal(h["t"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert torch.equal(subtract_harm_vector(w, h, 2.0)["t"], torch.tensor([[-1.0, 2.0], [3.0, 2.0]]))


def test_neutral_strength_returns_the_inputs_exactly():
    w, v = _weights(0, torch.bfloat16), _weights(1)
    for out in (add_safety_vector(w, v, 0.0), subtract_harm_vector(w, v, 0)):
        assert all(out[n] is w[n] and torch.equal(out[n], w[n]) for n in w)


def test_against_an_independent_reference_and_dtypes():
    aligned, pre, w = _weights(0, torch.bfloat16), _weights(1, torch.bfloat16), _weights(2, torch.float16)
    v = alignment_delta(aligned, pre)
    out = add_safety_vector(w, v, 0.7)
    minus = subtract_harm_vector(w, v, 0.7)
    for name in SHAPES:
        assert v[name].dtype == torch.float32  # the exact difference, not rounded back to bf16
        assert torch.equal(v[name], aligned[name].double().sub(pre[name].double()).float())
        reference = w[name].double() + 0.7 * (aligned[name].double() - pre[name].double())
        assert out[name].dtype == torch.float16
        assert torch.allclose(out[name].double(), reference, atol=1e-2)
        assert torch.allclose(minus[name].double(), 2 * w[name].double() - reference, atol=1e-2)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), False, "1"])
def test_bad_strengths_are_refused_before_shape_checks(value):
    w, v = _weights(0), _weights(1)
    v["layers.0.v_proj"] = torch.zeros(3, 3)  # also wrong: the knob is reported first
    with pytest.raises(ConfigError, match=r"beta=.* is invalid: expected a number >= 0\.0"):
        add_safety_vector(w, v, value)
    with pytest.raises(ConfigError, match=r"gamma=.* is invalid: expected a number >= 0\.0"):
        subtract_harm_vector(w, v, value)


def test_mismatched_mappings_name_the_target():
    aligned, pre = _weights(0), _weights(1)
    pre["layers.0.v_proj"] = torch.zeros(2, 5)
    with pytest.raises(ConfigError, match=r"pre\[layers\.0\.v_proj\]: shape \(2, 5\) does not match"):
        alignment_delta(aligned, pre)
    pre = _weights(1)
    del pre["layers.1.q_proj"]
    with pytest.raises(ConfigError, match=r"pre\[layers\.1\.q_proj\]: missing"):
        alignment_delta(aligned, pre)
    extra = {**_weights(1), "lm_head": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"vectors\[lm_head\]: not a target"):
        add_safety_vector(aligned, extra, 0.5)
    with pytest.raises(ConfigError, match=r"harm_vectors\[layers\.0\.q_proj\]: shape"):
        subtract_harm_vector(aligned, {**_weights(1), "layers.0.q_proj": torch.zeros(6, 4)}, 0.5)
