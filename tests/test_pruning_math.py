"""Pure tensor tests of the pruning math: statistics, scores, selection, application and I/O."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import small_llama
from peft import LoraConfig, get_peft_model

from antidote_pl.errors import ConfigError
from antidote_pl.pruning import (
    ActivationStats,
    apply_masks_,
    batch_token_mask,
    check_mask_shapes,
    collect,
    find_targets,
    keep_count,
    load_tensors,
    magnitude_scores,
    masked_delta_merge_,
    masks_for_alphas,
    overall_fraction,
    random_masks,
    random_scores,
    realised_fractions,
    removed_count,
    run_calibration,
    save_tensors,
    select_masks,
    wanda_scores,
)

# Reference §B.4: entries removed per row.
B4_TABLE = {
    4096: {0.01: 41, 0.02: 82, 0.05: 205, 0.1: 410, 0.2: 820, 0.25: 1024, 1e-5: 1},
    256: {0.01: 3, 0.02: 6, 0.05: 13, 0.1: 26, 0.2: 52, 0.25: 64},
}


def _scores(seed: int = 0, shapes=((6, 40), (3, 17))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}.weight": torch.rand(shape, generator=g) for i, shape in enumerate(shapes)}


# ---------------------------------------------------------------- counts and selection --------------


@pytest.mark.parametrize("cols", sorted(B4_TABLE))
def test_b4_table_counts_and_official_float_rule_agree(cols):
    for alpha, removed in B4_TABLE[cols].items():
        assert removed_count(cols, alpha) == removed
        assert keep_count(cols, alpha) == int(cols * (1 - alpha))  # the official expression


@pytest.mark.parametrize("cols", sorted(B4_TABLE))
def test_row_masks_remove_b4_counts_in_every_row(cols):
    scores = {"w": torch.rand(3, cols, generator=torch.Generator().manual_seed(cols))}
    by_alpha = masks_for_alphas(scores, list(B4_TABLE[cols]), scope="row")
    for alpha, removed in B4_TABLE[cols].items():
        assert by_alpha[alpha]["w"].sum(dim=1).tolist() == [removed] * 3


def test_count_uses_the_exact_decimal_alpha():
    assert 10 * (1 - 0.9) < 1  # the float product misses the integer...
    assert keep_count(10, 0.9) == 1 and removed_count(10, 0.9) == 9  # ...the exact rule does not


def test_row_scope_removes_the_highest_scores_of_each_row():
    scores = _scores()
    masks = select_masks(scores, 0.3, scope="row")
    for name, s in scores.items():
        m = masks[name]
        assert m.dtype == torch.bool and m.shape == s.shape
        assert m.sum(dim=1).tolist() == [removed_count(s.shape[1], 0.3)] * s.shape[0]
        removed_min = s.masked_fill(~m, float("inf")).min(dim=1).values
        kept_max = s.masked_fill(m, float("-inf")).max(dim=1).values
        assert bool((removed_min > kept_max).all())


def test_ties_are_broken_stably_later_positions_removed_first():
    masks = select_masks({"w": torch.ones(2, 10)}, 0.3)
    assert masks["w"].tolist() == [[False] * 7 + [True] * 3] * 2


def test_matrix_scope_removes_a_fraction_of_each_tensor():
    scores = _scores()
    masks = select_masks(scores, 0.2, scope="matrix")
    for name, s in scores.items():
        assert int(masks[name].sum()) == removed_count(s.numel(), 0.2)
        assert float(s[masks[name]].min()) > float(s[~masks[name]].max())


def test_global_scope_ranks_all_tensors_together():
    scores = _scores()
    scores["t1.weight"] = scores["t1.weight"] * 10  # this tensor should take most removals
    masks = select_masks(scores, 0.2, scope="global")
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == removed_count(total, 0.2)
    removed = torch.cat([s[masks[n]] for n, s in scores.items()])
    kept = torch.cat([s[~masks[n]] for n, s in scores.items()])
    assert float(removed.min()) > float(kept.max())
    assert int(masks["t1.weight"].sum()) > int(masks["t0.weight"].sum())
    # Masks of one global group must not share storage (safetensors, in-place edits).
    assert masks["t0.weight"].untyped_storage().data_ptr() != masks["t1.weight"].untyped_storage().data_ptr()


def test_masks_for_alphas_matches_single_selection_and_is_nested():
    scores = _scores()
    alphas = [0.05, 0.1, 0.3]
    for scope in ("row", "matrix", "global"):
        by_alpha = masks_for_alphas(scores, alphas, scope=scope)
        for alpha in alphas:
            single = select_masks(scores, alpha, scope=scope)
            assert all(torch.equal(single[n], by_alpha[alpha][n]) for n in scores)
        for n in scores:  # a larger alpha removes a superset
            assert bool((by_alpha[0.1][n] <= by_alpha[0.3][n]).all())


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, True, "0.1", float("nan")])
def test_alpha_outside_open_unit_interval_is_rejected(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        select_masks(_scores(), alpha)


def test_unknown_scope_and_nan_scores_are_rejected():
    with pytest.raises(ConfigError, match="scope='column'"):
        select_masks(_scores(), 0.1, scope="column")
    bad = _scores()
    bad["t0.weight"][0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"t0.weight.*NaN"):
        select_masks(bad, 0.1)
    with pytest.raises(ConfigError, match="row scope"):
        select_masks({"v": torch.rand(5)}, 0.1)


@pytest.mark.parametrize("scope", ["row", "matrix", "global"])
def test_protected_weights_are_never_removed(scope):
    scores, utility = _scores(0), _scores(1)
    protected = select_masks(utility, 0.25, scope=scope)
    plain = select_masks(scores, 0.2, scope=scope)
    assert any(bool((plain[n] & protected[n]).any()) for n in scores)  # protection has work to do
    replace = select_masks(scores, 0.2, scope, protect_scores=utility, protect_fraction=0.25)
    subtract = select_masks(scores, 0.2, scope, utility, 0.25, protect_mode="subtract")
    for n in scores:
        assert not bool((replace[n] & protected[n]).any())
        assert torch.equal(subtract[n], plain[n] & ~protected[n])
    if scope == "row":  # replacement keeps the per-row budget when enough candidates remain
        for n, m in replace.items():
            assert m.sum(dim=1).tolist() == plain[n].sum(dim=1).tolist()
    assert sum(int(m.sum()) for m in replace.values()) == sum(int(m.sum()) for m in plain.values())


def test_protection_arguments_are_validated():
    with pytest.raises(ConfigError, match="protect_scores"):
        select_masks(_scores(), 0.1, protect_fraction=0.1)
    with pytest.raises(ConfigError, match=r"protect_scores\[t1.weight\]"):
        select_masks(_scores(), 0.1, protect_scores={"t0.weight": torch.rand(6, 40)}, protect_fraction=0.1)
    with pytest.raises(ConfigError, match="protect_fraction"):
        select_masks(_scores(), 0.1, protect_scores=_scores(1), protect_fraction=1.0)
    with pytest.raises(ConfigError, match="protect_mode"):
        select_masks(_scores(), 0.1, protect_mode="clamp")


def test_random_masks_are_seeded_exact_and_independent_of_other_tensors():
    weights = {n: torch.empty(s.shape) for n, s in _scores().items()}
    for scope in ("row", "tensor"):
        a = random_masks(weights, 0.3, scope, seed=7)
        b = random_masks(weights, 0.3, scope, seed=7)
        c = random_masks(weights, 0.3, scope, seed=8)
        alone = random_masks({"t1.weight": weights["t1.weight"]}, 0.3, scope, seed=7)
        assert all(torch.equal(a[n], b[n]) for n in weights)
        assert any(not torch.equal(a[n], c[n]) for n in weights)
        assert torch.equal(alone["t1.weight"], a["t1.weight"])
    row = random_masks(weights, 0.3, "row", seed=7)
    assert row["t0.weight"].sum(dim=1).tolist() == [removed_count(40, 0.3)] * 6
    tensor = random_masks(weights, 0.3, "tensor", seed=7)
    assert int(tensor["t0.weight"].sum()) == int(240 * 0.3) == 72  # official: int(numel * dense_ratio)
    assert int(tensor["t1.weight"].sum()) == int(51 * 0.3)
    assert len(set(tensor["t0.weight"].sum(dim=1).tolist())) > 1  # not a per-row draw
    with pytest.raises(ConfigError, match="scope"):
        random_masks(weights, 0.3, "global")


# ---------------------------------------------------------------- scores -----------------------------


def test_wanda_scores_broadcast_the_statistic_over_rows():
    w = {"w": torch.tensor([[1.0, -2.0, 3.0], [-1.0, 1.0, 0.5]])}
    scores = wanda_scores(w, {"w": torch.tensor([1.0, 4.0, 9.0])})
    assert scores["w"].tolist() == [[1.0, 4.0, 9.0], [1.0, 2.0, 1.5]]
    assert magnitude_scores(w)["w"].tolist() == [[1.0, 2.0, 3.0], [1.0, 1.0, 0.5]]
    with pytest.raises(ConfigError, match=r"weight shape \(2, 3\).*\(2,\)"):
        wanda_scores(w, {"w": torch.ones(2)})
    with pytest.raises(ConfigError, match="no statistic for w"):
        wanda_scores(w, {})


def test_random_scores_are_deterministic_per_seed():
    w = {"a": torch.empty(4, 5)}
    assert torch.equal(random_scores(w, 3)["a"], random_scores(w, 3)["a"])
    assert not torch.equal(random_scores(w, 3)["a"], random_scores(w, 4)["a"])


# ---------------------------------------------------------------- activation statistics -------------


def _toy_stats() -> ActivationStats:
    """Two samples: one of 1 token x=[1,0], one of 3 tokens x=[0,1]; a padded slot holds NaN."""
    stats = ActivationStats({"w": 2})
    x = torch.tensor([[[1.0, 0.0], [float("nan"), 5.0], [7.0, 7.0]], [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    stats.set_token_mask(torch.tensor([[True, False, False], [True, True, True]]))
    stats.update("w", x)
    return stats


def test_statistics_exclude_padding_and_normalise_as_documented():
    stats = _toy_stats()
    assert stats.sum_sq["w"].tolist() == [1.0, 3.0]
    assert (stats.n_tokens["w"], stats.n_samples["w"]) == (4, 2)
    assert stats.statistic("sample_mean")["w"].tolist() == [0.5, 1.5]  # long samples weigh more
    assert stats.statistic("token_mean")["w"].tolist() == [0.25, 0.75]
    assert stats.statistic("sample_token_mean")["w"].tolist() == [0.5, 0.5]  # each sample weighs the same
    with pytest.raises(ConfigError, match="statistic"):
        stats.statistic("median")


def test_token_mean_and_sample_mean_select_the_same_masks():
    stats = _toy_stats()
    w = {"w": torch.tensor([[1.0, 0.9], [0.5, 0.3]])}
    by_stat = {k: select_masks(wanda_scores(w, stats, k), 0.5) for k in ("sample_mean", "token_mean")}
    assert torch.equal(by_stat["sample_mean"]["w"], by_stat["token_mean"]["w"])
    balanced = select_masks(wanda_scores(w, stats, "sample_token_mean"), 0.5)
    assert not torch.equal(balanced["w"], by_stat["sample_mean"]["w"])


def test_without_mask_every_position_counts_and_2d_input_is_one_sample():
    stats = ActivationStats({"w": 2})
    stats.update("w", torch.ones(2, 3, 2))
    stats.update("w", torch.ones(4, 2))
    assert (stats.n_tokens["w"], stats.n_samples["w"]) == (10, 3)
    assert stats.sum_sq["w"].tolist() == [10.0, 10.0]


def test_update_rejects_mismatched_shapes_and_empty_targets_cannot_be_scored():
    stats = ActivationStats({"w": 2, "unused": 3})
    with pytest.raises(ConfigError, match="3 features"):
        stats.update("w", torch.ones(1, 2, 3))
    stats.set_token_mask(torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ConfigError, match=r"\(1, 2\).*\(1, 5\)"):
        stats.update("w", torch.ones(1, 2, 2))
    with pytest.raises(ConfigError, match="0 counted tokens"):
        stats.statistic()


def test_bf16_inputs_are_squared_and_accumulated_in_fp32():
    stats = ActivationStats({"w": 2})
    x = torch.tensor([1.0, 1.0 + 2**-7]).to(torch.bfloat16).expand(1, 1000, 2)
    stats.update("w", x)
    assert stats.sum_sq["w"].dtype == torch.float32
    # bf16 would round the square of 1 + 2^-7 and saturate a running sum at 256.
    assert stats.sum_sq["w"].tolist() == [1000.0, pytest.approx(1000 * (1 + 2**-7) ** 2, rel=1e-6)]


def test_bf16_model_calibration_accumulates_fp32():
    model = get_peft_model(small_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = model.to(torch.bfloat16)
    targets = find_targets(model, "lora")
    ids = torch.randint(1, 64, (2, 5))
    with collect(model, targets) as stats:
        run_calibration(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], stats)
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in stats.sum_sq.values())
    assert all(bool((t > 0).any()) for t in stats.sum_sq.values())


def test_response_token_mask_counts_only_labelled_real_tokens():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, 6, 7, -100, -100]]),
    }
    assert batch_token_mask(batch, "response").tolist() == [
        [False, False, True, True, False],
        [False, True, True, False, False],
    ]
    assert batch_token_mask(batch, "attention").sum() == 7
    with pytest.raises(ConfigError, match="token_mask"):
        batch_token_mask(batch, "prompt")

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))

    class _Wrapper(torch.nn.Module):  # accepts the HF-style keyword call of run_calibration
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.net(input_ids)

    wrapped = _Wrapper()
    targets = find_targets(wrapped, "linear")
    with collect(wrapped, targets) as stats:
        run_calibration(wrapped, [batch], stats, token_mask="response")
    name = next(iter(targets))
    emb = model[0].weight.detach()
    expected = (emb[torch.tensor([7, 8, 6, 7])] ** 2).sum(dim=0)
    torch.testing.assert_close(stats.sum_sq[name], expected)
    assert (stats.n_tokens[name], stats.n_samples[name]) == (4, 2)


def test_stats_round_trip_through_safetensors(tmp_path):
    stats = _toy_stats()
    save_tensors(tmp_path / "stats.safetensors", stats.to_tensors())
    again = ActivationStats.from_tensors(load_tensors(tmp_path / "stats.safetensors"))
    for kind in ("sample_mean", "token_mean", "sample_token_mean"):
        assert torch.equal(again.statistic(kind)["w"], stats.statistic(kind)["w"])
    with pytest.raises(ConfigError, match="to_tensors"):
        ActivationStats.from_tensors({"sum_sq/w": torch.ones(2)})


def test_all_reduce_is_a_no_op_without_process_group():
    stats = _toy_stats()
    stats.all_reduce_()
    assert stats.sum_sq["w"].tolist() == [1.0, 3.0] and stats.n_tokens["w"] == 4


def test_all_reduce_sums_sums_and_counts_across_ranks(tmp_path, monkeypatch):
    """A real one-rank gloo group; a simulated peer rank adds its buffers inside the collective."""
    peer = ActivationStats({"a": 2, "b": 3})
    peer.update("a", torch.full((1, 2, 2), 2.0))  # two tokens of 2s
    peer.update("b", torch.ones(2, 1, 3))
    peer_flat = torch.cat(
        [peer.sum_sq["a"], peer.sum_sq["b"], peer.sum_sample_mean_sq["a"], peer.sum_sample_mean_sq["b"]]
    )
    peer_counts = torch.tensor([c[n] for c in (peer.n_tokens, peer.n_samples) for n in ("a", "b")])
    real_all_reduce = dist.all_reduce

    def all_reduce_with_peer(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        real_all_reduce(tensor, op=op, group=group)
        tensor.add_(peer_flat if tensor.is_floating_point() else peer_counts)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "all_reduce", all_reduce_with_peer)
        stats = ActivationStats({"a": 2, "b": 3})
        stats.update("a", torch.ones(1, 1, 2))  # one token of 1s
        stats.update("b", torch.ones(1, 2, 3))
        stats.all_reduce_()
    finally:
        dist.destroy_process_group()
    assert stats.sum_sq["a"].tolist() == [9.0, 9.0]  # 1 + 2 * 4
    assert stats.sum_sample_mean_sq["a"].tolist() == [5.0, 5.0]  # 1 + 4
    assert stats.sum_sq["b"].tolist() == [4.0, 4.0, 4.0]
    assert (stats.n_tokens["a"], stats.n_samples["a"]) == (3, 2)
    assert (stats.n_tokens["b"], stats.n_samples["b"]) == (4, 3)


# ---------------------------------------------------------------- application and I/O ---------------


def test_apply_masks_zeroes_exactly_the_masked_entries():
    params = {"w": torch.randn(4, 6), "other": torch.randn(3)}
    original = {n: p.clone() for n, p in params.items()}
    masks = select_masks({"w": params["w"].abs()}, 0.5)
    apply_masks_(params, masks)
    assert bool((params["w"][masks["w"]] == 0).all())
    assert torch.equal(params["w"][~masks["w"]], original["w"][~masks["w"]])
    assert torch.equal(params["other"], original["other"])


def test_apply_masks_works_on_parameters_with_grad():
    layer = torch.nn.Linear(3, 2)
    apply_masks_(dict(layer.named_parameters()), {"weight": torch.ones(2, 3, dtype=torch.bool)})
    assert bool((layer.weight == 0).all()) and layer.weight.requires_grad


def test_mask_shape_mismatch_and_unknown_names_are_config_errors():
    params = {"w": torch.zeros(4, 6)}
    with pytest.raises(ConfigError, match=r"mask w: shape \(6, 4\).*\(4, 6\)"):
        check_mask_shapes({"w": torch.zeros(6, 4, dtype=torch.bool)}, params)
    with pytest.raises(ConfigError, match="mask v: no such parameter"):
        apply_masks_(params, {"v": torch.zeros(4, 6, dtype=torch.bool)})
    assert bool((params["w"] == 0).all())


def test_realised_fractions():
    masks = {"a": torch.tensor([[True, False], [False, False]]), "b": torch.ones(2, 2, dtype=torch.bool)}
    assert realised_fractions(masks) == {"a": 0.25, "b": 1.0}
    assert overall_fraction(masks) == 5 / 8


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_masked_delta_merge(fan_in_fan_out):
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    delta = 0.5 * b @ a
    if fan_in_fan_out:
        delta = delta.t()
    base = torch.randn(delta.shape)
    mask = torch.rand(delta.shape) > 0.5
    expected = base + delta * (~mask)
    masked_delta_merge_(base, a, b, 0.5, mask, fan_in_fan_out=fan_in_fan_out)
    torch.testing.assert_close(base, expected)
    with pytest.raises(ConfigError, match="one shape"):
        masked_delta_merge_(base, a, b, 0.5, mask.t())  # delta is 3x5, never square


def test_save_load_is_bit_identical_atomic_and_overwrites(tmp_path):
    masks = select_masks(_scores(), 0.3)
    scores = _scores(2)
    path = tmp_path / "sub" / "masks.safetensors"
    save_tensors(path, {**masks, **{f"score/{n}": s for n, s in scores.items()}}, metadata={"alpha": "0.3"})
    loaded = load_tensors(path)
    for n, m in masks.items():
        assert loaded[n].dtype == torch.bool and torch.equal(loaded[n], m)
    for n, s in scores.items():
        assert torch.equal(loaded[f"score/{n}"], s)
    save_tensors(path, {"only": torch.zeros(1)})
    assert list(load_tensors(path)) == ["only"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["masks.safetensors"]  # no temp file left
