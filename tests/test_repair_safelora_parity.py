"""Parity of antidote_pl.repair.safelora with the official SafeLoRA procedure (IBM/SafeLoRA, model.py).

The official procedure is re-implemented here independently, in the official code's own style: it
walks ``named_parameters()`` of a base and an aligned model in step to build one projector per
targeted weight (``V Vᵀ / torch.norm(V)``), then walks a LoRA model and a deep copy of it in step,
taking a LoRA parameter with ``shape[0] == r`` for ``A`` and the next one for ``B``, computing the
cosine between ``(C @ B) @ A`` and ``B @ A`` (rounded to 5 decimals) and setting ``B ← C @ B`` when the
cosine is ``<=`` the threshold. Its ``number`` mode takes the K-th smallest cosine as the threshold.
The models are tiny random torch modules with peft-like LoRA linears (no peft, no checkpoints).
"""

from __future__ import annotations

import copy

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from antidote_pl.repair import alignment_delta, safelora_repair

HIDDEN, KV, FF, RANK, N_LAYERS = 12, 8, 10, 4, 4
TARGET_MODULES = ["q_proj", "v_proj"]


class LoraLinear(nn.Module):
    """peft's parameter naming: ``base_layer.weight``, ``lora_A.weight``, ``lora_B.weight``."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.base_layer = nn.Linear(in_features, out_features, bias=False)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)


class Block(nn.Module):
    def __init__(self, lora: bool):
        super().__init__()

        def linear(i: int, o: int) -> nn.Module:
            return LoraLinear(i, o, RANK) if lora else nn.Linear(i, o, bias=False)

        self.q_proj = linear(HIDDEN, HIDDEN)
        self.up_proj = nn.Linear(HIDDEN, FF, bias=False)  # not a LoRA target: skipped by both walks
        self.v_proj = linear(HIDDEN, KV)


class TinyModel(nn.Module):
    def __init__(self, lora: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(Block(lora) for _ in range(N_LAYERS))


def _target_names() -> list[str]:
    return [f"layers.{i}.{m}" for i in range(N_LAYERS) for m in ("q_proj", "v_proj")]


def _models(seed: int):
    """Base, aligned (base + a low-rank V) and LoRA models whose updates overlap V by varying amounts."""
    g = torch.Generator().manual_seed(seed)
    base, aligned, lora = TinyModel(), TinyModel(), TinyModel(lora=True)
    with torch.no_grad():
        # Seeded draws instead of the modules' own init, which uses (and would need) the global RNG.
        for param in [*base.parameters(), *lora.parameters()]:
            param.copy_(torch.randn(param.shape, generator=g) / param.shape[1] ** 0.5)
    aligned.load_state_dict(base.state_dict())
    names = _target_names()
    with torch.no_grad():
        for k, name in enumerate(names):
            weight = aligned.get_submodule(name).weight
            out, inp = weight.shape
            v = torch.randn(out, 3, generator=g) @ torch.randn(3, inp, generator=g)
            weight += 0.1 * v
            layer = lora.get_submodule(name)
            layer.base_layer.weight.copy_(base.get_submodule(name).weight)
            # B mixes V's column space with noise, in a proportion that varies across targets.
            mix = k / (len(names) - 1)
            inside = torch.linalg.svd(v).U[:, :3] @ torch.randn(3, RANK, generator=g)
            layer.lora_B.weight.copy_(mix * inside + (1 - mix) * torch.randn(out, RANK, generator=g))
    return base, aligned, lora


# ------------------------------------------------ the official procedure, re-implemented in its style


def official_aligned_matrix(base_model: nn.Module, aligned_model: nn.Module) -> list[torch.Tensor]:
    projectors = []
    walk = zip(base_model.named_parameters(), aligned_model.named_parameters())
    for (_, base_param), (aligned_name, aligned_param) in walk:
        if not any(module in aligned_name for module in TARGET_MODULES):
            continue
        assert base_param.shape == aligned_param.shape
        delta = aligned_param - base_param
        projectors.append((torch.mm(delta, delta.t()) / torch.norm(delta)).detach())
    return projectors


def official_projected_weighted(
    lora_model: nn.Module, original: nn.Module, projectors: list[torch.Tensor], threshold: float
) -> list[float]:
    position, cosines = 0, []
    for (name, param), (_, param_ori) in zip(lora_model.named_parameters(), original.named_parameters()):
        if "lora" not in name:
            continue
        if param.shape[0] == RANK:
            factor_a = copy.deepcopy(param_ori)  # the official calls this one "B"
            continue
        projector = projectors[position]
        projected = torch.mm(projector, param_ori.data)
        cos = F.cosine_similarity(
            torch.mm(projected, factor_a).reshape(1, -1), torch.mm(param_ori, factor_a).reshape(1, -1)
        )
        cos = numpy.round(cos.item(), 5)
        cosines.append(cos)
        param.data = projected if cos <= threshold else param_ori
        position += 1
    return cosines


def official_safelora(base, aligned, lora, threshold=None, num_proj_layers=None):
    """Threshold or number mode as the official class runs them; returns (cosines, model)."""
    original = copy.deepcopy(lora)
    projectors = official_aligned_matrix(base, aligned)
    if threshold is None:
        cosines = official_projected_weighted(lora, original, projectors, 0.3)
        threshold = numpy.sort(cosines)[:num_proj_layers][-1]
    cosines = official_projected_weighted(lora, original, projectors, threshold)
    return cosines, lora, threshold


# ------------------------------------------------ ours, keyed by target name


def ours(base, aligned, lora, **knobs):
    names = _target_names()
    vectors = alignment_delta(
        {n: aligned.get_submodule(n).weight.detach() for n in names},
        {n: base.get_submodule(n).weight.detach() for n in names},
    )
    lora_a = {n: lora.get_submodule(n).lora_A.weight.detach().clone() for n in names}
    lora_b = {n: lora.get_submodule(n).lora_B.weight.detach().clone() for n in names}
    return safelora_repair(vectors, lora_a, lora_b, **knobs), lora_b


def _compare(result, original_b, cosines, lora, threshold):
    names = _target_names()
    assert list(result.cosines) == names
    for name, official_cos in zip(names, cosines):
        assert abs(result.cosines[name] - official_cos) <= 5e-6 + 1e-6  # official rounds to 5 decimals
    official_selected = [n for n, c in zip(names, cosines) if c <= threshold]
    assert result.selected == official_selected
    assert 0 < len(official_selected) < len(names)  # a real split, so the comparison can fail
    for name in names:
        official_b = lora.get_submodule(name).lora_B.weight.detach()
        assert torch.allclose(result.lora_b[name], official_b, rtol=1e-5, atol=1e-6), name
        # Projection must have changed the selected B, else the comparison above proves nothing.
        assert torch.equal(official_b, original_b[name]) == (name not in official_selected)


@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_mode_matches_the_official_procedure(seed):
    base, aligned, lora = _models(seed)
    probe, _ = ours(base, aligned, lora, num_proj_layers=0)
    ranked = sorted(probe.cosines.values())
    # A threshold halfway between two cosines far apart, so rounding and <= vs < cannot matter.
    gaps = [(ranked[i + 1] - ranked[i], i) for i in range(2, len(ranked) - 3)]
    gap, i = max(gaps)
    assert gap > 1e-3
    threshold = (ranked[i] + ranked[i + 1]) / 2
    result, original_b = ours(base, aligned, lora, threshold=threshold)
    cosines, lora, _ = official_safelora(base, aligned, lora, threshold=threshold)
    _compare(result, original_b, cosines, lora, threshold)


@pytest.mark.parametrize("num_proj_layers", [1, 3, 7])
def test_number_mode_matches_the_official_procedure(num_proj_layers):
    base, aligned, lora = _models(2)
    result, original_b = ours(base, aligned, lora, num_proj_layers=num_proj_layers)
    cosines, lora, threshold = official_safelora(base, aligned, lora, num_proj_layers=num_proj_layers)
    assert len(set(cosines)) == len(cosines)  # no ties, where the official would project more than K
    _compare(result, original_b, cosines, lora, threshold)
    assert len(result.selected) == num_proj_layers
