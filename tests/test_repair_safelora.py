"""SafeLoRA (arXiv 2405.16833): projectors, cosines, layer selection and ``B ← C @ B``.

The official procedure is re-implemented independently in tests/test_repair_safelora_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from antidote_pl.errors import ConfigError
from antidote_pl.repair import (
    energy_rank,
    exact_projector,
    official_projector,
    project_lora_b,
    projection_cosines,
    safelora_projectors,
    safelora_repair,
    select_layers,
)
from antidote_pl.repair import safelora as safelora_module


def _hand_example():
    """Two targets worked out by hand (see the comments in the tests)."""
    vectors = {
        "t1": torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]),
        "t2": torch.tensor([[2.0, 0.0], [0.0, 0.0]]),
    }
    lora_a = {"t1": torch.tensor([[1.0, 0.0, 2.0]]), "t2": torch.tensor([[1.0, 1.0]])}
    lora_b = {"t1": torch.tensor([[1.0], [1.0]]), "t2": torch.tensor([[1.0], [3.0]])}
    return vectors, lora_a, lora_b


def _random(seed: int = 0, n: int = 4, out: int = 6, inp: int = 5, r: int = 2):
    g = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.q_proj" for i in range(n)]
    vectors = {name: torch.randn(out, inp, generator=g) for name in names}
    lora_a = {name: torch.randn(r, inp, generator=g) for name in names}
    lora_b = {name: torch.randn(out, r, generator=g) for name in names}
    return vectors, lora_a, lora_b


def test_official_projector_hand_computed():
    vectors, _, _ = _hand_example()
    # V [2, 3]: ||V||_F = 5, V V^T = diag(9, 16): an out x out matrix divided by the norm, not its square.
    assert torch.allclose(official_projector(vectors["t1"]), torch.tensor([[1.8, 0.0], [0.0, 3.2]]))
    assert torch.allclose(official_projector(vectors["t2"]), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))


def test_cosines_selection_and_projection_hand_computed():
    vectors, lora_a, lora_b = _hand_example()
    # t1: dW = [[1,0,2],[1,0,2]], C@B = [[1.8],[3.2]], cos = (1.8 + 3.2) / sqrt(2 (1.8² + 3.2²)).
    # t2: dW = [[1,1],[3,3]], C@B = [[2],[0]], cos = 4 / sqrt(8 · 20) = 1 / sqrt(10).
    cos1, cos2 = 5.0 / math.sqrt(2 * (1.8**2 + 3.2**2)), 1 / math.sqrt(10)
    result = safelora_repair(vectors, lora_a, lora_b, threshold=0.5)
    assert result.cosines == pytest.approx({"t1": cos1, "t2": cos2}, abs=1e-6)
    assert result.selected == ["t2"]
    assert torch.allclose(result.lora_b["t2"], torch.tensor([[2.0], [0.0]]))
    assert result.lora_b["t1"] is lora_b["t1"]
    both = safelora_repair(vectors, lora_a, lora_b, num_proj_layers=2)
    assert both.selected == ["t1", "t2"]
    assert torch.allclose(both.lora_b["t1"], torch.tensor([[1.8], [3.2]]))
    assert safelora_repair(vectors, lora_a, lora_b, num_proj_layers=1).selected == ["t2"]
    assert safelora_repair(vectors, lora_a, lora_b, threshold=0.97).selected == ["t1", "t2"]


def test_exact_projector_hand_computed():
    vectors, lora_a, lora_b = _hand_example()
    # Singular values 4 (direction e2) and 3 (e1): energies 16/25 = 0.64 and 1.
    assert torch.allclose(
        exact_projector(vectors["t1"], rank=1), torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6
    )
    assert torch.allclose(
        exact_projector(vectors["t1"], energy=0.6), torch.tensor([[0.0, 0.0], [0.0, 1.0]]), atol=1e-6
    )
    assert torch.allclose(exact_projector(vectors["t1"], energy=0.7), torch.eye(2), atol=1e-6)
    result = safelora_repair(vectors, lora_a, lora_b, num_proj_layers=2, projector="exact", rank=1)
    # P dW keeps the second row of dW: cos = ||P dW|| / ||dW|| = 1 / sqrt(2) for an orthogonal projector.
    assert result.cosines["t1"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert torch.allclose(result.lora_b["t1"], torch.tensor([[0.0], [1.0]]), atol=1e-6)


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0])  # squared 9, 4, 1: cumulative 9/14, 13/14, 1
    assert [energy_rank(s, e) for e in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]


def test_exact_projector_matches_an_independent_construction():
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v = q[:, :6] @ torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64)) @ r.T  # [8, 6]
    p = exact_projector(v.float(), rank=3)
    expected = q[:, :3] @ q[:, :3].T
    assert torch.allclose(p.double(), expected, atol=1e-5)
    assert torch.allclose(p @ p, p, atol=1e-5) and torch.allclose(p, p.T, atol=1e-6)
    # The official matrix is neither idempotent nor scale-free.
    c = official_projector(v.float())
    assert not torch.allclose(c @ c, c, atol=1e-2)
    assert torch.allclose(official_projector(2 * v.float()), 2 * c, atol=1e-5)


def test_pieces_compose_to_the_whole_and_dtype_is_kept():
    vectors, lora_a, lora_b = _random(seed=1)
    lora_b16 = {n: b.to(torch.bfloat16) for n, b in lora_b.items()}
    result = safelora_repair(vectors, lora_a, lora_b16, num_proj_layers=2)
    projectors = safelora_projectors(vectors)
    cosines = projection_cosines(projectors, lora_a, lora_b16)
    selected = select_layers(cosines, num_proj_layers=2)
    assert result.cosines == cosines and result.selected == selected and len(selected) == 2
    assert set(selected) == set(sorted(cosines, key=cosines.get)[:2])
    edited = project_lora_b(projectors, lora_b16, selected)
    for name in lora_b:
        assert result.lora_b[name].dtype == torch.bfloat16
        assert torch.equal(result.lora_b[name], edited[name])
        if name in selected:
            expected = (projectors[name] @ lora_b16[name].float()).to(torch.bfloat16)
            assert torch.equal(result.lora_b[name], expected)
        else:
            assert result.lora_b[name] is lora_b16[name]


def test_neutral_knobs_select_nothing_and_return_the_inputs():
    vectors, lora_a, lora_b = _random(seed=2)
    # An update orthogonal to V's column space has cosine exactly 0: still not selected at threshold 0.
    vectors["layers.0.q_proj"][:3] = 0.0
    lora_b["layers.0.q_proj"][3:] = 0.0
    for knobs in ({"threshold": 0.0}, {"threshold": 0}, {"num_proj_layers": 0}):
        result = safelora_repair(vectors, lora_a, lora_b, **knobs)
        assert result.selected == []
        assert all(result.lora_b[n] is lora_b[n] and torch.equal(result.lora_b[n], lora_b[n]) for n in lora_b)
    result = safelora_repair(vectors, lora_a, lora_b, threshold=1e-6)
    assert result.cosines["layers.0.q_proj"] == 0.0 and result.selected == ["layers.0.q_proj"]


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"threshold": -0.1}, r"threshold=-0\.1 is invalid: expected a number >= 0\.0 and <= 1\.0"),
        ({"threshold": 1.5}, r"threshold=1\.5 is invalid"),
        ({"threshold": float("nan")}, r"threshold=nan is invalid"),
        ({"num_proj_layers": -1}, r"num_proj_layers=-1 is invalid: expected an int in \[0, 4\]"),
        ({"num_proj_layers": 5}, r"num_proj_layers=5 is invalid: expected an int in \[0, 4\]"),
        ({"num_proj_layers": 1.0}, r"num_proj_layers=1\.0 is invalid"),
        ({"num_proj_layers": True}, r"num_proj_layers=True is invalid"),
        ({}, r"threshold/num_proj_layers=\(None, None\) is invalid: expected exactly one"),
        ({"threshold": 0.5, "num_proj_layers": 1}, r"threshold/num_proj_layers=\(0\.5, 1\) is invalid"),
        ({"threshold": 0.5, "projector": "svd"}, r"projector='svd' is invalid: expected one of"),
        (
            {"threshold": 0.5, "rank": 2},
            r"rank/energy=\(2, None\) is invalid: expected None with projector='official'",
        ),
        (
            {"threshold": 0.5, "projector": "exact"},
            r"rank/energy=\(None, None\) is invalid: expected exactly one",
        ),
        (
            {"threshold": 0.5, "projector": "exact", "rank": 0},
            r"rank=0 is invalid: expected an int in \[1, 5\]",
        ),
        (
            {"threshold": 0.5, "projector": "exact", "rank": 6},
            r"rank=6 is invalid: expected an int in \[1, 5\]",
        ),
        (
            {"threshold": 0.5, "projector": "exact", "energy": 0.0},
            r"energy=0\.0 is invalid: expected a number > 0\.0",
        ),
        ({"threshold": 0.5, "projector": "exact", "energy": 1.5}, r"energy=1\.5 is invalid"),
    ],
)
def test_bad_knobs_are_refused_before_any_projector(knobs, message, monkeypatch):
    vectors, lora_a, lora_b = _random()

    def must_not_build(*args, **kwargs):
        raise AssertionError("built a projector before validating the knobs")

    monkeypatch.setattr(safelora_module, "official_projector", must_not_build)
    monkeypatch.setattr(safelora_module, "exact_projector", must_not_build)
    with pytest.raises(ConfigError, match=message):
        safelora_repair(vectors, lora_a, lora_b, **knobs)


def test_mismatches_name_the_target_before_any_projector(monkeypatch):
    vectors, lora_a, lora_b = _random()
    monkeypatch.setattr(
        safelora_module, "safelora_projectors", lambda *a, **k: pytest.fail("built projectors")
    )
    bad = {**vectors, "layers.2.q_proj": torch.zeros(5, 6)}  # transposed
    with pytest.raises(ConfigError, match=r"vectors\[layers\.2\.q_proj\]: shape \(5, 6\) does not match"):
        safelora_repair(bad, lora_a, lora_b, threshold=0.5)
    missing = {n: v for n, v in vectors.items() if n != "layers.3.q_proj"}
    with pytest.raises(ConfigError, match=r"vectors\[layers\.3\.q_proj\]: missing"):
        safelora_repair(missing, lora_a, lora_b, threshold=0.5)
    with pytest.raises(ConfigError, match=r"target layers\.1\.q_proj: lora_a shape"):
        safelora_repair(vectors, lora_a, {**lora_b, "layers.1.q_proj": torch.zeros(6, 3)}, threshold=0.5)


def test_degenerate_vectors_are_refused_naming_the_target():
    vectors, lora_a, lora_b = _random()
    zero = {**vectors, "layers.1.q_proj": torch.zeros(6, 5)}
    with pytest.raises(ConfigError, match=r"vectors\[layers\.1\.q_proj\]: all zeros"):
        safelora_repair(zero, lora_a, lora_b, threshold=0.5)
    with pytest.raises(ConfigError, match=r"vectors\[layers\.1\.q_proj\]: all zeros"):
        safelora_repair(zero, lora_a, lora_b, threshold=0.5, projector="exact", rank=1)
    nan = {**vectors, "layers.2.q_proj": torch.full((6, 5), float("nan"))}
    with pytest.raises(ConfigError, match=r"vectors\[layers\.2\.q_proj\]: contains NaN"):
        safelora_repair(nan, lora_a, lora_b, num_proj_layers=1)
    with pytest.raises(ConfigError, match=r"projectors\[layers\.0\.q_proj\]: shape \(5, 5\) does not fit"):
        projection_cosines({**safelora_projectors(vectors), "layers.0.q_proj": torch.eye(5)}, lora_a, lora_b)
