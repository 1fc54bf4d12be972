"""Safe Delta math (antidote_pl.repair.safe_delta): Hessian, factor, cost, selection, compensation."""

from __future__ import annotations

import math

import pytest
import torch

from antidote_pl.errors import ConfigError
from antidote_pl.repair.safe_delta import (
    REFERENCE_SIZE,
    HessianAccumulator,
    column_weights,
    compensate,
    group_limit,
    inverse_hessian_cholesky,
    safe_delta,
    safe_delta_layers,
    safety_cost,
    select_kept,
)

F64 = torch.float64

# Hand example: U is chosen, H = (Uᵀ U)⁻¹, so 1 / U_jj² = (1, 0.25, 4) and U[1, 2] = 1.
HAND_U = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 0.5]], dtype=F64)
HAND_H = torch.linalg.inv(HAND_U.T @ HAND_U)
HAND_DELTA = torch.tensor([[2.0, 2.0, 0.5], [-1.0, 4.0, -0.25]], dtype=F64)
# d² / U_jj²: row 0 = (4·1, 4·0.25, 0.25·4), row 1 = (1·1, 16·0.25, 0.0625·4).
HAND_COST = torch.tensor([[4.0, 1.0, 1.0], [1.0, 4.0, 0.25]], dtype=F64)


def _problem(rows: int, cols: int, tokens: int, seed: int, dtype=F64):
    """Seeded calibration inputs, their Hessian (official normalisation), an aligned weight and a delta."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g, dtype=dtype)
    acc = HessianAccumulator(cols, dtype=dtype)
    acc.add(x)
    weight = torch.randn(rows, cols, generator=g, dtype=dtype)
    delta = 0.1 * torch.randn(rows, cols, generator=g, dtype=dtype)
    return x, acc.finish(), weight, delta


def _damped(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    # Written out here independently of the module: H + percdamp · mean(diag H) · I.
    return hessian + percdamp * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)


# ------------------------------------------------------------------------------------------------
# Neutral budget


def test_neutral_budget_returns_the_delta_exactly():
    _, hessian, weight, delta = _problem(6, 10, 40, seed=0, dtype=torch.float32)
    new_delta, info = safe_delta(weight, delta, hessian, math.inf)
    assert torch.equal(new_delta, delta) and new_delta is not delta
    assert info["kept"] == info["entries"] == 60 and info["kept_fraction"] == 1.0


def test_budget_large_enough_without_protection_keeps_the_delta_exactly():
    # The general path (selection + compensation) must also give back the delta bit for bit.
    _, hessian, weight, delta = _problem(6, 10, 40, seed=1, dtype=torch.float32)
    new_delta, info = safe_delta(weight, delta, hessian, 1e30, protect_fraction=0.0, selection_block=4)
    assert torch.equal(new_delta, delta)
    assert info["kept"] == 60 and info["groups"] == 3


# ------------------------------------------------------------------------------------------------
# Hand-computed factor, cost, selection and result


def test_factor_cost_and_weights_of_the_hand_example():
    chol = inverse_hessian_cholesky(HAND_H, percdamp=0.0)
    torch.testing.assert_close(chol, HAND_U, rtol=0, atol=1e-12)
    torch.testing.assert_close(column_weights(chol), torch.tensor([1.0, 0.25, 4.0], dtype=F64))
    torch.testing.assert_close(safety_cost(HAND_DELTA, chol), HAND_COST, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("limit", "protect", "expected"),
    [
        # Order by column weight (col 1, col 0, col 2), row-major among ties:
        # (0,1) 1, (1,1) 4, (0,0) 4, (1,0) 1, (0,2) 1, (1,2) 0.25 -> cumulative 1, 5, 9, 10, 11, 11.25.
        # int(0.34 · 6) = 2: column 2 (the most sensitive) is never kept.
        (6.0, 0.34, [[False, True, False], [False, True, False]]),
        (9.0, 0.34, [[True, True, False], [False, True, False]]),
        (1e9, 0.34, [[True, True, False], [True, True, False]]),
        (0.5, 0.34, [[False, False, False], [False, False, False]]),
        # A prefix: (1,2) costs only 0.25 but comes after (0,2), which no longer fits.
        (10.5, 0.0, [[True, True, False], [True, True, False]]),
        (11.25, 0.0, [[True, True, True], [True, True, True]]),
        # int(0.15 · 6) = 0 protects nothing (the official's [0:-0] would keep nothing).
        (11.25, 0.15, [[True, True, True], [True, True, True]]),
    ],
)
def test_selection_of_the_hand_example(limit, protect, expected):
    kept = select_kept(HAND_COST, torch.tensor([1.0, 0.25, 4.0], dtype=F64), limit, protect)
    assert kept.tolist() == expected


def test_safe_delta_on_the_hand_example():
    # group_limit = s · rows · cols / 4096² · mean(1, 0.25, 4) = s · 2 · 3 · 1.75 / 4096²; pick s for 6.
    budget = 6.0 * REFERENCE_SIZE**2 / (2 * 3 * 1.75)
    assert group_limit(budget, torch.tensor([1.0, 0.25, 4.0]), 2, 3) == pytest.approx(6.0)
    new_delta, info = safe_delta(
        torch.zeros(2, 3, dtype=F64),
        HAND_DELTA,
        HAND_H,
        budget,
        percdamp=0.0,
        selection_block=None,
        protect_fraction=0.34,
    )
    # Column 0 (removed) comes first and stays 0; column 1 is kept and moves by delta, error
    # -delta_i1 / U_11 = -delta_i1 / 2, so column 2 gets +delta_i1 / 2 · U_12 = delta_i1 / 2.
    expected = torch.tensor([[0.0, 2.0, 1.0], [0.0, 4.0, 2.0]], dtype=F64)
    torch.testing.assert_close(new_delta, expected, rtol=0, atol=1e-12)
    assert info["kept"] == 2 and info["kept_cost"] == pytest.approx(5.0) and info["protected"] == 2


# ------------------------------------------------------------------------------------------------
# Compensation against independent references


def _obs_force_set(h_inv: torch.Tensor, delta_row: torch.Tensor, forced: list[int]) -> torch.Tensor:
    """Closed-form OBS: remove the entries S of w = -delta (aligned minus fine-tuned), all others free.

    w_new = w - H⁻¹[:, S] (H⁻¹[S, S])⁻¹ w[S]; the weight change w_new - w is the new delta.
    """
    w = -delta_row
    s = torch.tensor(forced)
    w_new = w - h_inv[:, s] @ torch.linalg.solve(h_inv[s][:, s], w[s])
    return w_new - w


def test_compensation_equals_closed_form_obs_when_kept_entries_come_first():
    """What is compared: per row, kept = the first k columns (k = 1, 3, 5). The column-by-column
    Cholesky compensation forces each kept column with only the later columns free; when every kept
    column precedes every free one, that is the joint OBS update with all non-kept entries free, the
    closed form above computed with torch.linalg on the damped Hessian."""
    _, hessian, _, delta = _problem(3, 7, 30, seed=2)
    kept = torch.zeros(3, 7, dtype=torch.bool)
    for row, k in enumerate((1, 3, 5)):
        kept[row, :k] = True
    new_delta = compensate(delta, kept, inverse_hessian_cholesky(hessian, 0.01), block_size=2)
    h_inv = torch.linalg.inv(_damped(hessian, 0.01))
    for row, k in enumerate((1, 3, 5)):
        reference = _obs_force_set(h_inv, delta[row], list(range(k)))
        torch.testing.assert_close(reference[:k], delta[row, :k], rtol=0, atol=1e-10)
        torch.testing.assert_close(new_delta[row], reference, rtol=0, atol=1e-10)
    assert torch.equal(new_delta[kept], delta[kept])


def _sequential_obs(hessian: torch.Tensor, delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Sequential OBS with explicit inverses (no Cholesky): for each kept column j in order, force it
    with columns > j free, using (H[j:, j:])⁻¹."""
    comp = torch.zeros_like(delta)
    for j in range(delta.shape[1]):
        tail_inv = torch.linalg.inv(hessian[j:, j:])
        step = (comp[:, j] - delta[:, j]) * kept[:, j]
        comp[:, j:] -= step.unsqueeze(1) * (tail_inv[:, 0] / tail_inv[0, 0]).unsqueeze(0)
    return torch.where(kept, delta, comp)


def test_compensation_equals_sequential_obs_for_any_mask():
    _, hessian, _, delta = _problem(4, 9, 40, seed=3)
    kept = torch.rand(4, 9, generator=torch.Generator().manual_seed(3)) < 0.5
    new_delta = compensate(delta, kept, inverse_hessian_cholesky(hessian, 0.01), block_size=4)
    torch.testing.assert_close(
        new_delta, _sequential_obs(_damped(hessian, 0.01), delta, kept), rtol=0, atol=1e-10
    )
    # With a free entry before a kept one the joint closed form differs (the free entry is frozen first).
    h_inv = torch.linalg.inv(_damped(hessian, 0.01))
    row = int(torch.nonzero((~kept[:, :-1] & kept[:, 1:]).any(dim=1))[0])
    joint = _obs_force_set(h_inv, delta[row], torch.nonzero(kept[row]).flatten().tolist())
    assert not torch.allclose(new_delta[row], joint, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Block-size invariance, scale invariance, output objective


@pytest.mark.parametrize("selection_block", [None, 6])
def test_result_does_not_depend_on_block_size(selection_block):
    _, hessian, weight, delta = _problem(5, 17, 60, seed=4)
    budget = 3e4
    runs = [
        safe_delta(weight, delta, hessian, budget, block_size=b, selection_block=selection_block)
        for b in (1, 2, 5, 16, 17, 64)
    ]
    base, info = runs[0]
    assert 0.2 < info["kept_fraction"] < 0.8  # a real mix of kept and compensated entries
    for new_delta, other in runs[1:]:
        assert other["kept"] == info["kept"]
        torch.testing.assert_close(new_delta, base, rtol=0, atol=1e-12)


def test_compensate_does_not_depend_on_block_size_float32():
    _, hessian, _, delta = _problem(6, 20, 50, seed=5, dtype=torch.float32)
    kept = torch.rand(6, 20, generator=torch.Generator().manual_seed(5)) < 0.4
    chol = inverse_hessian_cholesky(hessian)
    base = compensate(delta, kept, chol, block_size=1)
    for b in (3, 7, 20, 128):
        torch.testing.assert_close(compensate(delta, kept, chol, block_size=b), base, rtol=1e-5, atol=1e-6)


def test_hessian_scale_does_not_change_the_result():
    # Why the 2/N normalisation (sequences vs tokens) does not matter: everything is scale-invariant.
    _, hessian, weight, delta = _problem(4, 12, 50, seed=6)
    a, info_a = safe_delta(weight, delta, hessian, 3e4, selection_block=5)
    b, info_b = safe_delta(weight, delta, 7.3 * hessian, 3e4, selection_block=5)
    assert info_a["kept"] == info_b["kept"] and 0 < info_a["kept"] < 48
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_compensation_brings_outputs_closer_to_the_aligned_layer():
    # Objective: ||(W - W_aligned) X||² on the calibration inputs (0 = delta fully removed). Inputs
    # are correlated (rank 4 plus noise), as real activations are, so other entries can compensate.
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 4, generator=g) @ torch.randn(4, 12, generator=g) + 0.3 * torch.randn(
        64, 12, generator=g
    )
    acc = HessianAccumulator(12, dtype=torch.float32)
    acc.add(x)
    delta = 0.1 * torch.randn(8, 12, generator=g)
    new_delta, info = safe_delta(torch.zeros(8, 12), delta, acc.finish(), 1e4, selection_block=None)
    kept = new_delta == delta
    assert 0.2 < info["kept_fraction"] < 0.8
    compensated = float((new_delta @ x.T).pow(2).sum())
    masked_only = float(((delta * kept) @ x.T).pow(2).sum())
    assert compensated < 0.5 * masked_only


def test_later_groups_are_selected_on_the_compensated_residual():
    """Reference built from the public steps: group 2's cost is (delta - compensation from group 1)²
    / U_jj², as in the official (which measures fine-tuned minus current weight at each group start)."""
    _, hessian, weight, delta = _problem(6, 8, 30, seed=15)
    budget = 3e4
    chol = inverse_hessian_cholesky(hessian)
    weights = column_weights(chol)

    def select(residual, cols):
        limit = group_limit(budget, weights[cols], 6, 4)
        return select_kept(safety_cost(residual, chol[cols, cols]), weights[cols], limit)

    first, second = slice(0, 4), slice(4, 8)
    kept = torch.zeros(6, 8, dtype=torch.bool)
    kept[:, first] = select(delta[:, first], first)
    after_first = compensate(delta, kept, chol)  # group 2 not kept yet: it holds group 1's compensation
    kept[:, second] = select(delta[:, second] - after_first[:, second], second)
    assert not torch.equal(kept[:, second], select(delta[:, second], second))  # the residual matters here
    new_delta, info = safe_delta(weight, delta, hessian, budget, selection_block=4)
    assert info["kept"] == int(kept.sum()) and info["groups"] == 2
    torch.testing.assert_close(new_delta, compensate(delta, kept, chol), rtol=0, atol=1e-12)


def test_protected_fraction_is_never_kept():
    _, hessian, weight, delta = _problem(4, 10, 40, seed=8)
    new_delta, info = safe_delta(weight, delta, hessian, 1e30, selection_block=None)
    assert info["protected"] == int(0.15 * 40) == 6 and info["kept"] == 34
    # The 6 dropped entries sit in the most sensitive columns (largest 1 / U_jj²).
    weights = column_weights(inverse_hessian_cholesky(hessian))
    dropped_cols = torch.nonzero(new_delta != delta)[:, 1]
    assert weights[dropped_cols].min() >= weights.sort().values[-2]


# ------------------------------------------------------------------------------------------------
# Hessian accumulation


def test_accumulator_normalises_per_sequence_and_skips_masked_tokens():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    acc = HessianAccumulator(4)
    acc.add(x[:2], mask[:2])
    acc.add(x[2:], mask[2:])  # a fully masked sequence is not counted
    tokens = x[mask]
    assert acc.n_samples == 2 and acc.n_tokens == 8
    torch.testing.assert_close(acc.finish(), 2.0 / 2 * tokens.T @ tokens)


def test_accumulator_as_forward_hook_counts_2d_inputs_as_one_sequence():
    layer = torch.nn.Linear(4, 3)
    acc = HessianAccumulator(4, dtype=torch.float32)
    handle = layer.register_forward_hook(acc.forward_hook)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10))
    acc.set_token_mask(torch.tensor([True] * 5 + [False]))
    layer(x)
    handle.remove()
    assert acc.n_samples == 1 and acc.n_tokens == 5
    torch.testing.assert_close(acc.finish(), 2.0 * x[:5].T @ x[:5])


# ------------------------------------------------------------------------------------------------
# Several layers


def test_layers_helper_matches_per_layer_calls_and_names_bad_keys():
    _, h1, w1, d1 = _problem(3, 6, 20, seed=11)
    _, h2, w2, d2 = _problem(5, 4, 20, seed=12)
    new, infos = safe_delta_layers(
        {"a": w1, "b": w2}, {"a": d1, "b": d2}, {"a": h1, "b": h2}, 1e5, block_size=2
    )
    for name, (w, d, h) in {"a": (w1, d1, h1), "b": (w2, d2, h2)}.items():
        expected, info = safe_delta(w, d, h, 1e5, block_size=2)
        assert torch.equal(new[name], expected) and infos[name] == info
    with pytest.raises(ConfigError, match=r"safe_delta_layers\.hessians=\['b'\]"):
        safe_delta_layers({"a": w1, "b": w2}, {"a": d1, "b": d2}, {"a": h1}, 1e5)
    with pytest.raises(ConfigError, match=r"safe_delta\[b\]\.hessian\.shape=\(6, 6\)"):
        safe_delta_layers({"a": w1, "b": w2}, {"a": d1, "b": d2}, {"a": h1, "b": h1}, 1e5)


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"budget": -1.0}, r"safe_delta\.budget=-1\.0 is invalid: expected a number >= 0, or math\.inf"),
        ({"budget": math.nan}, r"safe_delta\.budget=nan is invalid"),
        ({"budget": True}, r"safe_delta\.budget=True is invalid"),
        ({"budget": "0.1"}, r"safe_delta\.budget='0\.1' is invalid"),
        ({"percdamp": -0.01}, r"safe_delta\.percdamp=-0\.01 is invalid: expected a number >= 0"),
        ({"percdamp": math.inf}, r"safe_delta\.percdamp=inf is invalid"),
        ({"block_size": 0}, r"safe_delta\.block_size=0 is invalid: expected an int >= 1"),
        ({"selection_block": 0}, r"safe_delta\.selection_block=0 is invalid: expected an int >= 1"),
        (
            {"protect_fraction": 1.5},
            r"safe_delta\.protect_fraction=1\.5 is invalid: expected a number >= 0\.0 and <= 1",
        ),
        (
            {"hessian": torch.eye(5, dtype=F64)},
            r"safe_delta\.hessian\.shape=\(5, 5\) is invalid: expected \(4, 4\)",
        ),
        ({"hessian": torch.ones(4, 3, dtype=F64)}, r"safe_delta\.hessian\.shape=\(4, 3\)"),
        (
            {"weight_aligned": torch.zeros(4, 3)},
            r"safe_delta\.weight_aligned\.shape=\(4, 3\) is invalid: expected \(3, 4\)",
        ),
        ({"delta": torch.zeros(12)}, r"safe_delta\.delta\.shape=\(12,\) is invalid: expected a 2-D float"),
        (
            {"hessian": torch.triu(torch.ones(4, 4, dtype=F64))},
            r"safe_delta\.hessian=.* expected a symmetric",
        ),
        ({"hessian": torch.full((4, 4), math.nan, dtype=F64)}, r"safe_delta\.hessian=.* expected a finite"),
    ],
)
def test_bad_arguments_raise_config_errors_naming_field_value_and_allowed(change, pattern):
    args = {
        "weight_aligned": torch.zeros(3, 4),
        "delta": torch.ones(3, 4),
        "hessian": torch.eye(4, dtype=F64),
    }
    args.update({"budget": 0.1}, **change)
    with pytest.raises(ConfigError, match=pattern):
        safe_delta(
            args.pop("weight_aligned"), args.pop("delta"), args.pop("hessian"), args.pop("budget"), **args
        )


def test_hessian_not_positive_definite_after_damping_is_a_config_error():
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    with pytest.raises(
        ConfigError, match=r"safe_delta\.percdamp=0\.01 is invalid: expected .*positive definite"
    ):
        safe_delta(torch.zeros(1, 2), torch.ones(1, 2), indefinite, 0.1)
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    with pytest.raises(ConfigError, match=r"percdamp=0\.0 is invalid"):
        inverse_hessian_cholesky(singular, percdamp=0.0)
    # A feature never seen (zero row and column) is not an error: its diagonal becomes 1.
    dead = torch.diag(torch.tensor([2.0, 0.0], dtype=F64))
    torch.testing.assert_close(
        inverse_hessian_cholesky(dead, 0.0), torch.diag(torch.tensor([0.5**0.5, 1.0], dtype=F64))
    )


def test_accumulator_and_compensate_reject_bad_shapes():
    acc = HessianAccumulator(4)
    with pytest.raises(ConfigError, match=r"HessianAccumulator\.n_samples=0 is invalid"):
        acc.finish()
    with pytest.raises(ConfigError, match=r"HessianAccumulator\.inputs\.shape=\(2, 5\) is invalid"):
        acc.add(torch.zeros(2, 5))
    with pytest.raises(ConfigError, match=r"HessianAccumulator\.token_mask\.shape=\(2, 3\) is invalid"):
        acc.add(torch.zeros(2, 4, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"HessianAccumulator\.dtype"):
        HessianAccumulator(4, dtype=torch.float16)
    chol = torch.eye(4, dtype=F64)
    with pytest.raises(ConfigError, match=r"compensate\.kept\.shape=\(3, 3\)"):
        compensate(torch.zeros(3, 4), torch.ones(3, 3, dtype=torch.bool), chol)
    with pytest.raises(ConfigError, match=r"compensate\.block_size=0"):
        compensate(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool), chol, block_size=0)
    with pytest.raises(ConfigError, match=r"safe_delta\.column_weight\.shape=\(2,\)"):
        select_kept(torch.zeros(3, 4), torch.ones(2), 1.0)
