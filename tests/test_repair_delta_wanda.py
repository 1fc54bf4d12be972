"""Wanda in delta space: ``S = |dW| · sqrt(stat)`` on ``dW = scale·B@A``, top α per row zeroed."""

from __future__ import annotations

import math

import pytest
import torch

from antidote_pl.errors import ConfigError
from antidote_pl.repair import (
    apply_delta_masks,
    delta_wanda_masks,
    delta_wanda_repair,
    delta_wanda_scores,
    lora_deltas,
)
from antidote_pl.repair import delta_wanda as delta_wanda_module

SHAPES = {"layers.0.q_proj": (5, 2, 23), "layers.0.v_proj": (3, 2, 23), "layers.1.up_proj": (7, 4, 23)}


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lora_a = {n: torch.randn(r, i, generator=g) for n, (_, r, i) in SHAPES.items()}
    lora_b = {n: torch.randn(o, r, generator=g) for n, (o, r, _) in SHAPES.items()}
    stats = {n: torch.rand(i, generator=g) + 0.1 for n, (_, _, i) in SHAPES.items()}
    return lora_a, lora_b, stats


def test_hand_computed_example():
    dw = {"t": torch.tensor([[1.0, -4.0, 2.0], [3.0, 1.0, -1.0]])}
    stats = {"t": torch.tensor([4.0, 1.0, 9.0])}  # sqrt: 2, 1, 3
    assert torch.equal(delta_wanda_scores(dw, stats)["t"], torch.tensor([[2.0, 4.0, 6.0], [6.0, 1.0, 3.0]]))
    # α = 0.3 keeps floor(3·0.7) = 2 per row: the 6s go (|dW| alone would have removed the -4).
    one = delta_wanda_repair(dw, stats, 0.3)["t"]
    assert torch.equal(one, torch.tensor([[1.0, -4.0, 0.0], [0.0, 1.0, -1.0]]))
    assert not torch.signbit(one[0, 2]) and not torch.signbit(one[1, 0])  # +0.0, not -0.0
    two = delta_wanda_repair(dw, stats, 0.5)["t"]  # keeps floor(1.5) = 1 per row
    assert torch.equal(two, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def test_lora_deltas_hand_computed_and_per_target_scale():
    lora_a, lora_b = {"t": torch.tensor([[1.0, 2.0]])}, {"t": torch.tensor([[1.0], [3.0]])}
    assert torch.equal(lora_deltas(lora_a, lora_b, 2.0)["t"], torch.tensor([[2.0, 4.0], [6.0, 12.0]]))
    assert torch.equal(lora_deltas(lora_a, lora_b, {"t": 0.5})["t"], torch.tensor([[0.5, 1.0], [1.5, 3.0]]))


def test_alpha_zero_returns_the_deltas_exactly():
    lora_a, lora_b, stats = _setup()
    deltas = lora_deltas(lora_a, lora_b, 2.0)
    out = delta_wanda_repair(deltas, stats, 0.0)
    assert all(out[n] is deltas[n] and torch.equal(out[n], deltas[n]) for n in deltas)
    masks = delta_wanda_masks(deltas, stats, [0])[0.0]
    assert not any(m.any() for m in masks.values())


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5])
def test_matches_an_independent_reference(alpha):
    lora_a, lora_b, stats = _setup(seed=3)
    scale = 16 / 4
    deltas = lora_deltas(lora_a, lora_b, scale)
    out = delta_wanda_repair(deltas, stats, alpha)
    for name in SHAPES:
        dw = scale * torch.einsum("or,ri->oi", lora_b[name].double(), lora_a[name].double())
        assert torch.allclose(deltas[name].double(), dw, atol=1e-5)
        score = dw.abs() * stats[name].double().sqrt()[None, :]
        n = dw.shape[1]
        removed = n - math.floor(n * (1 - alpha))  # 23 columns: no rounding edge for these α
        expected = dw.clone()
        for row in range(dw.shape[0]):
            expected[row, torch.argsort(score[row], descending=True)[:removed]] = 0.0
        assert torch.allclose(out[name].double(), expected, atol=1e-5)
        assert int((out[name] == 0).sum()) == removed * dw.shape[0]


def test_many_alphas_from_one_scoring_match_single_calls_and_nest():
    lora_a, lora_b, stats = _setup(seed=4)
    deltas = lora_deltas(lora_a, lora_b, 1.0)
    alphas = [0.0, 0.1, 0.25, 0.5]
    by_alpha = delta_wanda_masks(deltas, stats, alphas)
    assert list(by_alpha) == alphas
    for a in alphas[1:]:
        single = delta_wanda_repair(deltas, stats, a)
        applied = apply_delta_masks(deltas, by_alpha[a])
        assert all(torch.equal(single[n], applied[n]) for n in deltas)
    for small, large in zip(alphas, alphas[1:]):
        assert all(not (by_alpha[small][n] & ~by_alpha[large][n]).any() for n in deltas)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, float("nan"), True, "0.1"])
def test_bad_alpha_is_refused_before_scoring(alpha, monkeypatch):
    lora_a, lora_b, stats = _setup()
    deltas = lora_deltas(lora_a, lora_b, 1.0)

    def must_not_score(*args, **kwargs):
        raise AssertionError("scored before validating the knobs")

    monkeypatch.setattr(delta_wanda_module, "wanda_scores", must_not_score)
    with pytest.raises(ConfigError, match=r"alpha=.* is invalid: expected a number >= 0\.0 and < 1\.0"):
        delta_wanda_repair(deltas, stats, alpha)
    with pytest.raises(ConfigError, match=r"alpha="):
        delta_wanda_masks(deltas, stats, [0.1, alpha])


def test_other_bad_knobs_are_refused():
    lora_a, lora_b, stats = _setup()
    deltas = lora_deltas(lora_a, lora_b, 1.0)
    with pytest.raises(ConfigError, match=r"scope='column' is invalid"):
        delta_wanda_repair(deltas, stats, 0.1, scope="column")
    with pytest.raises(ConfigError, match=r"statistic='max' is invalid"):
        delta_wanda_repair(deltas, stats, 0.1, statistic="max")
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"scale=.* is invalid: expected a number > 0\.0"):
            lora_deltas(lora_a, lora_b, scale)
    with pytest.raises(ConfigError, match=r"scale\[layers\.0\.v_proj\]=None is invalid"):
        lora_deltas(lora_a, lora_b, {"layers.0.q_proj": 1.0})


def test_mismatches_name_the_target():
    lora_a, lora_b, stats = _setup()
    deltas = lora_deltas(lora_a, lora_b, 1.0)
    bad_stats = {**stats, "layers.0.v_proj": torch.ones(22)}
    with pytest.raises(ConfigError, match=r"target layers\.0\.v_proj: delta shape \(3, 23\)"):
        delta_wanda_repair(deltas, bad_stats, 0.0)  # checked even at the neutral α
    del bad_stats["layers.0.v_proj"]
    with pytest.raises(ConfigError, match=r"target layers\.0\.v_proj: .* got None"):
        delta_wanda_masks(deltas, bad_stats, [0.1])
    masks = delta_wanda_masks(deltas, stats, [0.1])[0.1]
    with pytest.raises(ConfigError, match=r"masks\[layers\.1\.up_proj\]: shape"):
        apply_delta_masks(deltas, {**masks, "layers.1.up_proj": torch.zeros(7, 22, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=r"masks\[layers\.0\.q_proj\]: dtype torch\.float32"):
        apply_delta_masks(deltas, {**masks, "layers.0.q_proj": torch.zeros(5, 23)})
    with pytest.raises(ConfigError, match=r"target layers\.1\.up_proj: lora_a shape"):
        lora_deltas(lora_a, {**lora_b, "layers.1.up_proj": torch.zeros(7, 3)}, 1.0)
