"""Mask analytics on known masks: per-layer fractions, Jaccard, overlap table, heat map."""

from __future__ import annotations

import pytest
import torch

from antidote_pl.errors import ConfigError
from antidote_pl.experiment.masks import (
    chance_jaccard,
    corresponding_masks,
    describe_tensor,
    jaccard,
    jaccard_matrix,
    layer_module_markdown,
    mask_analytics_markdown,
    overlap_markdown,
    removed_by_layer_module,
    write_heatmap,
)

PEFT = "base_model.model.model.layers.{}.{}.lora_{}.default.weight"


def _name(layer: int, module: str, factor: str) -> str:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return PEFT.format(layer, f"{block}.{module}", factor)


def _mask(n: int, removed: list[int]) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[removed] = True
    return m.reshape(2, n // 2)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (_name(3, "q_proj", "A"), (3, "q", "lora_A")),
        (_name(0, "down_proj", "B"), (0, "down", "lora_B")),
        ("base_model.model.model.layers.1.mlp.gate_proj.base_layer.weight", (1, "gate", "weight")),
        ("model.layers.12.self_attn.o_proj.weight", (12, "o", "weight")),
        ("transformer.h.2.attn.c_attn.lora_B.other.weight", (2, "c_attn", "lora_B")),
        ("lm_head.weight", (None, "lm_head", "weight")),
    ],
)
def test_describe_tensor(name, expected):
    assert describe_tensor(name) == expected


def test_removed_fraction_per_layer_and_module():
    masks = {
        _name(0, "q_proj", "A"): _mask(8, [0, 1]),
        _name(0, "q_proj", "B"): _mask(8, []),
        _name(1, "q_proj", "A"): _mask(8, [0, 1, 2, 3]),
        _name(0, "v_proj", "A"): _mask(4, [3]),
        "model.layers.1.mlp.up_proj.weight": _mask(10, list(range(10))),
        "lm_head.weight": _mask(4, [0]),
    }
    rows = removed_by_layer_module(masks)
    got = {(r["layer"], r["column"]): (r["removed"], r["total"], r["fraction"]) for r in rows}
    assert got == {
        (0, "q.lora_A"): (2, 8, 0.25),
        (0, "q.lora_B"): (0, 8, 0.0),
        (0, "v.lora_A"): (1, 4, 0.25),
        (1, "q.lora_A"): (4, 8, 0.5),
        (1, "up"): (10, 10, 1.0),
        (None, "lm_head"): (1, 4, 0.25),
    }
    # Layers in order, q before v before up, outside-the-blocks tensors last.
    assert [(r["layer"], r["column"]) for r in rows][:3] == [
        (0, "q.lora_A"),
        (0, "q.lora_B"),
        (0, "v.lora_A"),
    ]
    assert rows[-1]["layer"] is None
    text = layer_module_markdown(masks)
    assert "| layer | q.lora_A | q.lora_B | v.lora_A | up | lm_head |" in text
    assert "| 1 | 50.0 | - | - | 100.0 | - |" in text and "| other | - | - | - | - | 25.0 |" in text


def test_jaccard_known_values_and_empty_sets():
    a = {"w": _mask(8, [0, 1, 2, 3]), "v": _mask(4, [])}
    b = {"w": _mask(8, [2, 3, 4]), "v": _mask(4, [0])}
    # |A ∩ B| = 2 ({w2, w3}); |A ∪ B| = 6 ({w0..w4, v0}).
    assert jaccard(a, b) == pytest.approx(2 / 6)
    assert jaccard(a, a) == 1.0
    empty = {"w": _mask(8, []), "v": _mask(4, [])}
    assert jaccard(empty, empty) == 1.0  # two empty removed sets are the same set
    assert jaccard(empty, a) == 0.0
    disjoint = {"w": _mask(8, [4, 5, 6, 7]), "v": _mask(4, [])}
    assert jaccard(a, disjoint) == 0.0


def test_jaccard_matrix_and_table():
    sets = {
        "wanda": {"w": _mask(8, [0, 1, 2, 3])},
        "magnitude": {"w": _mask(8, [2, 3, 4])},
        "random": {"w": _mask(8, [7])},
    }
    m = jaccard_matrix(sets)
    assert m["wanda"]["magnitude"] == m["magnitude"]["wanda"] == pytest.approx(2 / 5)
    assert m["wanda"]["random"] == 0.0 and m["random"]["random"] == 1.0
    text = overlap_markdown(sets)
    # Chance levels: 50% vs 37.5% removed: .1875 / .6875 = 0.273; 50% vs 12.5%: .0625 / .5625 = 0.111.
    assert "| wanda | 50.0 | 1.000 | 0.400 (0.273) | 0.000 (0.111) |" in text


def test_chance_jaccard():
    assert chance_jaccard(0.1, 0.1) == pytest.approx(0.01 / 0.19)
    assert chance_jaccard(0.0, 0.0) == 1.0 and chance_jaccard(1.0, 0.3) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="p=1.5"):
        chance_jaccard(1.5, 0.1)


@pytest.mark.parametrize(
    ("b", "message"),
    [
        ({"x": _mask(8, [])}, "different tensors"),
        ({"w": torch.zeros(8, dtype=torch.bool)}, "shapes"),
        ({"w": torch.zeros(2, 4)}, "bool mask"),
        ({}, "at least one mask"),
    ],
)
def test_incomparable_masks_are_refused(b, message):
    with pytest.raises(ConfigError, match=message):
        jaccard({"w": _mask(8, [1])}, b)


def test_heatmap_png_is_written_atomically(tmp_path):
    masks = {
        _name(layer, mod, "A"): _mask(8, list(range(layer + 1)))
        for layer in range(3)
        for mod in ("q_proj", "v_proj")
    }
    out = tmp_path / "sub" / "heatmap.png"
    write_heatmap(masks, out, title="wanda alpha 0.1")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["heatmap.png"]  # no temporary leftovers


def test_analytics_section_writes_linked_heatmaps(tmp_path):
    sets = {
        "wanda a0.1": {_name(0, "q_proj", "A"): _mask(8, [0, 1])},
        "magnitude a0.1": {_name(0, "q_proj", "A"): _mask(8, [1, 2])},
    }
    text = mask_analytics_markdown(sets, tmp_path, heatmaps=["wanda a0.1"])
    assert "| wanda a0.1 | 25.0 | 1.000 | 0.333 (0.143) |" in text
    assert "![wanda a0.1](mask_heatmap_wanda_a0.1.png)" in text and "| 0 | 25.0 |" in text
    assert [p.name for p in tmp_path.iterdir()] == ["mask_heatmap_wanda_a0.1.png"]
    with pytest.raises(ConfigError, match="heatmaps"):
        mask_analytics_markdown(sets, tmp_path, heatmaps=["nope"])


def test_masks_of_adapters_equal_up_to_the_rank_axis_correspond_only_in_feature_space():
    """BA = (BM)(M^-1 A): a second seed's adapter that is the first with its rank axis permuted is
    the same update, yet its factors' masks differ entry by entry; A's columns and B's rows do not."""
    from antidote_pl.pruning import select_masks

    torch.manual_seed(0)
    a, b = torch.randn(2, 8), torch.randn(5, 2)  # rank 2
    perm = torch.tensor([1, 0])
    names = {"A": _name(0, "q_proj", "A"), "B": _name(0, "q_proj", "B")}
    merged = "model.layers.0.self_attn.o_proj.weight"

    def masks(a, b):
        scores = {names["A"]: a.abs(), names["B"]: b.abs(), merged: (b @ a).abs()}
        return select_masks(scores, 0.25, "row")

    first, second = masks(a, b), masks(a[perm], b[:, perm])
    assert torch.allclose(b[:, perm] @ a[perm], b @ a)
    lora = [names["A"], names["B"]]
    assert jaccard({n: first[n] for n in lora}, {n: second[n] for n in lora}) < 0.5
    projected = corresponding_masks(first), corresponding_masks(second)
    assert projected[0][names["A"]].shape == (8,) and projected[0][names["B"]].shape == (5,)
    assert projected[0][merged].shape == (5, 8)  # a merged delta's entries correspond as they are
    assert 0 < int(projected[0][names["A"]].sum()) < 8  # 2 rows remove 2 of 8 each: not every column
    assert jaccard(*projected) == 1.0
    # A's columns touched: either rank row removes an entry of the column.
    assert torch.equal(projected[0][names["A"]], first[names["A"]].any(dim=0))
